import math

from sgpo.eval.winrate import win_rate


def test_ties_count_half_and_ci_brackets_the_mean():
    w = win_rate([1, 1, 0, 0.5] * 25, n_boot=500)
    assert w["win_rate"] == 0.625 and w["n"] == 100
    assert w["ci_low"] < 0.625 < w["ci_high"] and w["ci_high"] - w["ci_low"] < 0.25


def test_failed_annotations_are_dropped_and_counted():
    w = win_rate([1.0, float("nan"), None, 0.0])
    assert w["win_rate"] == 0.5 and w["n"] == 2 and w["failed"] == 2
    assert math.isnan(win_rate([])["win_rate"])
