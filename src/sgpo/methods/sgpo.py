"""SGPO (Lee et al. 2025, arXiv 2507.20181): one model is both the policy and its own self-improver.

1. Improver training (once, before the rounds; ``improver.train_improver``): the model drafts y0 ~ π(P(x)) for prompts
   of the SFT data; each (y0, y*) gives targets a step from the draft towards the SFT reference y* (``improver.target``:
   ``interpolate`` applies a fraction ``improver.step`` of the edit script, ``improver.chain`` steps in a row); the
   SAME weights learn I(x, y0) → target, mixed with policy examples P(x) → y* (``improver.mix_policy``) so that the
   policy role is kept. Reading B (``improver.sees_reference``, the default): the improver input holds y* too.
2. Rounds t = 1..T (``make_pairs``, then the recipe's shared round): the policy drafts y_l ~ π_t(P(x)); the same
   weights in improver mode rewrite it, y_w ~ π_t(I(x, y_l)); the gates drop degenerate pairs; DPO on (y_w ≻ y_l)
   with the reference model ``dpo.reference`` (π_t by default) gives π_{t+1}. Both sides come from the current model:
   the pairs are on-policy.
"""
from __future__ import annotations

from sgpo.methods.pairs import Pair
from sgpo.methods.improver import train_improver
from sgpo.methods.base import NO_PREFERENCE_SET, Context, Method, Reference


class SGPO(Method):
    name = "sgpo"
    ignores = NO_PREFERENCE_SET

    def before_rounds(self, ctx: Context) -> dict:
        def improver_stage() -> dict:  # the same weights learn I(x, y0) → a step towards y*; then its dev figures
            return {**train_improver(ctx, ctx.records, ctx.cfg.improver), **ctx.session.dev_figures()}

        return ctx.run_stage("improver", improver_stage, inputs=ctx.records, model=True)

    def make_pairs(self, ctx: Context) -> list[Pair]:
        drafts = ctx.rollout("policy", ctx.records, name="policy")                       # y_l ~ π_t(P(x))
        rewrites = ctx.rewrite(ctx.records, {i: g.text for i, g in drafts.items()})     # y_w ~ π_t(I(x, y_l))
        return [Pair.of(r, rewrites[r.id], drafts[r.id], round=ctx.round) for r in ctx.records]

    def reference(self, cfg) -> Reference:
        return Reference(cfg.dpo.reference)
