"""Preference pairs: build, gate with counted reasons (``pairs/dropped/<reason>``), save and resume a round's pairs."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import PairsConfig
from .files import read_jsonl, write_jsonl
from .generation import Generation
from .text import normalise, word_edit_distance


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

    @classmethod
    def of(cls, record, chosen: Generation, rejected: Generation, **meta) -> "Pair":
        """A pair of two generations for ``record``, scored under its policy-mode prompt."""
        from .templates import policy_messages

        return cls(record.id, policy_messages(record.prompt), chosen.text, rejected.text, chosen.finished,
                   rejected.finished, meta)


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


def filter_pairs(pairs: list[Pair], cfg: PairsConfig) -> tuple[list[Pair], Counter]:
    """The pairs that pass every gate, and the count of those dropped per reason."""
    kept, dropped = [], Counter()
    for p in pairs:
        why = drop_reason(p, cfg.require_eos)
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


def verify(pairs: list[Pair], judge_spec: str) -> tuple[list[Pair], int]:
    """``pairs.verify``: keep the pairs the judge prefers chosen over rejected; returns them and how many it dropped."""
    if not judge_spec or not pairs:
        return pairs, 0
    from .eval.judges import make_judge

    prefs = make_judge(judge_spec).prefer([p.prompt[-1]["content"] for p in pairs], [p.chosen for p in pairs],
                                          [p.rejected for p in pairs], None)
    kept = [p for p, x in zip(pairs, prefs) if x > 0.5]
    return kept, len(pairs) - len(kept)


def save_round(folder: Path, pairs: list[Pair], metrics: dict) -> None:
    """A round's gated pairs with their reference log-probs, and the pair metrics (``pair_stats.jsonl`` first: a round
    is resumed from its pairs only when both are there)."""
    write_jsonl(folder / "pair_stats.jsonl", [metrics])
    write_jsonl(folder / "pairs.jsonl", [p.to_json() for p in pairs])


def saved_round(folder: Path) -> tuple[list[Pair] | None, dict]:
    """What ``save_round`` wrote, or (None, {}) when the round has not got that far."""
    if not (folder / "pairs.jsonl").exists():
        return None, {}
    pairs = [Pair.from_json(d) for d in read_jsonl(folder / "pairs.jsonl")]
    return pairs, dict(read_jsonl(folder / "pair_stats.jsonl")[0])
