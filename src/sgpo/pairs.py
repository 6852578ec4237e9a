"""Preference pairs: build, filter with counted reasons, save."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from .improver import word_edit_distance


@dataclass
class Pair:
    record_id: str
    prompt: list[dict]           # chat messages (policy mode) the pair is scored under
    chosen: str
    rejected: str
    chosen_finished: bool = True
    rejected_finished: bool = True
    meta: dict = field(default_factory=dict)
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Pair":
        return cls(**d)


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def drop_reason(p: Pair, require_eos: bool) -> str | None:
    """Why a pair is degenerate, or None when it is kept."""
    if not normalise(p.chosen):
        return "empty_chosen"
    if not normalise(p.rejected):
        return "empty_rejected"
    if normalise(p.chosen) == normalise(p.rejected):
        return "equal"
    if require_eos and not p.chosen_finished:
        return "chosen_cut_off"
    if require_eos and not p.rejected_finished:
        return "rejected_cut_off"
    return None


def filter_pairs(pairs: list[Pair], require_eos: bool) -> tuple[list[Pair], Counter]:
    kept, dropped = [], Counter()
    for p in pairs:
        why = drop_reason(p, require_eos)
        if why:
            dropped[why] += 1
        else:
            kept.append(p)
    return kept, dropped


def pair_metrics(kept: list[Pair], dropped: Counter) -> dict:
    """The pairs/* and lengths/* metrics of a round (lengths in words)."""
    m = {"pairs/kept": len(kept)}
    for why in ("equal", "empty_chosen", "empty_rejected", "chosen_cut_off", "rejected_cut_off", "not_verified"):
        m[f"pairs/dropped/{why}"] = dropped.get(why, 0)
    if kept:
        m["lengths/chosen"] = sum(len(p.chosen.split()) for p in kept) / len(kept)
        m["lengths/rejected"] = sum(len(p.rejected.split()) for p in kept) / len(kept)
        m["pairs/edit_distance"] = sum(word_edit_distance(p.chosen, p.rejected) for p in kept) / len(kept)
    return m
