"""Bradley–Terry ratings on the Elo scale, fitted by maximum likelihood, with a bootstrap.

Model: every player m has a strength r_m and P(a beats b) = 1 / (1 + exp(r_b - r_a)). A battle is
(a, b, s) with s = 1 when a won, 0 when b won and 1/2 for a tie (a tie is half a win for each side),
so the log-likelihood is sum over battles of s·log σ(r_a - r_b) + (1 - s)·log σ(r_b - r_a). It is
concave; strengths are identified up to a constant, so the anchor player is pinned at 0 and the
rest are found by Newton's method with step halving. Identical battles are aggregated into counts,
which makes the fit and the bootstrap cheap.

Ratings are reported on the Elo scale used by Arena-Hard: R = 1000 + 400·r / ln 10, so that
P(a beats b) = 1 / (1 + 10^((R_b - R_a)/400)) and the anchor is exactly 1000. The bootstrap
resamples battles with replacement (a multinomial draw of the aggregated counts, which has the
same distribution as resampling rows) and refits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

ELO_SCALE = 400 / np.log(10)
ELO_ANCHOR = 1000.0


@dataclass(frozen=True)
class BTOptions:
    """How ``bradley_terry`` fits: ``n_boot`` bootstrap rounds (0: none) drawn from ``seed`` for a ``level``
    interval; Newton's method (``fit_strengths``) stops after ``max_iter`` iterations or once a step is
    below ``tol``."""
    n_boot: int = 0
    seed: int = 0
    level: float = 0.95
    max_iter: int = 200
    tol: float = 1e-12


def log_expit(x):
    """log σ(x), computed without overflow."""
    return -np.logaddexp(0.0, -x)


def expit(x):
    """σ(x) = 1 / (1 + exp(-x)), computed without overflow."""
    return np.exp(log_expit(x))


def aggregate_battles(model_a: Sequence[str], model_b: Sequence[str], score_a: Sequence[float],
                      counts: Sequence[float] | None = None):
    """Unique (a, b, s) battles with their counts, as index arrays over ``players``."""
    players = list(dict.fromkeys([*model_a, *model_b]))
    index = {p: i for i, p in enumerate(players)}
    keys = np.array([(index[a], index[b], float(s)) for a, b, s in zip(model_a, model_b, score_a)], dtype=float)
    weights = np.ones(len(keys)) if counts is None else np.asarray(counts, dtype=float)
    unique, inverse = np.unique(keys.reshape(-1, 3), axis=0, return_inverse=True)
    totals = np.bincount(inverse.ravel(), weights=weights, minlength=len(unique))
    return players, unique[:, 0].astype(int), unique[:, 1].astype(int), unique[:, 2], totals


def _log_likelihood(r, a, b, s, c):
    d = r[a] - r[b]
    return float(np.sum(c * (s * log_expit(d) + (1 - s) * log_expit(-d))))


def fit_strengths(n_players: int, a: np.ndarray, b: np.ndarray, s: np.ndarray, c: np.ndarray, anchor: int,
                  *, options: BTOptions = BTOptions()) -> np.ndarray:
    """Maximum-likelihood strengths (natural-log odds scale) with ``r[anchor] = 0``.

    Players without any battle get NaN. A player who won (or lost) every battle has an infinite
    strength; the iteration then stops at ``options.max_iter`` with a very large finite value.
    Only ``options.max_iter`` and ``options.tol`` are used here.
    """
    max_iter, tol = options.max_iter, options.tol
    r = np.zeros(n_players)
    present = np.zeros(n_players, bool)
    present[a[c > 0]] = present[b[c > 0]] = True
    free = np.flatnonzero(present & (np.arange(n_players) != anchor))
    if free.size == 0:
        return np.where(present | (np.arange(n_players) == anchor), r, np.nan)
    column = np.full(n_players, -1)
    column[free] = np.arange(free.size)
    ll = _log_likelihood(r, a, b, s, c)
    for _ in range(max_iter):
        d = r[a] - r[b]
        residual = c * (s - expit(d))            # d ll / d d
        curvature = c * expit(d) * expit(-d)     # -d² ll / d d²
        grad = np.zeros(free.size)
        hess = np.zeros((free.size, free.size))
        ia, ib = column[a], column[b]
        for idx, sign in ((ia, 1.0), (ib, -1.0)):
            ok = idx >= 0
            np.add.at(grad, idx[ok], sign * residual[ok])
        for i, j, sign in ((ia, ia, 1.0), (ib, ib, 1.0), (ia, ib, -1.0), (ib, ia, -1.0)):
            ok = (i >= 0) & (j >= 0)
            np.add.at(hess, (i[ok], j[ok]), sign * curvature[ok])
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError as err:
            raise ValueError("every player must be linked to the anchor through battles") from err
        t = 1.0
        while True:  # step halving keeps the likelihood increasing
            trial = r.copy()
            trial[free] += t * step
            trial_ll = _log_likelihood(trial, a, b, s, c)
            if trial_ll >= ll - 1e-12 or t < 1e-8:
                break
            t /= 2
        r, ll = trial, trial_ll
        if np.max(np.abs(t * step)) < tol:
            break
    r[~present] = np.nan
    r[anchor] = 0.0
    return r


def to_elo(strengths: np.ndarray) -> np.ndarray:
    return ELO_ANCHOR + ELO_SCALE * strengths


def win_rate_from_elo(rating: float | np.ndarray, anchor_rating: float = ELO_ANCHOR):
    """Percent chance of beating the anchor: 100 / (1 + 10^((R_anchor - R)/400))."""
    return 100 / (1 + 10 ** ((anchor_rating - np.asarray(rating, float)) / 400))


def bradley_terry(model_a: Sequence[str], model_b: Sequence[str], score_a: Sequence[float], anchor: str,
                  counts: Sequence[float] | None = None, *, options: BTOptions = BTOptions()) -> dict[str, dict]:
    """Elo ratings anchored at ``anchor`` = 1000, each with its win rate (percent) against the anchor.

    ``score_a`` is 1 when ``model_a`` won, 0 when ``model_b`` won, 0.5 for a tie; ``counts`` weights
    rows (e.g. 3 for a strong verdict). With ``options.n_boot`` > 0, ``rating_low``/``rating_high`` are
    the percentiles of the bootstrap ratings for an ``options.level`` interval and ``win_rate_low``/``high``
    the same converted to win rates against the anchor (which stays at 1000 in every round).
    """
    n_boot, seed, level = options.n_boot, options.seed, options.level
    players, a, b, s, c = aggregate_battles(model_a, model_b, score_a, counts)
    if anchor not in players:
        raise ValueError(f"the anchor {anchor!r} has no battles")
    k = players.index(anchor)
    ratings = to_elo(fit_strengths(len(players), a, b, s, c, k, options=options))
    out = {p: {"rating": float(ratings[i]), "win_rate": float(win_rate_from_elo(ratings[i])),
               "n_battles": float(c[(a == i) | (b == i)].sum())} for i, p in enumerate(players)}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(int(round(c.sum())), c / c.sum(), size=n_boot)
        boot = np.array([to_elo(fit_strengths(len(players), a, b, s, draw, k, options=options)) for draw in draws])
        tail = 100 * (1 - level) / 2
        low, high = np.nanpercentile(boot, tail, axis=0), np.nanpercentile(boot, 100 - tail, axis=0)
        for i, p in enumerate(players):
            out[p].update(rating_low=float(low[i]), rating_high=float(high[i]),
                          win_rate_low=float(win_rate_from_elo(low[i])),
                          win_rate_high=float(win_rate_from_elo(high[i])))
    return out
