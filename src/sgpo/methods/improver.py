"""The improver role, SGPO's own part (SynPO uses it too, with a separate copy of the model): how its training
targets are made from a draft y0 and a reference y*, and how a model learns them.

Targets. ``interpolate`` (default): split both texts into units (sentences and lines; words when either text is a
single sentence), take the edit script from y0 to y* (difflib opcodes) and apply the first ceil(step · #ops) operations.
The result differs from y0 and is strictly closer to y* in word edit distance (more operations are applied until it
is), with no model call. Two independently written texts rarely share a sentence, so the script is often one block
and the step a full jump (docs/improver.md). ``chain`` steps y0 → y1 → … give every (y_k → y_k+1) as an example.
``reference``: the full jump y0 → y*. (A ``guided`` target, the model's own revision of y0 with y* shown, kept
when closer to y* and still overlapping y0, was removed: at 135M 1 revision of 48 qualified, docs/improver.md.)

Training (``train_improver``): the model drafts y0 ~ π(P(x)) for prompts with references; each (y0, y*) gives targets
(``improver.target``); the model learns I(x, y0) → target, mixed with policy examples P(x) → y*
(``improver.mix_policy``) so that the policy role is kept — SGPO: the policy's own weights; SynPO: a separate copy.
"""
from __future__ import annotations

import difflib
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from sgpo.config.schema import ImproverConfig
from sgpo.core.files import write_jsonl
from sgpo.core.text import word_edit_distance
from sgpo.data.records import Record
from sgpo.models import templates
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


# -- training: drafts, targets, the model learns them --------------------------------------------------------------

def improver_drafts(ctx, records: list[Record], drafts_per_prompt: int) -> list[tuple[Record, str]]:
    """(record, draft) for each of ``drafts_per_prompt`` drafts y0 ~ π(P(x)) per record (``<stage>/drafts*.jsonl``)."""
    out = []
    for k in range(drafts_per_prompt):
        n = str(k or "")
        drafts = ctx.rollout("draft" + n, records, name="drafts" + n)
        out += [(r, drafts[r.id].text) for r in records]
    return out


def train_improver(ctx, records: list[Record], cfg: ImproverConfig, into: Path | None = None) -> dict:
    """Improver training on ``records`` (those with references): the model drafts; ``cfg.target`` makes the targets
    (``<stage>/examples.jsonl``); mixed with ``cfg.mix_policy`` policy examples P(x) → y* per improver example, the
    current model learns them — or, with ``into``, a separate copy of it, saved there."""
    s = ctx.session
    records = [r for r in records if r.reference]
    examples = []
    for r, draft in improver_drafts(ctx, records, cfg.experimental.drafts_per_prompt):
        examples += examples_from_draft(r.id, draft, r.reference, cfg)
    write_jsonl(ctx.path(ctx.stage, "examples.jsonl"), [e.__dict__ for e in examples])
    scored = target_scores(s.evaluator.scorer, examples, records)
    nll = s.trainer.improver_examples(examples, records)
    rng = random.Random(ctx.cfg.seed)
    policy = [records[rng.randrange(len(records))] for _ in range(round(cfg.mix_policy * len(nll)))] if records else []
    nll += s.trainer.policy_examples(policy)
    if into is None:
        m = s.trainer.train_nll(nll, "improver training", ctx.cfg.seed + 1)
    else:
        m = s.trainer.train_separate(nll, "separate improver", ctx.cfg.seed + 1, into)
    return {**m, **scored, "improver/train_examples": len(examples), "improver/policy_examples": len(policy)}


def target_scores(judge, examples: list[ImproverExample], records: list[Record]) -> dict:
    """With a scorer as the run's judge: how often an improver training target scores above the response it improves
    (``improver/score/targets/better``, ``_tie``, ``_worse``, ``_margin``, ``_n``). An interpolated step applies only
    the first edits of a script, so an end phrase or a whole-text change may be missed or half made: this counts it."""
    from sgpo.eval.winrate import score_shares

    if judge is None or not getattr(judge, "gives_scores", False) or not examples:
        return {}
    by_id = {r.id: r for r in records}
    prompts = [by_id[e.record_id].prompt_text for e in examples]
    rows = [by_id[e.record_id].row() for e in examples]
    return score_shares("improver/score/targets/", judge.score(prompts, [e.target for e in examples], rows),
                        judge.score(prompts, [e.source for e in examples], rows), ("better", "tie", "worse"))
