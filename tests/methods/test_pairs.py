from sgpo.models import templates
from sgpo.methods.gates import Gates, TemplateMarkers
from sgpo.methods.pairs import Pair, filter_pairs, pair_metrics


def _gates(finished):
    return Gates(TemplateMarkers.of(templates.IMPROVER_INSTRUCTION), finished)


def _p(chosen, rejected, cf=True, rf=True):
    return Pair("id", [{"role": "user", "content": "q"}], chosen, rejected, cf, rf)


def test_filters_count_each_reason():
    pairs = [_p("a better answer", "an answer"), _p("same  text", "same text\n"), _p("", "x"), _p("x", " "),
             _p("cut", "fine", cf=False), _p("fine", "cut", rf=False)]
    kept, dropped = filter_pairs(pairs, _gates("both"))
    assert [p.chosen for p in kept] == ["a better answer"]
    assert dropped == {"equal": 1, "empty_chosen": 1, "empty_rejected": 1, "chosen_unfinished": 1,
                       "rejected_unfinished": 1}
    kept, dropped = filter_pairs(pairs, _gates("none"))
    assert len(kept) == 3 and "chosen_unfinished" not in dropped


def test_pair_metrics_names():
    kept, dropped = filter_pairs([_p("one two three", "one two"), _p("x", "x")], _gates("both"))
    m = pair_metrics(kept, dropped)
    assert m["pairs/kept"] == 1 and m["pairs/dropped/equal"] == 1
    assert m["lengths/chosen"] == 3 and m["lengths/rejected"] == 2 and m["pairs/edit_distance"] == 1


def test_training_pairs_see_the_prompt_cut_that_generation_saw(tiny_tokenizer):
    """A long request is cut to the last ``data.max_prompt_tokens`` for the rollouts; the reference pass and DPO must
    score the responses under the same cut (and stay bounded in memory), for the policy and the improver prompt."""
    from types import SimpleNamespace

    from sgpo.models import templates
    from sgpo.config.schema import Config
    from sgpo.methods.pairs import Pair
    from sgpo.config.schema import GenerationConfig
    from sgpo.data.records import Record
    from sgpo.generation.rollout import Sampler
    from sgpo.run.trainer import Trainer

    cfg = Config()
    cfg.data.max_prompt_tokens = 24
    text = " ".join(f"word{i}" for i in range(200))
    messages = [{"role": "user", "content": text}]
    trainer = SimpleNamespace(tokenizer=tiny_tokenizer, cfg=cfg, instruction=templates.IMPROVER_INSTRUCTION)
    tp = Trainer.token_pairs(trainer, [Pair("a", messages, "good answer", "bad answer")], improver_drafts=True)[0]
    full = templates.render(tiny_tokenizer, messages)
    assert len(full) > 24
    gen = Sampler(tiny_tokenizer, GenerationConfig(), 0, 24).requests([Record("a", (("user", text),))], "policy", 0)[0]
    assert tp.prompt_ids == list(gen.prompt_ids) == full[-24:]
    assert len(tp.improver_prompt_ids) == 24


def test_pair_of_builds_what_the_methods_built_by_hand():
    """``Pair.of``: the record's policy-mode prompt, a text side complete, a generation's own flag, ``meta`` as given
    (its ``chosen``/``rejected`` keys too) — the same pair, field by field and in JSON, as the one written out."""
    from sgpo.data.records import Record
    from sgpo.generation.engine import Generation

    r = Record("r1", (("user", "q?"),), "the reference")
    own = Generation("my answer", (1, 2), False)
    p = Pair.of(r, r.reference, own, round=2, chosen="reference", rejected="policy")
    by_hand = Pair(record_id=r.id, prompt=templates.policy_messages(r.prompt), chosen=r.reference,
                   rejected=own.text, chosen_finished=True, rejected_finished=own.finished,
                   meta={"round": 2, "chosen": "reference", "rejected": "policy"})
    assert p == by_hand and list(p.to_json().items()) == list(by_hand.to_json().items())
    assert list(p.meta) == ["round", "chosen", "rejected"]
    q = Pair.of(r, Generation("better", (), True), own)
    assert (q.chosen, q.chosen_finished, q.rejected_finished, q.meta) == ("better", True, False, {})
