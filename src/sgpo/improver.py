"""Improver targets: given a draft y0 and a reference y*, what should the improver learn to write?

``interpolate`` (default): split both texts into units (sentences and lines; words when either text is a single
sentence), take the edit script from y0 to y* (difflib opcodes) and apply the first ceil(step · #ops) operations.
The result differs from y0 and is strictly closer to y* in word edit distance (more operations are applied until it
is), with no model call. Two independently written texts rarely share a sentence, so the script is often one block
and the step a full jump; ``split_blocks`` cuts blocks into single-unit operations, and a step then rewrites the
draft's opening towards the reference and keeps the rest of the draft (measured: see docs/improver.md).
``chain`` steps y0 → y1 → … give every (y_k → y_k+1) as an example.
``reference``: the full jump y0 → y*. ``guided``: the model revises y0 with y* shown as a hint; the revision is kept
when it is closer to y* by a margin and still overlaps y0, else interpolation is used.

``token_weights`` marks the target tokens that a step changes, so that training can weigh them more than the tokens
copied from the source (the copy-collapse remedy: copied tokens are easy and many, edits are few and hard).
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

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


def edit_ops(a_units: list[str], b_units: list[str], split_blocks: bool = False) -> list[tuple]:
    """The edit script a → b (difflib's non-equal opcodes), in order.

    difflib gives blocks; two texts written independently rarely share a sentence, so a block is usually the whole
    text and a "step" of one block is a full jump. ``split_blocks`` cuts every block into one-unit operations
    (replace unit by unit, then the leftover deletes or inserts), fine enough for a fraction to be a partial step.
    """
    sm = difflib.SequenceMatcher(a=a_units, b=b_units, autojunk=False)
    ops = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        if not split_blocks:
            ops.append((tag, i1, i2, j1, j2))
            continue
        la, lb = i2 - i1, j2 - j1
        for t in range(max(la, lb)):
            if t < min(la, lb):
                ops.append(("replace", i1 + t, i1 + t + 1, j1 + t, j1 + t + 1))
            elif la > lb:
                ops.append(("delete", i1 + t, i1 + t + 1, j2, j2))
            else:
                ops.append(("insert", i2, i2, j1 + t, j1 + t + 1))
    return ops


def _apply(a: list[str], b: list[str], ops: list[tuple]) -> str:
    out, pos = [], 0
    for tag, i1, i2, j1, j2 in ops:
        out.extend(a[pos:i1])
        out.extend(b[j1:j2])  # replace / insert take the reference units; delete takes none
        pos = i2
    out.extend(a[pos:])
    return "".join(out)


def interpolate(draft: str, reference: str, step: float, split_blocks: bool = False) -> str:
    """Apply the first ``ceil(step · n_ops)`` operations of the draft→reference edit script (at least one), and more
    while the result is not strictly closer to the reference (word edit distance) than the draft."""
    a, b = _units(draft, reference)
    ops = edit_ops(a, b, split_blocks)
    if not ops:
        return reference
    before = word_edit_distance(draft, reference)
    k = max(1, math.ceil(step * len(ops)))
    out = _apply(a, b, ops[:k])
    while k < len(ops) and (word_edit_distance(out, reference) >= before or out.strip() == draft.strip()):
        k += 1
        out = _apply(a, b, ops[:k])
    return out


def chain(draft: str, reference: str, step: float, n: int, split_blocks: bool = False) -> list[str]:
    """[y0, y1, ..., yn]: each step applies ``step`` of the remaining edit script; stops early at the reference."""
    seq = [draft]
    for _ in range(n):
        if seq[-1] == reference:
            break
        seq.append(interpolate(seq[-1], reference, step, split_blocks))
    return seq


def _word_alignment(source: str, target: str):
    ws, wt = split_words(source), split_words(target)
    # whitespace changes do not count as edits
    sm = difflib.SequenceMatcher(a=[w.strip() for w in ws], b=[w.strip() for w in wt], autojunk=False)
    return ws, wt, sm.get_opcodes()


def changed_spans(source: str, target: str) -> list[tuple[int, int]]:
    """Character spans of ``target`` that are not copied from ``source`` (word-level alignment)."""
    ws, wt, opcodes = _word_alignment(source, target)
    starts = [0]
    for w in wt:
        starts.append(starts[-1] + len(w))
    spans = []
    for tag, i1, i2, j1, j2 in opcodes:
        if tag != "equal" and j2 > j1:
            last = wt[j2 - 1]
            spans.append((starts[j1], starts[j2] - (len(last) - len(last.rstrip()))))
    return spans


def token_weights(tokenizer, source: str, target: str, changed_weight: float,
                  eos: bool = True) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Token ids of ``target`` as a completion (EOS appended, as ``templates.completion_ids``) and a loss weight per
    token: ``changed_weight`` on tokens overlapping a span the target changed, 1 on tokens copied from ``source``.

    The EOS token counts as changed when the target ends differently from the source (the step changes where the
    response stops)."""
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    spans = changed_spans(source, target)
    weights = []
    for s, e in enc["offset_mapping"]:
        hit = any(s < b and a < max(e, s + 1) for a, b in spans)
        weights.append(changed_weight if hit else 1.0)
    if eos:
        ids.append(tokenizer.eos_token_id)
        ws, wt, opcodes = _word_alignment(source, target)
        ends_same = bool(opcodes) and opcodes[-1][0] == "equal" and opcodes[-1][2] == len(ws) and len(wt) > 0
        weights.append(1.0 if ends_same else changed_weight)
    return tuple(ids), tuple(weights)


def nll_example(tokenizer, prompt, example: ImproverExample, instruction: str, changed_weight: float = 1.0):
    """The training example of one improver step: input I(x, source) in the chat template, completion = the target
    and EOS; the loss falls on completion tokens only, weighted ``changed_weight`` where the target changes."""
    from . import templates
    from .training.sft import NLLExample

    ids, weights = token_weights(tokenizer, example.source, example.target, changed_weight)
    return NLLExample(tuple(templates.improver_ids(tokenizer, prompt, example.source, instruction)), ids, "improver",
                      weights if changed_weight != 1.0 else None)


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the word sequences of two texts."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a.split(), b.split())


def similarity(a: str, b: str) -> float:
    """Normalised word-level similarity in [0, 1] (1 = identical word sequences)."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.normalized_similarity(a.split(), b.split())


@dataclass(frozen=True)
class ImproverExample:
    """One improver-training example: improve ``source`` (a response to the record's prompt) into ``target``."""
    record_id: str
    source: str
    target: str


def examples_from_draft(record_id: str, draft: str, reference: str, target: str, step: float, n_chain: int,
                        revision: str | None = None, min_gain: float = 0.02,
                        min_overlap: float = 0.5, split_blocks: bool = False) -> list[ImproverExample]:
    """Improver examples for one (draft, reference) pair, by the configured target strategy."""
    if target == "reference":
        return [ImproverExample(record_id, draft, reference)] if draft.strip() != reference.strip() else []
    if target == "guided" and revision is not None and accept_revision(draft, reference, revision, min_gain,
                                                                       min_overlap):
        return [ImproverExample(record_id, draft, revision)]
    seq = chain(draft, reference, step, n_chain, split_blocks)
    return [ImproverExample(record_id, s, t) for s, t in zip(seq, seq[1:]) if s.strip() != t.strip()]


def accept_revision(draft: str, reference: str, revision: str, min_gain: float, min_overlap: float) -> bool:
    """A guided revision must be closer to the reference by ``min_gain`` and still overlap the draft."""
    if not revision.strip() or revision.strip() == draft.strip():
        return False
    gain = similarity(revision, reference) - similarity(draft, reference)
    return gain >= min_gain and similarity(revision, draft) >= min_overlap


GUIDED_INSTRUCTION = (
    "Below is a request, a draft response, and an expert response for reference. Revise the draft one clear step "
    "towards the quality of the expert response, keeping most of the draft. Reply with the revised draft only.\n\n"
    "### Request\n{prompt}\n\n### Draft response\n{draft}\n\n### Expert response\n{reference}"
)
