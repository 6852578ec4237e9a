"""SynPO's response improver (Dong et al. 2024), without its prompt generator: a SEPARATE improver model.

Before the rounds (stage ``prepare``): a copy of π_0 learns, in improver mode, to turn π_0's drafts on the improver
slice into their SFT references — the full jump I(x, y0) → y* (``improver.train_improver`` with ``target: reference``
and no policy examples); it is saved as ``prepare/improver_model`` and never trained again. The policy's own weights
never learn the improver role.

Round t: y ~ π_t(P(x)); chosen = R(I(x, y)), the separate improver's refinement of it; rejected = y' ~ π_0(P(x)), the
pre-rounds model's answer to the same prompt (in round 1, where π_t = π_0, that is y itself); reference model = π_t.
Pairs accumulate: round t trains on its new pairs and on every pair kept in rounds 1..t-1 (their reference
log-probabilities are recomputed under π_t).
"""
from __future__ import annotations

import dataclasses

from sgpo.core.files import read_jsonl
from sgpo.methods.pairs import Pair
from sgpo.methods.improver import train_improver
from sgpo.methods.base import NO_PREFERENCE_SET, Context, Method

IMPROVER_DIR = "improver_model"


class SynPO(Method):
    name = "synpo"
    ignores = {"dpo.reference": "its reference is the round's start model",
               # train_improver with target: reference (step and chain unread) and mix_policy: 0
               **dict.fromkeys(("improver.target", "improver.step", "improver.chain", "improver.mix_policy"),
                               "its separate improver learns the full jump to the reference, without policy examples"),
               **NO_PREFERENCE_SET}

    def before_rounds(self, ctx: Context) -> None:
        full_jump = dataclasses.replace(ctx.cfg.improver, target="reference", mix_policy=0.0)
        ctx.run_stage("prepare", lambda: train_improver(ctx, ctx.records, full_jump,
                                                        into=ctx.path("prepare", IMPROVER_DIR)))

    def make_pairs(self, ctx: Context) -> list[Pair]:
        records = ctx.records
        drafts = ctx.rollout("policy", records, name="policy")
        texts = {i: g.text for i, g in drafts.items()}
        refined = ctx.rollout("improver", records, name="improver", drafts=texts,
                              model=ctx.generator_at(ctx.path("prepare", IMPROVER_DIR)))
        rejected = drafts if ctx.initial_is_current else ctx.rollout("initial-policy", records, name="initial_policy",
                                                                     model=ctx.generator_at(ctx.initial_path))
        new = [Pair.of(r, refined[r.id], rejected[r.id], round=ctx.round, chosen="separate_improver(policy)",
                       rejected="initial_policy") for r in records]
        return earlier_pairs(ctx) + new


def earlier_pairs(ctx: Context) -> list[Pair]:
    """The pairs kept in round t-1 (which already hold those of earlier rounds), reference log-probs cleared."""
    if ctx.round <= 1:
        return []
    path = ctx.path(f"round_{ctx.round - 1}", "pairs.jsonl")
    if not path.exists():
        raise FileNotFoundError(f"synpo accumulates pairs over rounds but {path} is missing")
    out = []
    for d in read_jsonl(path):
        p = Pair.from_json(d)
        p.ref_chosen_logp = p.ref_rejected_logp = None
        out.append(p)
    return out
