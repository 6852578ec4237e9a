"""Improver targets: given a draft y0 and a reference y*, what should the improver learn to write?

``interpolate`` (default): split both texts into units (sentences and lines; words when either text is a single
sentence), take the edit script from y0 to y* (difflib opcodes) and apply the first ceil(step · #ops) operations.
The result differs from y0 and is strictly closer to y* in word edit distance (more operations are applied until it
is), with no model call. Two independently written texts rarely share a sentence, so the script is often one block
and the step a full jump (docs/improver.md). ``chain`` steps y0 → y1 → … give every (y_k → y_k+1) as an example.
``reference``: the full jump y0 → y*. (A ``guided`` target, the model's own revision of y0 with y* shown, kept
when closer to y* and still overlapping y0, was removed: at 135M 1 revision of 48 qualified, docs/improver.md.)
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from sgpo.models import templates
from sgpo.config.schema import ImproverConfig
from sgpo.core.text import word_edit_distance
from sgpo.training.sft import NLLExample

_SENT = re.compile(r"(?<=[.!?。])\s+|\n+")


def split_units(text: str) -> list[str]:
    """Sentences with their trailing whitespace kept, so that ''.join(units) == text."""
    units, start = [], 0
    for m in _SENT.finditer(text):
        units.append(text[start:m.end()])
        start = m.end()
    if start < len(text):
        units.append(text[start:])
    return units


def split_words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


def _units(a: str, b: str) -> tuple[list[str], list[str]]:
    ua, ub = split_units(a), split_units(b)
    if len(ua) <= 1 or len(ub) <= 1:
        return split_words(a), split_words(b)
    return ua, ub


def edit_ops(a_units: list[str], b_units: list[str]) -> list[tuple]:
    """The edit script a → b (difflib's non-equal opcodes), in order."""
    sm = difflib.SequenceMatcher(a=a_units, b=b_units, autojunk=False)
    return [op for op in sm.get_opcodes() if op[0] != "equal"]


def _apply(a: list[str], b: list[str], ops: list[tuple]) -> str:
    out, pos = [], 0
    for tag, i1, i2, j1, j2 in ops:
        out.extend(a[pos:i1])
        out.extend(b[j1:j2])  # replace / insert take the reference units; delete takes none
        pos = i2
    out.extend(a[pos:])
    return "".join(out)


def interpolate(draft: str, reference: str, step: float) -> str:
    """Apply the first ``ceil(step · n_ops)`` operations of the draft→reference edit script (at least one), and more
    while the result is not strictly closer to the reference (word edit distance) than the draft."""
    a, b = _units(draft, reference)
    ops = edit_ops(a, b)
    if not ops:
        return reference
    before = word_edit_distance(draft, reference)
    k = max(1, math.ceil(step * len(ops)))
    out = _apply(a, b, ops[:k])
    while k < len(ops) and (word_edit_distance(out, reference) >= before or out.strip() == draft.strip()):
        k += 1
        out = _apply(a, b, ops[:k])
    return out


def chain(draft: str, reference: str, step: float, n: int) -> list[str]:
    """[y0, y1, ..., yn]: each step applies ``step`` of the remaining edit script; stops early at the reference."""
    seq = [draft]
    for _ in range(n):
        if seq[-1] == reference:
            break
        seq.append(interpolate(seq[-1], reference, step))
    return seq


def nll_example(tokenizer, record, example: "ImproverExample", instruction: str) -> NLLExample:
    """The training example of one improver step: input I(x, source) — or I(x, source, y*) when ``instruction`` has a
    ``{reference}`` (reading B) — in the chat template, completion = the target and EOS; the loss falls on completion
    tokens only."""
    return NLLExample(tuple(templates.improver_ids(tokenizer, record.prompt, example.source, instruction,
                                                   record.reference or "")),
                      tuple(templates.completion_ids(tokenizer, example.target)), "improver")


@dataclass(frozen=True)
class ImproverExample:
    """One improver-training example: improve ``source`` (a response to the record's prompt) into ``target``."""
    record_id: str
    source: str
    target: str


def examples_from_draft(record_id: str, draft: str, reference: str, cfg: ImproverConfig) -> list[ImproverExample]:
    """Improver examples for one (draft, reference) pair, by the configured target strategy (``cfg.target``)."""
    if cfg.target == "reference":
        return [ImproverExample(record_id, draft, reference)] if draft.strip() != reference.strip() else []
    seq = chain(draft, reference, cfg.step, cfg.chain)
    return [ImproverExample(record_id, s, t) for s, t in zip(seq, seq[1:]) if s.strip() != t.strip()]

