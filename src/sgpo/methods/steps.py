"""Steps the methods share, each one job: supervised fine-tuning on the references, and improver training — the
model drafts, each (draft, reference) gives targets a step towards the reference (``improver/targets.py``), and a
model learns I(x, draft) → target (SGPO: the policy's own weights; SynPO: a separate copy)."""
from __future__ import annotations

import random
from pathlib import Path

from sgpo.config.schema import ImproverConfig
from sgpo.data.records import Record
from sgpo.core.files import write_jsonl
from sgpo.methods.improver_targets import ImproverExample, examples_from_draft


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


def sft(session, records: list[Record]) -> dict:
    """NLL on (P(x) → y*) for ``records``, the current model."""
    return session.trainer.train_nll(session.trainer.policy_examples(records), "sft", session.cfg.seed)
