"""Preference pairs: build, gate with counted reasons (``pairs/dropped/<reason>``, the gates are in ``gates.py``),
measure, save and resume a round's pairs."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sgpo.core.files import read_jsonl, write_jsonl
from sgpo.methods.gates import REASONS, Gates, TemplateMarkers, echo_added
from sgpo.generation.engine import Generation
from sgpo.core.text import normalise, word_edit_distance


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

    @property
    def request(self) -> str:
        """The last user turn: the request both sides answer."""
        return self.prompt[-1]["content"]

    def to_json(self) -> dict:
        return dict(vars(self))  # shallow: dataclasses.asdict deep-copies every prompt (seconds for 10k pairs)

    @classmethod
    def from_json(cls, d: dict) -> "Pair":
        return cls(**d)

    @classmethod
    def of(cls, record, chosen: Generation | str, rejected: Generation | str, /, **meta) -> "Pair":
        """A pair of two responses to ``record``, scored under its policy-mode prompt; ``meta`` as given (keys
        ``chosen`` and ``rejected`` included). A side is a generation, or a text that is complete (a reference)."""
        from sgpo.models.templates import policy_messages

        (c, c_done), (r, r_done) = _side(chosen), _side(rejected)
        return cls(record.id, policy_messages(record.prompt), c, r, c_done, r_done, meta)


def _side(x: Generation | str) -> tuple[str, bool]:
    """A pair side's (text, finished): a text given as such is complete."""
    return (x, True) if isinstance(x, str) else (x.text, x.finished)


def filter_pairs(pairs: list[Pair], gates: Gates, references: dict[str, str] | None = None
                 ) -> tuple[list[Pair], Counter]:
    """The pairs that pass every gate (``gates.py``), and the count of those dropped per reason. Every pair's verdict
    is kept in its ``meta["dropped"]`` (None when kept), so a round's candidates can be read with their reasons.
    ``references`` (SFT references by record id) let the echo gate keep a side that restates the request as its
    reference does."""
    kept, dropped, refs = [], Counter(), references or {}
    for p in pairs:
        why = gates.drop_reason(p.request, p.chosen, p.rejected, p.chosen_finished, p.rejected_finished,
                                refs.get(p.record_id, ""))
        p.meta["dropped"] = why
        if why:
            dropped[why] += 1
        else:
            kept.append(p)
    return kept, dropped


def candidate_metrics(candidates: list[Pair], markers: TemplateMarkers, references: dict[str, str] | None = None
                      ) -> dict:
    """Before the gates, among all chosen sides (the rewrites, for SGPO): how often they differ from the rejected side
    (the draft), leak the improver template, and echo the request where neither the draft nor the reference does."""
    n, refs = len(candidates), references or {}
    if not n:
        return {}
    leak = sum(markers.leaks(p.chosen) for p in candidates)
    echo = sum(echo_added(p.request, p.chosen, p.rejected, refs.get(p.record_id, "")) for p in candidates)
    changed = sum(normalise(p.chosen) != normalise(p.rejected) for p in candidates)
    return {"pairs/candidates": n, "improver/changed_rate": changed / n, "improver/template_leak_rate": leak / n,
            "improver/echo_rate": echo / n}


def pair_metrics(kept: list[Pair], dropped: Counter) -> dict:
    """The pairs/* and lengths/* metrics of a round (lengths in words)."""
    m = {"pairs/kept": len(kept)}
    for why in (*REASONS, "not_verified"):
        m[f"pairs/dropped/{why}"] = dropped.get(why, 0)
    if kept:
        n = len(kept)
        m["lengths/chosen"] = sum(len(p.chosen.split()) for p in kept) / n
        m["lengths/rejected"] = sum(len(p.rejected.split()) for p in kept) / n
        m["pairs/chosen_finished_rate"] = sum(p.chosen_finished for p in kept) / n
        m["pairs/rejected_finished_rate"] = sum(p.rejected_finished for p in kept) / n
        m["pairs/edit_distance"] = sum(word_edit_distance(p.chosen, p.rejected) for p in kept) / n
    return m


def judge_agreement(pairs: list[Pair], judge, references: dict[str, str] | None = None,
                    rows: dict[str, dict] | None = None) -> dict:
    """``pairs/judge_agreement``: how often ``judge`` (never one that selected the pairs) prefers chosen over
    rejected, ties half, with its bootstrap CI and n. ``references`` and ``rows`` (``Record.row()``) by record id for
    judges that need them (given when every pair has one)."""
    if not pairs or judge is None:
        return {}
    from sgpo.eval.improver import win_rate_metrics

    return win_rate_metrics("pairs/judge_agreement", [x for x in _prefer(judge, pairs, references, rows) if x == x])


def _prefer(judge, pairs: list[Pair], references: dict | None, rows: dict | None) -> list[float]:
    """The judge's preference for each pair's chosen side, with the pairs' references and rows when all have them."""
    from sgpo.eval.base import prefer

    given = getattr(judge, "reads_reference", False) and references
    refs = [references[p.record_id] for p in pairs] if given and all(references.get(p.record_id) for p in pairs) else None
    got = [rows[p.record_id] for p in pairs] if rows and all(p.record_id in rows for p in pairs) else None
    return prefer(judge, [p.request for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs], refs, got)


def verify(pairs: list[Pair], judge, references: dict[str, str] | None = None,
           rows: dict[str, dict] | None = None) -> tuple[list[Pair], int]:
    """``pairs.verify``: keep the pairs ``judge`` (None: off) prefers chosen over rejected; returns them and how many
    it dropped. A dropped pair's ``meta["dropped"]`` says ``not_verified``."""
    if judge is None or not pairs:
        return pairs, 0
    prefs = _prefer(judge, pairs, references, rows)
    kept = [p for p, x in zip(pairs, prefs) if x > 0.5]
    for p, x in zip(pairs, prefs):
        if not x > 0.5:
            p.meta["dropped"] = "not_verified"
    return kept, len(pairs) - len(kept)


def score_metrics(judge, candidates: list[Pair], rows: dict[str, dict]) -> dict:
    """With a scorer as the run's judge (``ifeval``, ``python:``, a reward model): how the kept pairs' sides score —
    ``pairs/score/chosen_better``, ``_tie``, ``_rejected_better`` (shares), ``pairs/score/margin`` (mean chosen minus
    rejected score) — and the same under ``pairs/score/dropped/`` for the pairs a gate (or ``pairs.verify``) dropped.
    Nothing for other judges, or when some pair has no row."""
    if judge is None or not getattr(judge, "gives_scores", False) or not candidates:
        return {}
    if not all(p.record_id in rows for p in candidates):
        return {}
    got = [rows[p.record_id] for p in candidates]
    prompts = [p.request for p in candidates]
    chosen = judge.score(prompts, [p.chosen for p in candidates], got)
    rejected = judge.score(prompts, [p.rejected for p in candidates], got)
    from sgpo.eval.winrate import score_shares

    m = {}
    for prefix, keep in (("pairs/score/", True), ("pairs/score/dropped/", False)):
        part = [i for i, p in enumerate(candidates) if (not p.meta.get("dropped")) == keep]
        m.update(score_shares(prefix, [chosen[i] for i in part], [rejected[i] for i in part],
                              ("chosen_better", "tie", "rejected_better")))
    return m


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
