"""The judge-agreement benchmark (pairs, agreement maths) and the reference-free LM judge on a tiny random model."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from sgpo.eval.judge_lm import NULL_CONTEXT, PROMPT_CONTEXT, LMJudge
from sgpo.eval.judges import make_judge
from sgpo.models.loading import ModelError, resolve

REPO = Path(__file__).resolve().parents[2]


def _load_benchmark():
    sys.path.insert(0, str(REPO / "benchmarks"))  # it imports its sibling _common
    spec = importlib.util.spec_from_file_location("judge_agreement", REPO / "benchmarks" / "judge_agreement.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ja = _load_benchmark()

# preference per (model, instruction): > 1.5 beat the baseline, < 1.5 lost, 1.5 / 0 a draw
PREFS = {"m1": [2.0, 1.9, 1.0, 1.5, 1.2, 1.8], "m2": [1.0, 1.1, 1.0, 1.7, 1.6, 1.0], "m3": [1.2, 0, 1.0, 1.0, 1.9, 1.1]}
OUTPUTS = {  # m1 and m2 have equal lengths on instruction 0; m3's are longer
    "m1": ["good answer"] * 6, "m2": ["poor answer"] * 6, "m3": ["a much longer answer than the others"] * 6}


@pytest.fixture
def annotations_dir(tmp_path):
    for model, prefs in PREFS.items():
        records = [{"instruction": f"question {i}", "output_1": f"baseline {i}", "output_2": OUTPUTS[model][i],
                    "preference": p} for i, p in enumerate(prefs)]
        (tmp_path / f"{model}.annotations.json").write_text(json.dumps(records))
    return tmp_path


def test_candidates_are_decisive_cross_model_pairs(annotations_dir):
    ann = ja.load_annotations(annotations_dir)
    assert sorted(ann) == ["m1", "m2", "m3"]
    assert ja.candidates(ann, 0) == [("m1", "m2"), ("m1", "m3")]
    assert ja.candidates(ann, 1) == [("m1", "m2")]  # m3's legacy 0 is a draw, not a loss
    assert ja.candidates(ann, 2) == []              # nobody beat the baseline
    assert ja.candidates(ann, 3) == [("m2", "m3")]  # m1's 1.5 is a draw


def test_build_pairs_labels_halves_and_strata(annotations_dir):
    ann = ja.load_annotations(annotations_dir)
    sample = ja.build_pairs(ann, seed=3, n_all=10, n_matched=10)
    seen = {h: {p.index for s in strata.values() for p in s} for h, strata in sample.items()}
    assert not seen["tuning"] & seen["heldout"]
    pairs = [p for strata in sample.values() for s in strata.values() for p in s]
    assert {p.index for p in pairs} <= {0, 1, 3, 4, 5}
    for p in pairs:
        winner = p.model_a if p.label == 1 else p.model_b
        loser = p.model_b if p.label == 1 else p.model_a
        assert (winner, loser) in ja.candidates(ann, p.index)
        assert p.a == OUTPUTS[p.model_a][p.index] and p.reference == f"baseline {p.index}"
        assert p.matched == ja.length_matched(p.a, p.b)
    assert all(p.matched for strata in sample.values() for p in strata["matched"])
    assert ja.build_pairs(ann, seed=3, n_all=10, n_matched=10) == sample  # fixed by the seed
    small = ja.build_pairs(ann, seed=3, n_all=1, n_matched=1)
    for half in sample:  # a smaller sample is the start of a larger one
        assert small[half]["all"] == sample[half]["all"][:1]


def test_length_matched_definition():
    assert ja.length_matched("x" * 100, "y" * 90) and ja.length_matched("x" * 90, "y" * 100)
    assert not ja.length_matched("x" * 100, "y" * 89)
    assert ja.length_matched("", "")


def test_credits_and_bootstrap():
    assert ja.credits([1.0, 0.0, 0.5, float("nan"), 0.8], [1, 1, 0, 1, 0]) == [1.0, 0.0, 0.5, 0.5, 0.0]
    values = [1.0] * 70 + [0.0] * 30
    s = ja.summarise(values, resamples=500)
    assert s["n"] == 100 and s["agreement"] == pytest.approx(0.7)
    lo, hi = s["ci95"]
    assert 0.58 < lo < 0.7 < hi < 0.82
    assert ja.bootstrap_ci([1.0] * 10, resamples=100) == (1.0, 1.0)


class _LongerWins:
    """A stub judge: prefers the longer candidate."""

    spec = "stub"

    def prefer(self, prompts, a, b, references=None):
        return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]


def _pairs_where_winner_is_longer(n=40, swap=False):
    out = []
    for i in range(n):
        good, bad = "a careful complete answer " + "x" * (i % 7), "short"
        if i % 9 == 0:  # a few where the judge is wrong
            good, bad = bad, good
        first_good = (i % 2 == 0) != swap
        a, b = (good, bad) if first_good else (bad, good)
        label = 1 if (i % 2 == 0) else 0  # GPT-4's call does not change when the texts are swapped
        out.append(ja.Pair(i, f"q{i}", a, b, label, "ma", "mb", "ref", False))
    return out


def test_a_right_judge_agrees_and_a_swapped_one_disagrees():
    def labels(ps):
        return [p.label for p in ps]

    right = _pairs_where_winner_is_longer()
    prefs, _ = ja.judge_preferences(_LongerWins(), right, log=lambda *_: None)
    assert ja.summarise(ja.credits(prefs, labels(right)), resamples=200)["agreement"] > 0.8
    wrong = _pairs_where_winner_is_longer(swap=True)
    prefs, _ = ja.judge_preferences(_LongerWins(), wrong, log=lambda *_: None)
    assert ja.summarise(ja.credits(prefs, labels(wrong)), resamples=200)["agreement"] < 0.2
    assert ja.credits(ja.length_preferences(right), labels(right)) == ja.credits(
        _LongerWins().prefer(None, [p.a for p in right], [p.b for p in right]), labels(right))


def test_shared_alpaca_eval_pairs(shared_data):
    ann = ja.load_annotations(shared_data / "alpaca_eval")
    sample = ja.build_pairs(ann, seed=0, n_all=50, n_matched=50)
    for half in ("tuning", "heldout"):
        assert len(sample[half]["all"]) == len(sample[half]["matched"]) == 50
        ratio = [len(p.a) / len(p.b) for p in sample[half]["matched"]]
        assert all(1 / 1.12 < r < 1.12 for r in ratio)
    allp = sample["tuning"]["all"] + sample["heldout"]["all"]
    # GPT-4 Turbo's length bias: the longer output wins most decisive pairs
    assert ja.summarise(ja.credits(ja.length_preferences(allp), [p.label for p in allp]))["agreement"] > 0.7


# --- the LM judge on a tiny random model (the interface, not its quality) ---

PROMPTS = ["Name a colour.", "What is the capital of France?", "Say hi."]
A = ["Blue.", "Paris is the capital of France.", "Hello there, friend!"]
B = ["I like turtles and long walks.", "Lyon.", "hi"]


@pytest.fixture(scope="module")
def lm_judge():
    return LMJudge("sgpo:tiny-random", score="pmi", device="cpu", dtype="float32")


def test_lm_judge_prefer_interface(lm_judge):
    ab = lm_judge.prefer(PROMPTS, A, B)
    ba = lm_judge.prefer(PROMPTS, B, A, references=["ignored"] * 3)
    assert all(p in (0.0, 1.0) for p in ab)
    assert [x + y for x, y in zip(ab, ba)] == [1.0] * 3
    assert lm_judge.prefer(PROMPTS, A, A) == [0.5] * 3
    assert lm_judge.prefer(PROMPTS, ["", "x", "y"], ["", "x", "z"])[:2] == [0.5, 0.5]
    with pytest.raises(ValueError):
        lm_judge.prefer(PROMPTS, A, B[:2])


def test_lm_scorer_matches_full_logits_in_any_chunk(lm_judge):
    scorer = lm_judge.scorer
    context = PROMPT_CONTEXT.replace("{instruction}", PROMPTS[1])
    scorer.memo.clear()
    total, n = scorer.logprob(context, A[1])
    ctx = scorer.tokenizer.encode(context)
    ids = ctx + scorer.tokenizer.encode(A[1], add_special_tokens=False)
    with torch.inference_mode():
        logp = torch.log_softmax(scorer.model(torch.tensor([ids])).logits[0].float(), -1)
    by_hand = sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))
    assert n == len(ids) - len(ctx) and total == pytest.approx(by_hand, abs=1e-3)
    chunk, scorer.chunk = scorer.chunk, 2
    try:
        scorer.memo.clear()
        assert scorer.logprob(context, A[1])[0] == pytest.approx(total, abs=1e-3)
    finally:
        scorer.chunk = chunk


def test_lm_scorer_batches_give_each_item_s_own_score(lm_judge):
    """Items of different lengths scored together (right padding, batches cut by ``positions``) get the scores
    they get alone; an empty response is (0, 0); repeated items are scored once."""
    scorer = lm_judge.scorer
    items = [(PROMPT_CONTEXT.replace("{instruction}", p), r) for p in PROMPTS for r in A + B + [""]]
    items += items[:3]
    positions = scorer.positions
    try:
        scorer.memo.clear()
        scorer.positions = 0  # one item per forward
        alone = scorer.logprobs(items)
        encoded = [scorer._encode(*k) for k in dict.fromkeys(items) if k[1]]
        scorer.positions = 64
        batches = scorer._batches(encoded)
        assert any(len(b) > 1 for b in batches)
        assert all(len(b) * max(sum(map(len, encoded[i])) for i in b) <= 64 for b in batches if len(b) > 1)
        assert sorted(i for b in batches for i in b) == list(range(len(encoded)))
        scorer.memo.clear()
        together = scorer.logprobs(items)
        assert len(scorer.memo) == len(set(items))
    finally:
        scorer.positions = positions
    assert [n for _, n in together] == [n for _, n in alone]
    assert [t for t, _ in together] == pytest.approx([t for t, _ in alone], abs=1e-4)
    assert together[len(A + B)] == (0.0, 0)


def test_lm_scores_and_shared_scorer(lm_judge):
    fluency = make_judge("lm-fluency:sgpo:tiny-random", device="cpu", dtype="float32")
    assert fluency.scorer is lm_judge.scorer  # one model, one memo
    s = lm_judge.scorer
    c, n = s.logprob(PROMPT_CONTEXT.replace("{instruction}", PROMPTS[0]), A[0])
    u, _ = s.logprob(NULL_CONTEXT, A[0])
    assert fluency.scores(PROMPTS[:1], A[:1]) == [pytest.approx(c / n)]
    assert lm_judge.scores(PROMPTS[:1], A[:1]) == [pytest.approx((c - u) / n)]
    default = make_judge("lm:sgpo:tiny-random", device="cpu", dtype="float32")
    assert default.spec == "lm:sgpo:tiny-random" and default.score_name == "surprisal"
    assert default.cache_id != fluency.cache_id
    assert default.scores(PROMPTS, A) == [pytest.approx(-x) for x in fluency.scores(PROMPTS, A)]
    assert default.prefer(PROMPTS, A, B) == [1.0 - x for x in fluency.prefer(PROMPTS, A, B)]
    long_text = "word " * 1000
    assert lm_judge.scores(["p"], [long_text]) == lm_judge.scores(["p"], [long_text[:1500]])
    with pytest.raises(ValueError):
        make_judge("lm-nonsense:sgpo:tiny-random")
    with pytest.raises(ValueError):
        make_judge("lm:")


def test_embedded_gemma_is_a_known_name():
    with pytest.raises(ModelError, match="sgpo:gemma-3-270m"):
        resolve("sgpo:no-such-model")


def test_close_releases_the_shared_model():
    from sgpo.eval import judge_lm

    judge = judge_lm.LMJudge("sgpo:tiny-random", score="fluency", device="cpu", dtype="float32")
    scorer = judge.scorer
    assert scorer in judge_lm._SCORERS.values()
    judge.close()
    assert scorer not in judge_lm._SCORERS.values() and judge.scorer is None
