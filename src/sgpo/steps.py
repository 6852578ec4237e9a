"""Steps the methods share, each one job: supervised fine-tuning on the references, and improver training — the
model drafts, each (draft, reference) gives targets a step towards the reference (``improver/targets.py``), and a
model learns I(x, draft) → target (SGPO: the policy's own weights; SynPO: a separate copy)."""
from __future__ import annotations

import random
from pathlib import Path

from .config import ImproverConfig
from .data import Record
from .files import write_jsonl
from .improver.targets import examples_from_draft


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
    nll = s.trainer.improver_examples(examples, records)
    rng = random.Random(ctx.cfg.seed)
    policy = [records[rng.randrange(len(records))] for _ in range(round(cfg.mix_policy * len(nll)))] if records else []
    nll += s.trainer.policy_examples(policy)
    if into is None:
        m = s.trainer.train_nll(nll, "improver training", ctx.cfg.seed + 1)
    else:
        m = s.trainer.train_separate(nll, "separate improver", ctx.cfg.seed + 1, into)
    return {**m, "improver/train_examples": len(examples), "improver/policy_examples": len(policy)}


def sft(session, records: list[Record]) -> dict:
    """NLL on (P(x) → y*) for ``records``, the current model."""
    return session.trainer.train_nll(session.trainer.policy_examples(records), "sft", session.cfg.seed)
