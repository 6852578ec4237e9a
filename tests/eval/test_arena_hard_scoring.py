"""Arena-Hard scoring (v0.1 Bradley–Terry, v2.0 mean score) and loaders."""
import json
import math

import pandas as pd
import pytest

from sgpo.core.files import iter_jsonl
from sgpo.eval import arena_hard
from sgpo.eval.arena_hard import (leaderboard_from_judgments, load_arena_hard_v01, load_arena_hard_v20,
                                  main_metrics, scores_from_judgments)


def _row(uid, first, second, model="m"):
    games = [None if v is None else {"verdict": v} for v in (first, second)]
    return {"uid": uid, "model": model, "baseline": "base", "games": games}


# game 1: A = baseline, B = model; game 2: A = model, B = baseline
HAND_MADE = [
    _row("q1", "B>>A", "A>B"),    # model: 3 wins, then 1 win
    _row("q2", "A=B", "B>>A"),    # model: 1 tie, then 3 losses
    _row("q3", "B>A", None),      # model: 1 win; second game unusable
    _row("q4", "B<A", "A<<B"),    # mirrored spellings: 1 loss, then 3 losses (v2.0 only)
]


def test_v20_hand_made():
    got = scores_from_judgments(HAND_MADE, version="v2.0", n_boot=0)
    # q3 dropped (a null game); rows: 4 wins, 1 tie, 3 + 1 + 3 losses
    assert got["score"] == pytest.approx(100 * 4.5 / 12)
    assert (got["n"], got["n_battles"]) == (3, 12)
    assert got["ci_low"] == got["ci_high"] == got["score"]
    assert got["baseline"] == "base" and got["ci_level"] == 0.90


def test_v01_hand_made():
    got = scores_from_judgments(HAND_MADE, version="v0.1", n_boot=0)
    # q4's labels are not canonical v0.1 labels: dropped; q3 keeps its first game
    assert got["score"] == pytest.approx(100 * 5.5 / 9, abs=1e-6)
    assert (got["n"], got["n_battles"]) == (3, 9)


def test_v20_bootstrap_percentiles():
    rows = [_row(f"q{i}", "B>A" if i % 3 else "A>B", "A=B") for i in range(60)]
    got = scores_from_judgments(rows, version="v2.0", n_boot=500, seed=1)
    assert got["ci_low"] < got["score"] < got["ci_high"]
    assert got == scores_from_judgments(rows, version="v2.0", n_boot=500, seed=1)
    # 120 rows scoring 1, 0 or 1/2: a 90% interval is about 2 * 1.645 standard errors wide
    values = [1.0 if i % 3 else 0.0 for i in range(60)] + [0.5] * 60
    mean = sum(values) / 120
    se = (sum((v - mean) ** 2 for v in values) / 119 / 120) ** 0.5
    assert got["ci_high"] - got["ci_low"] == pytest.approx(100 * 2 * 1.645 * se, rel=0.2)
    perfect = scores_from_judgments([_row("q", "B>>A", "A>>B")], version="v2.0", n_boot=50)
    assert perfect["score"] == perfect["ci_low"] == perfect["ci_high"] == 100


@pytest.mark.parametrize("version", ["v0.1", "v2.0"])
def test_no_usable_verdict_gives_no_score(version):
    got = scores_from_judgments([_row("q1", "A>A", None), _row("q2", None, None)], version=version, n_boot=10)
    assert math.isnan(got["score"]) and got["n"] == 0 and got["n_battles"] == 0


def test_upstream_field_names_are_read():
    upstream = [{"question_id": r["uid"], "model": "m", "baseline": "base",
                 "games": [g and {"score": g["verdict"], "judgment": "..."} for g in r["games"]]} for r in HAND_MADE]
    for version in ("v0.1", "v2.0"):
        assert scores_from_judgments(upstream, version, n_boot=0) == scores_from_judgments(HAND_MADE, version, n_boot=0)


def test_one_model_expected_and_version_checked():
    two = HAND_MADE + [_row("q1", "A>B", "B>A", model="other")]
    with pytest.raises(ValueError, match="one model"):
        scores_from_judgments(two)
    with pytest.raises(ValueError, match="version"):
        scores_from_judgments(HAND_MADE, version="v3")
    assert set(leaderboard_from_judgments(two, n_boot=0)) == {"m", "other"}


def test_main_metrics_reads_jsonl(tmp_path):
    path = tmp_path / "judgments.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HAND_MADE))
    assert main_metrics(path, "v2.0", n_boot=0)["score"] == pytest.approx(37.5)


@pytest.fixture
def synthetic(shared_data):
    folder = shared_data / "arena_hard_v0.1" / "synthetic_bt_fixture"
    return ([row for _, row in iter_jsonl(folder / "synthetic_judgments.jsonl")],
            pd.read_csv(folder / "synthetic_expected.csv", index_col=0))


def test_synthetic_fixture_v01(synthetic):
    rows, expected = synthetic
    board = leaderboard_from_judgments(rows, version="v0.1", n_boot=300, seed=0)
    worst = {"score": 0.0, "ci": 0.0}
    for model, got in board.items():
        ref = expected.loc[model]
        assert got["score"] == pytest.approx(ref["win_rate_vs_baseline_unrounded"], abs=1e-5)
        assert got["score"] == pytest.approx(ref["weighted_win_share"], abs=1e-5)
        assert round(got["score"], 2) == pytest.approx(ref["score"], abs=1e-9)
        assert got["rating"] == pytest.approx(ref["bt_rating"], abs=1e-3)
        assert got["n_battles"] == ref["n_battle_rows"]
        # upstream's bounds come from 100 pandas resamples: agree up to Monte-Carlo noise
        assert got["ci_low"] == pytest.approx(ref["lower"], abs=1.0)
        assert got["ci_high"] == pytest.approx(ref["upper"], abs=1.0)
        worst["score"] = max(worst["score"], abs(got["score"] - ref["win_rate_vs_baseline_unrounded"]))
        worst["ci"] = max(worst["ci"], abs(got["ci_low"] - ref["lower"]), abs(got["ci_high"] - ref["upper"]))
    print(f"\nsynthetic fixture, largest deviations: score {worst['score']:.2e}, CI bound {worst['ci']:.2f}")


def test_synthetic_fixture_v20_agrees_where_no_game_is_null(synthetic):
    rows, expected = synthetic
    board = leaderboard_from_judgments(rows, version="v2.0", n_boot=0)
    for model in ("synthetic-strong", "synthetic-weak"):  # no null games: the same point estimate as v0.1
        assert board[model]["score"] == pytest.approx(expected.loc[model, "weighted_win_share"], abs=1e-6)
    # models with null games lose the whole question in v2.0
    assert board["synthetic-noisy"]["n"] < 500 and board["synthetic-mid"]["n"] < 500


def test_load_v01_current_and_legacy_formats_agree(shared_data):
    folder = shared_data / "arena_hard_v0.1"
    current = load_arena_hard_v01(folder)
    legacy = load_arena_hard_v01(folder / "legacy_format")
    assert len(current) == 500 and current == legacy
    assert set(current[0]) == {"uid", "prompt", "category", "subcategory", "baseline_answer"}


def test_load_v20_joins_answers_on_uid():
    try:
        questions = load_arena_hard_v20()
    except FileNotFoundError:
        pytest.skip("the package holding Arena-Hard v2.0 is not installed")
    assert len(questions) == 750 and len({q["uid"] for q in questions}) == 750
    answers_path = arena_hard._packaged_v20_dir() / "model_answer" / "o3-mini-2025-01-31.jsonl"
    records = [row for _, row in iter_jsonl(answers_path)]
    assert records[0]["uid"] != questions[0]["uid"]  # the answer file has another order
    by_uid = {r["uid"]: r["messages"][-1]["content"]["answer"] for r in records}
    assert all(q["baseline_answer"] == by_uid[q["uid"]] for q in questions)
