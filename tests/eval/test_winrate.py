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


def test_paired_difference_uses_the_pairing():
    from sgpo.eval.winrate import paired_difference

    a = [1.0, 0.0] * 50
    b = [0.0, 0.0] * 50
    d = paired_difference(a, b)
    assert d["diff"] == 0.5 and d["n"] == 100 and d["ci_low"] < 0.5 < d["ci_high"]
    # two models that pass and fail on the same prompts: identical scores, a zero-width interval at 0
    same = paired_difference(a, a)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0
    # one extra success in 100 paired prompts: the interval includes 0
    tiny = paired_difference([1.0] + [0.0] * 99, [0.0] * 100)
    assert tiny["ci_low"] <= 0 < tiny["ci_high"]


def test_a_figure_over_no_items_reads_none():
    from sgpo.eval.winrate import format_win_rate

    assert format_win_rate(win_rate([])) == "none (n=0)"
    assert format_win_rate(win_rate([1.0, 0.0])).endswith("n=2]")
