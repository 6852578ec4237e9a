"""The exact judges through the real CLI on the tiny model: the smoke config on `sgpo:verifiable-instructions` with
`ifeval` as the run's judge writes the exact pair figures into every round and the constraint accuracy of every model
into the summary; a user's `python:` scorer as the second judge reports its own figures; the rows' fields come back
from the data when a changed evaluation key makes a finished run recompute its test figures."""
import json

import pytest

from cli_runs import REPO, sgpo

pytestmark = pytest.mark.slow  # runs the CLI in a subprocess

SCORER = '''
def words(prompt, response, row):
    """Larger for answers nearer the reference's length (the row carries the reference as trained)."""
    return -abs(len(response.split()) - len((row["reference"] or "").split()))
'''


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    (root / "length_scorer.py").write_text(SCORER)
    out = root / "run"
    args = ("run", "configs/smoke.yaml", "-o", str(out), "--set", "data.sft=sgpo:verifiable-instructions",
            "--set", "data.max_reference_tokens=48", "--set", "eval.judge=ifeval",
            "--set", "eval.second_judge=python:length_scorer:words")
    res = sgpo(*args, env={"PYTHONPATH": f"{root}:" + str(REPO / "src")})
    assert res.returncode == 0, res.stderr[-3000:]
    return out, args, root, res


def test_every_round_has_exact_pair_figures(exact_run):
    out, *_ = exact_run
    for stage in ("round_1", "round_2"):
        m = json.loads((out / stage / "metrics.json").read_text())
        n = m["pairs/score/n"]
        assert n == m["pairs/kept"]
        if n:
            shares = m["pairs/score/chosen_better"] + m["pairs/score/tie"] + m["pairs/score/rejected_better"]
            assert shares == pytest.approx(1.0) and -1 <= m["pairs/score/margin"] <= 1
    improver = json.loads((out / "improver" / "metrics.json").read_text())
    assert improver["improver/score/targets/n"] > 0
    # the rewrites are scored by the run's judge (ifeval) even under reading B: a program is not swayed by the
    # reference, so the second judge (here the python scorer) need not stand in for it
    assert improver["improver/score/rewrites/n"] == 4  # eval.improver_size of the smoke config
    assert {k: improver[f"improver/score/rewrites/{k}"] for k in ("better", "tie", "worse", "margin")} == \
        _ifeval_rewrite_shares(out / "improver")


def _ifeval_rewrite_shares(folder):
    """The improver's development rewrites against their drafts, scored here by IFEval's checkers."""
    from sgpo.data.records import load_records
    from sgpo.eval.judges import make_judge
    from sgpo.eval.winrate import score_shares

    read = lambda name: {r["id"]: r["text"] for r in map(json.loads, (folder / name).read_text().splitlines())}  # noqa
    rewrites, drafts = read("dev_improver.jsonl"), read("dev_policy.jsonl")
    records = {r.id: r for r in load_records("sgpo:verifiable-instructions", need="reference")[0]}
    ids = list(rewrites)
    judge, rows = make_judge("ifeval"), [records[i].row() for i in ids]
    prompts = [records[i].prompt_text for i in ids]
    m = score_shares("", judge.score(prompts, [rewrites[i] for i in ids], rows),
                     judge.score(prompts, [drafts[i] for i in ids], rows), ("better", "tie", "worse"))
    return {k: m[k] for k in ("better", "tie", "worse", "margin")}


def test_the_summary_has_every_model_s_constraint_accuracy_and_the_python_judge_s(exact_run):
    out, *_ = exact_run
    s = json.loads((out / "summary.json").read_text())
    for label in ("start", "pre_rounds", "final"):
        key = f"eval/test/ifeval/score_{label}"
        assert s[key + "_n"] == 8 and s[key + "_ci_low"] <= s[key] <= s[key + "_ci_high"]
        assert 0 <= s[f"eval/test/ifeval/perfect_{label}"] <= s[key] <= 1
        assert s[f"eval/test/ifeval/constraints_{label}_n"] == 8
        assert f"eval/test/python_length_scorer_words/score_{label}" in s
    # constraint level: the share of all the test rows' constraints the final answers meet, by IFEval's checkers
    from sgpo.data.records import load_records
    from sgpo.eval.held_out import saved_answers
    from sgpo.eval.judges import make_judge

    final = saved_answers(out / "test")["final"]
    records = {r.id: r for r in load_records("sgpo:verifiable-instructions", need="reference")[0]}
    ids = sorted(final)
    met = make_judge("ifeval").followed([records[i].prompt_text for i in ids], [final[i] for i in ids],
                                        [records[i].row() for i in ids])
    assert s["eval/test/ifeval/constraints_final"] == pytest.approx(sum(map(sum, met)) / sum(map(len, met)))
    assert "eval/test/python_length_scorer_words/win_rate_vs_start" in s


def test_recomputed_test_figures_read_the_rows_again(exact_run):
    """A changed evaluation key recomputes the test figures of a finished run from its saved answers and the rows as
    the data gives them again: the exact figures come out the same."""
    out, args, root, _ = exact_run
    before = json.loads((out / "summary.json").read_text())
    res = sgpo(*args, "--set", "eval.agreement_size=499",
               env={"PYTHONPATH": f"{root}:" + str(REPO / "src")})
    assert res.returncode == 0, res.stderr[-3000:]
    after = json.loads((out / "summary.json").read_text())
    keys = [k for k in before if k.startswith("eval/test/ifeval/")]
    assert keys and {k: after[k] for k in keys} == {k: before[k] for k in keys}
