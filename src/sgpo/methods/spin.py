"""SPIN (Chen et al. 2024, self-play fine-tuning): the SFT reference against the current model's own answer.

Round t: y ~ π_t(P(x)); pair (chosen = y*, the SFT reference; rejected = y); reference model = π_t, the round-start
model (the opponent of round t is the model of round t - 1). Over the rounds the model is pushed to tell its own answers
from the human-written ones until it cannot.
"""
from __future__ import annotations

from sgpo.methods.pairs import Pair
from sgpo.methods.base import NO_IMPROVER_TRAINING, NO_PREFERENCE_SET, Context, Method


class SPIN(Method):
    name = "spin"
    ignores = {"dpo.reference": "its reference is the round's start model",
               **NO_IMPROVER_TRAINING, **NO_PREFERENCE_SET}

    def make_pairs(self, ctx: Context) -> list[Pair]:
        records = [r for r in ctx.records if r.reference]
        own = ctx.rollout("policy", records, name="policy")
        return [Pair.of(r, r.reference, own[r.id], round=ctx.round, chosen="reference", rejected="policy")
                for r in records]
