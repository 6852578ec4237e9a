"""Improver figures: does the improver role turn drafts into better answers?

Given drafts and their rewrites on held-out prompts (with references for the judge), report:
``improver/changed_rate``   rewrites that differ from the draft after whitespace normalisation
``improver/edit_distance``  mean word-level edit distance rewrite ↔ draft
``improver/win_rate``       the judge's preference for rewrite over draft (ties half; an unchanged rewrite is a tie)
                            + ``_ci_low/_ci_high/_n``
``improver/length_change``  mean (rewrite words - draft words) / draft words
``improver/win_rate_len20`` the win rate restricted to rewrites within ±20% of the draft's length (+ CI, n)

With ``judge=None`` only the judge-free figures are computed (changed rate, edit distance, length change).
"""
from __future__ import annotations

from typing import Sequence

from ..improver import word_edit_distance
from ..pairs import normalise
from .winrate import win_rate


def improver_figures(judge, prompts: Sequence[str], drafts: Sequence[str], rewrites: Sequence[str],
                     references: Sequence[str] | None, prefix: str = "improver/") -> dict:
    n = len(drafts)
    if n == 0:
        return {}
    changed = [normalise(a) != normalise(b) for a, b in zip(drafts, rewrites)]
    rel = [(len(w.split()) - len(d.split())) / max(1, len(d.split())) for d, w in zip(drafts, rewrites)]
    out = {
        f"{prefix}changed_rate": sum(changed) / n,
        f"{prefix}edit_distance": sum(word_edit_distance(d, w) for d, w in zip(drafts, rewrites)) / n,
        f"{prefix}length_change": sum(rel) / n,
    }
    if judge is None:
        return out
    # a rewrite that only changes whitespace is the draft: a tie, whatever the judge makes of it
    prefs = [0.5 if not c else p for c, p in zip(changed, judge.prefer(prompts, rewrites, drafts, references))]
    out.update(_wr(prefix + "win_rate", prefs))
    out.update(_wr(prefix + "win_rate_len20", [p for p, r in zip(prefs, rel) if abs(r) <= 0.2]))
    return out


def _wr(name: str, prefs: list[float]) -> dict:
    w = win_rate(prefs)
    return {name: w["win_rate"], f"{name}_ci_low": w["ci_low"], f"{name}_ci_high": w["ci_high"], f"{name}_n": w["n"]}
