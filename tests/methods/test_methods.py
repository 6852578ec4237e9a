"""Each method on a tiny random model: which text is chosen and which rejected, which model is the reference,
SynPO's separate improver and its accumulated pairs, DPO's preference sets, SFT-only runs, and the dry-run plan."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sgpo.config import schema as config
from sgpo.run import recipe
from sgpo.models import templates
from sgpo.data.records import load_records, parse_row
from sgpo.core.registry import METHODS
from sgpo.methods.base import get_method
from sgpo.models.loading import load_model, load_tokenizer, resolve
from sgpo.methods.pairs import Pair
from sgpo.core.files import read_jsonl
from sgpo.generation.rollout import Sampler
from sgpo.training.dpo import TokenPair, reference_logps

from dry_run_check import assert_dry_run_matches

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"

TOPICS = ["the moon", "bread", "rivers", "chess", "bees", "glass", "trains", "maps", "tea", "snow", "clocks",
          "whales", "paper", "salt"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead, worse on a shared machine
    yield
    torch.set_num_threads(n)


def write_sft_data(path: Path) -> Path:
    rows = [{"prompt": f"Say one thing about {t}.", "response": f"Here is one thing about {t}: it is interesting."}
            for t in TOPICS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_overrides(data: Path, method: str, *extra: str) -> list[str]:
    return [f"method={method}", f"data.sft={data}", "data.dev_size=1", "data.improver_size=2", "data.round_size=2",
            "generation.max_new_tokens=4", "generation.batch_size=4", "train.batch_size=2", "dpo.batch_size=2",
            "eval.head_to_head_size=0", "eval.improver_size=0", "improver.chain=1", "rounds=2", "data.test_size=0",
            "sft=false", "eval.second_judge=", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sft_data(tmp_path_factory.mktemp("data") / "sft.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Run a method once per module (lazily) and return its run directory."""
    root = tmp_path_factory.mktemp("runs")
    done = {}

    def get(method: str, *extra: str) -> Path:
        key = (method, extra)
        if key not in done:
            out = root / f"{method}{len(done)}"
            recipe.run(config.load(SMOKE, tiny_overrides(data, method, *extra)), out)
            done[key] = out
        return done[key]
    return get


def pairs_of(run: Path, t: int) -> list[Pair]:
    return [Pair.from_json(d) for d in read_jsonl(run / f"round_{t}" / "pairs.jsonl")]


def texts(path: Path) -> dict[str, str]:
    return {r["id"]: r["text"] for r in read_jsonl(path)}


def references(data: Path) -> dict[str, str]:
    return {r.id: r.reference for r in load_records(str(data), need="reference")[0]}


def ref_logps_under(model_path: str, pairs: list[Pair]) -> list[tuple[float, float]]:
    """Recompute the reference log-probs of ``pairs`` under a given model, tokenized as the recipe does."""
    tok = load_tokenizer("sgpo:tiny-random")
    model = load_model(model_path, device="cpu", dtype="float32")
    tp = [TokenPair(templates.render(tok, p.prompt), templates.completion_ids(tok, p.chosen, eos=p.chosen_finished),
                    templates.completion_ids(tok, p.rejected, eos=p.rejected_finished)) for p in pairs]
    reference_logps(model, tp, pad_id=tok.pad_token_id, show_progress=False)
    return [(x.ref_chosen, x.ref_rejected) for x in tp]


def assert_reference(pairs: list[Pair], model_path: str, other_path: str) -> None:
    """The stored reference log-probs are those of ``model_path`` and not those of ``other_path``."""
    stored = [(p.ref_chosen_logp, p.ref_rejected_logp) for p in pairs]
    mine = ref_logps_under(model_path, pairs)
    other = ref_logps_under(other_path, pairs)
    assert all(abs(a - c) < 1e-3 and abs(b - d) < 1e-3 for (a, b), (c, d) in zip(stored, mine))
    assert any(abs(a - c) > 1e-2 for (a, _), (c, _) in zip(stored, other))


def start_path() -> str:
    return resolve("sgpo:tiny-random")


def test_registry_knows_every_method_of_the_config():
    assert set(METHODS) == set(config.CHOICES["method"])
    with pytest.raises(ValueError, match="unknown method"):
        get_method("ppo")


@pytest.mark.slow
def test_spin_pairs_reference_against_current_model(runs, data):
    run = runs("spin")
    refs = references(data)
    for t in (1, 2):
        pairs = pairs_of(run, t)
        own = texts(run / f"round_{t}" / "policy.jsonl")
        assert len(pairs) == 2
        for p in pairs:
            assert p.chosen == refs[p.record_id]          # chosen: the SFT reference
            assert p.rejected == own[p.record_id]         # rejected: the current model's own sample
    # reference = the round-start model: π_0 in round 1, the round-1 model in round 2
    assert_reference(pairs_of(run, 1), start_path(), str(run / "round_1" / "model"))
    assert_reference(pairs_of(run, 2), str(run / "round_1" / "model"), start_path())


@pytest.mark.slow
def test_synpo_separate_improver_and_accumulated_pairs(runs, data):
    run = runs("synpo")
    refs = references(data)
    # the separate improver learned full jumps: its own π_0 drafts → the SFT references
    drafts = texts(run / "prepare" / "drafts.jsonl")
    examples = read_jsonl(run / "prepare" / "examples.jsonl")
    assert examples and all(e["source"] == drafts[e["record_id"]] and e["target"] == refs[e["record_id"]]
                            for e in examples)
    imp_path = run / "prepare" / "improver_model"
    assert (imp_path / "config.json").exists()
    assert not (run / "improver").exists()  # the policy's own weights never train the improver role
    # round 1: π_1 = π_0, so the refined sample and the rejected one are the same draft
    r1 = pairs_of(run, 1)
    pol1, imp1 = texts(run / "round_1" / "policy.jsonl"), texts(run / "round_1" / "improver.jsonl")
    assert len(r1) == 2
    assert all(p.chosen == imp1[p.record_id] and p.rejected == pol1[p.record_id] for p in r1)
    # round 2: the round-1 pairs again, plus new ones: chosen = R(π_2's draft), rejected = π_0's answer
    r2 = pairs_of(run, 2)
    assert len(r2) == 4
    old = [p for p in r2 if p.meta["round"] == 1]
    new = [p for p in r2 if p.meta["round"] == 2]
    assert [(p.record_id, p.chosen, p.rejected) for p in old] == [(p.record_id, p.chosen, p.rejected) for p in r1]
    pol2, imp2 = texts(run / "round_2" / "policy.jsonl"), texts(run / "round_2" / "improver.jsonl")
    init2 = texts(run / "round_2" / "initial_policy.jsonl")
    assert all(p.chosen == imp2[p.record_id] and p.rejected == init2[p.record_id] for p in new)
    # ... and those texts really come from the models named: regenerate them with the same seeds
    cfg = config.load(run / "config.yaml")
    tok = load_tokenizer("sgpo:tiny-random")
    recs = {r.id: r for r in load_records(str(data))[0]}
    new_recs = [recs[p.record_id] for p in new]
    s = Sampler(tok, dataclasses.replace(cfg.generation, batch_size=4), cfg.seed, instruction=templates.improver_instruction(cfg.improver))
    start = s.rollout(load_model(start_path(), device="cpu", dtype="float32"), new_recs, "initial-policy", 2)
    assert all(start[p.record_id].text == p.rejected for p in new)
    improver = load_model(str(imp_path), device="cpu", dtype="float32")
    again = s.rollout(improver, new_recs, "improver", 2, drafts={i: pol2[i] for i in pol2})
    assert all(again[p.record_id].text == p.chosen for p in new)
    # reference = the round-start model, for the carried-over pairs too
    assert_reference(r2, str(run / "round_1" / "model"), start_path())


@pytest.mark.slow
def test_dpo_offline_default_set_and_initial_reference(runs, data):
    run = runs("dpo")
    refs = references(data)
    pref = [Pair.from_json(d) for d in read_jsonl(run / "prepare" / "preference.jsonl")]
    answers = texts(run / "prepare" / "start_answers.jsonl")
    assert len(pref) == 4  # rounds × round_size, generated once before the rounds
    assert all(p.chosen == refs[p.record_id] and p.rejected == answers[p.record_id] for p in pref)
    for t in (1, 2):
        assert [p.record_id for p in pairs_of(run, t)] == [p.record_id for p in pref[2 * (t - 1):2 * t]]
    assert not (run / "round_1" / "policy.jsonl").exists()  # no generation in the rounds: off-policy
    # reference = π_0 in every round, also after the model has moved
    assert_reference(pairs_of(run, 2), start_path(), str(run / "round_1" / "model"))


@pytest.mark.slow
def test_all_methods_see_the_same_round_prompts(runs):
    ids = {m: [p.record_id for p in pairs_of(runs(m), 1) if p.meta.get("round") == 1] for m in ("spin", "dpo")}
    ids["synpo"] = [p.record_id for p in pairs_of(runs("synpo"), 1)]
    assert ids["spin"] == ids["dpo"] == ids["synpo"]


@pytest.mark.slow
def test_dpo_external_preference_data(runs, data, tmp_path_factory):
    path = tmp_path_factory.mktemp("pref") / "pref.jsonl"
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Potato."},
        {"prompt": [{"role": "user", "content": "Name a fruit."}],
         "chosen": [{"role": "assistant", "content": "An apple."}],
         "rejected": [{"role": "assistant", "content": "A chair."}]},
        # implicit prompt: the turns before the last one
        {"chosen": [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "A robin."}],
         "rejected": [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "A bus."}]},
        # the UltraFeedback (binarized) shape: string prompt, full conversations, and a 'messages' field
        {"prompt": "Name a tree.", "messages": [{"role": "user", "content": "Name a tree."},
                                                {"role": "assistant", "content": "An oak."}],
         "chosen": [{"role": "user", "content": "Name a tree."}, {"role": "assistant", "content": "An oak."}],
         "rejected": [{"role": "user", "content": "Name a tree."}, {"role": "assistant", "content": "A cloud."}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = {("Name a colour.", "Blue.", "Potato."), ("Name a fruit.", "An apple.", "A chair."),
                ("Name a bird.", "A robin.", "A bus."), ("Name a tree.", "An oak.", "A cloud.")}
    run = runs("dpo", f"data.preference={path}")
    got = [(p.prompt[-1]["content"], p.chosen, p.rejected) for t in (1, 2) for p in pairs_of(run, t)]
    assert len(got) == 4 and set(got) == expected
    assert not (run / "prepare" / "start_answers.jsonl").exists()


def test_preference_rows_are_not_mistaken_for_sft_rows():
    row = {"prompt": "Q?", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
           "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
           "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B"}]}
    r = parse_row(row, "x:1")
    assert (r.prompt, r.chosen, r.rejected) == ((("user", "Q?"),), "A", "B")


@pytest.mark.slow
def test_sft_only_trains_on_references_and_makes_no_pairs(runs):
    run = runs("sft")
    m = json.loads((run / "sft" / "metrics.json").read_text())
    # the prompts the methods with rounds see (sft=false here): the improver slice (2) and two rounds of 2, batch 2
    assert m["nll/examples"] == 6 and m["nll/steps"] == 3
    assert not list(run.glob("round_[1-9]*")) and not (run / "prepare").exists()
    a = load_model(start_path(), device="cpu", dtype="float32").state_dict()
    final = run / "final"
    b = load_model(str(final), device="cpu", dtype="float32").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sgpo_pairs_rewrite_over_draft(runs):
    run = runs("sgpo")
    for t in (1, 2):
        pol, imp = texts(run / f"round_{t}" / "policy.jsonl"), texts(run / f"round_{t}" / "improver.jsonl")
        ps = pairs_of(run, t)
        assert ps and all(p.chosen == imp[p.record_id] and p.rejected == pol[p.record_id] for p in ps)
    assert_reference(pairs_of(run, 2), str(run / "round_1" / "model"), str(run / "improver" / "model"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spin", "synpo", "dpo", "sgpo", "sft"])
def test_dry_run_counts_what_a_run_does(runs, data, method):
    """No pair is filtered here: pairs and DPO steps are exactly the dry run's upper bounds."""
    assert_dry_run_matches(runs(method), pairs_exact=True)
