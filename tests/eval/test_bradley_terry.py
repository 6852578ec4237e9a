"""Bradley–Terry fit and bootstrap on battles whose answer is known."""
import itertools
import json

import numpy as np
import pandas as pd
import pytest

from sgpo.eval.bradley_terry import BTOptions, bradley_terry, win_rate_from_elo

TRUE_ELO = {"anchor": 1000.0, "p1": 1150.0, "p2": 1040.0, "p3": 870.0}


def _p_first_wins(ra, rb):
    return 1 / (1 + 10 ** ((rb - ra) / 400))


def test_expected_counts_recover_the_true_ratings():
    # With counts equal to their expectations the likelihood equations hold at the true ratings.
    a, b, s, c = [], [], [], []
    for x, y in itertools.combinations(TRUE_ELO, 2):
        p = _p_first_wins(TRUE_ELO[x], TRUE_ELO[y])
        a += [x, x]
        b += [y, y]
        s += [1.0, 0.0]
        c += [100 * p, 100 * (1 - p)]
    fitted = bradley_terry(a, b, s, anchor="anchor", counts=c)
    for name, rating in TRUE_ELO.items():
        assert fitted[name]["rating"] == pytest.approx(rating, abs=1e-6)
        assert fitted[name]["win_rate"] == pytest.approx(100 * _p_first_wins(rating, 1000.0), abs=1e-8)


def test_ties_count_half_a_win():
    only_ties = bradley_terry(["anchor", "x"], ["x", "y"], [0.5, 0.5], anchor="anchor")
    assert only_ties["x"]["rating"] == pytest.approx(1000) and only_ties["y"]["rating"] == pytest.approx(1000)
    # one win, one loss and two ties against the anchor: exactly even
    even = bradley_terry(["anchor"] * 4, ["x"] * 4, [1, 0, 0.5, 0.5], anchor="anchor")
    assert even["x"]["win_rate"] == pytest.approx(50)
    # three wins and one tie: (3 + 1/2) / 4
    ahead = bradley_terry(["anchor"] * 4, ["x"] * 4, [0, 0, 0, 0.5], anchor="anchor")
    assert ahead["x"]["win_rate"] == pytest.approx(100 * 3.5 / 4, abs=1e-7)


def test_star_graph_equals_weighted_win_share():
    rng = np.random.default_rng(3)
    outcome = rng.choice([0.0, 0.5, 1.0], size=300, p=[0.5, 0.2, 0.3])
    weight = rng.choice([1, 3], size=300)
    fitted = bradley_terry(["base"] * 300, ["m"] * 300, 1 - outcome, anchor="base", counts=weight)
    assert fitted["m"]["win_rate"] == pytest.approx(100 * np.sum(weight * outcome) / weight.sum(), abs=1e-7)
    assert fitted["m"]["n_battles"] == weight.sum()
    assert fitted["base"]["rating"] == 1000.0


def test_general_graph_fixture(shared_data):
    folder = shared_data / "arena_hard_v0.1" / "synthetic_bt_fixture"
    rows = [json.loads(line) for line in (folder / "synthetic_battles_general.jsonl").read_text().splitlines()]
    expected = pd.read_csv(folder / "synthetic_battles_general_expected.csv", index_col=0)
    score = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5}
    fitted = bradley_terry([r["model_a"] for r in rows], [r["model_b"] for r in rows],
                           [score[r["winner"]] for r in rows], anchor="gpt-4-0314")
    assert sorted(fitted) == sorted(expected.index)
    for model, row in expected.iterrows():
        assert fitted[model]["rating"] == pytest.approx(row["bt_rating"], abs=1e-3)
        assert fitted[model]["win_rate"] == pytest.approx(row["win_rate_vs_baseline_unrounded"], abs=1e-4)
        assert round(fitted[model]["win_rate"], 2) == pytest.approx(row["score"], abs=1e-9)


def _simulated(n, seed):
    rng = np.random.default_rng(seed)
    players = list(TRUE_ELO)
    pairs = rng.integers(0, len(players), size=(n, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    a = [players[i] for i in pairs[:, 0]]
    b = [players[j] for j in pairs[:, 1]]
    s = [float(rng.random() < _p_first_wins(TRUE_ELO[x], TRUE_ELO[y])) for x, y in zip(a, b)]
    return a, b, s


def test_bootstrap_interval_is_consistent_with_truth_and_normal_width():
    a, b, s = _simulated(4000, seed=11)
    fitted = bradley_terry(a, b, s, anchor="anchor", options=BTOptions(n_boot=200, seed=5))
    for name, rating in TRUE_ELO.items():
        f = fitted[name]
        assert f["rating_low"] <= f["rating"] <= f["rating_high"]
        # the truth lies within ~3 standard errors (1.5 half-widths of a 95% interval)
        assert abs(f["rating"] - rating) <= 1.5 * (f["rating_high"] - f["rating_low"]) / 2
    # star graph: the interval of a win share is close to the normal one, 2 * 1.96 * sqrt(p(1-p)/n)
    n, p = 2000, 0.3
    wins = (np.random.default_rng(2).random(n) < p).astype(float)
    star = bradley_terry(["base"] * n, ["m"] * n, 1 - wins, anchor="base", options=BTOptions(n_boot=400, seed=1))["m"]
    width = star["win_rate_high"] - star["win_rate_low"]
    share = wins.mean()
    assert width == pytest.approx(100 * 2 * 1.96 * np.sqrt(share * (1 - share) / n), rel=0.2)


def test_bootstrap_is_seeded():
    a, b, s = _simulated(500, seed=4)
    one = bradley_terry(a, b, s, anchor="anchor", options=BTOptions(n_boot=30, seed=9))
    same = bradley_terry(a, b, s, anchor="anchor", options=BTOptions(n_boot=30, seed=9))
    other = bradley_terry(a, b, s, anchor="anchor", options=BTOptions(n_boot=30, seed=10))
    assert one == same
    assert one["p1"]["rating_low"] != other["p1"]["rating_low"]


def test_unlinked_player_is_an_error():
    with pytest.raises(ValueError, match="linked"):
        bradley_terry(["anchor", "x"], ["y", "z"], [1.0, 0.5], anchor="anchor")


def test_win_rate_from_elo():
    assert win_rate_from_elo(1000) == pytest.approx(50)
    assert win_rate_from_elo(1400) == pytest.approx(100 * 10 / 11)
