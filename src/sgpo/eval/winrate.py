"""Win rates with a bootstrap confidence interval (ties count half)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def win_rate(preferences: Sequence[float], *, weights: Sequence[float] | None = None, n_boot: int = 2000,
             seed: int = 0, level: float = 0.95) -> dict:
    """Mean preference (1 win, 0.5 tie, 0 loss) with a percentile bootstrap CI over prompts.

    Failed annotations (None / NaN) are left out and counted in ``failed``. With ``weights`` (one per item) the mean
    is weighted and the bootstrap resamples (value, weight) together: the constraint-level accuracy of per-prompt
    shares, weighted by each prompt's number of constraints.
    Returns ``{"win_rate", "ci_low", "ci_high", "n", "failed"}``, rates in [0, 1]; NaN when no prompt is left.
    """
    p = np.asarray([np.nan if x is None else x for x in preferences], dtype=float)
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=float)
    failed = int(np.isnan(p).sum())
    p, w = p[~np.isnan(p)], w[~np.isnan(p)]
    n = len(p)
    if n == 0:
        return {"win_rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0, "failed": failed}
    lo, hi = _bootstrap(p, w, n_boot, seed, level)
    return {"win_rate": float((p * w).sum() / w.sum()), "ci_low": lo, "ci_high": hi, "n": n, "failed": failed}


def _bootstrap(values: np.ndarray, weights: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile bootstrap CI of the weighted mean, resampling items."""
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    boot = (values[idx] * weights[idx]).sum(1) / weights[idx].sum(1)
    alpha = (1 - level) / 2
    return float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))


def paired_difference(a: Sequence[float], b: Sequence[float], *, weights: Sequence[float] | None = None,
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``a - b`` over paired items (the same prompts) with a percentile bootstrap CI that resamples prompts,
    so both models' scores move together; weighted by ``weights`` when given (``win_rate``'s constraint level).
    Returns ``{"diff", "ci_low", "ci_high", "n"}``."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=float)
    n = len(d)
    if n == 0:
        return {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    lo, hi = _bootstrap(d, w, n_boot, seed, level)
    return {"diff": float((d * w).sum() / w.sum()), "ci_low": lo, "ci_high": hi, "n": n}


def format_difference(d: dict) -> str:
    """``+2.7 [-0.8, +6.0]``: a ``paired_difference`` in points with its CI."""
    return f"{100 * d['diff']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def format_metric(m: dict, key: str) -> str:
    """``format_win_rate`` of the win rate stored in a metrics dict as ``key`` with ``_ci_low``/``_ci_high``/``_n``."""
    return format_win_rate({"win_rate": m[key], "ci_low": m[key + "_ci_low"], "ci_high": m[key + "_ci_high"],
                            "n": m[key + "_n"]})


def format_win_rate(w: dict) -> str:
    """``51.2% [95% CI 44.0–58.4, n=200]``; a figure over no items (every annotation failed, a slice of size 0) reads
    ``none (n=0)``."""
    if not w.get("n"):
        return "none (n=0)"
    return f"{100 * w['win_rate']:.1f}% [95% CI {100 * w['ci_low']:.1f}–{100 * w['ci_high']:.1f}, n={w['n']}]"


def score_shares(prefix: str, a: Sequence[float], b: Sequence[float], names: tuple[str, str, str]) -> dict:
    """Over the items both scores of which are known (not NaN): the shares where ``a`` scores higher, equal, lower
    than ``b`` (``names``), the mean margin a − b, and n."""
    scored = [(x, y) for x, y in zip(a, b) if x == x and y == y]
    n = len(scored)
    m = {f"{prefix}n": n}
    if n:
        m[prefix + names[0]] = sum(a > b for a, b in scored) / n
        m[prefix + names[1]] = sum(a == b for a, b in scored) / n
        m[prefix + names[2]] = sum(a < b for a, b in scored) / n
        m[prefix + "margin"] = sum(a - b for a, b in scored) / n
    return m
