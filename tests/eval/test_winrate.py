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


def test_weights_give_the_constraint_level_mean_and_resample_with_their_items():
    """Per-prompt shares weighted by each prompt's number of constraints: the share of all constraints met. A prompt
    with two constraints both met and one with one constraint missed: 2/3, where the unweighted mean says 1/2."""
    from sgpo.eval.winrate import paired_difference

    w = win_rate([1.0, 0.0] * 50, weights=[2, 1] * 50, n_boot=500)
    assert w["win_rate"] == 2 / 3 and w["n"] == 100 and w["ci_low"] < 2 / 3 < w["ci_high"]
    assert win_rate([1.0, float("nan"), 0.0], weights=[2, 5, 1])["win_rate"] == 2 / 3  # a failed item, weight and all
    d = paired_difference([1.0, 0.5] * 50, [0.0, 0.5] * 50, weights=[1, 2] * 50)
    assert d["diff"] == 1 / 3 and d["ci_low"] < 1 / 3 < d["ci_high"]
    assert paired_difference([1.0, 0.5], [0.0, 0.5], weights=[1, 1]) == paired_difference([1.0, 0.5], [0.0, 0.5])
