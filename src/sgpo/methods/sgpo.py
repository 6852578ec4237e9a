"""SGPO: the policy drafts y_l ~ π_t(P(x)); the same weights in improver mode rewrite it, y_w ~ π_t(I(x, y_l))."""
from __future__ import annotations

from .. import templates
from ..pairs import Pair, normalise
from .base import Context


class SGPO:
    name = "sgpo"
    trains_improver = True

    def reference(self, cfg) -> str:
        return cfg.dpo.reference

    def make_pairs(self, ctx: Context) -> list[Pair]:
        drafts = ctx.rollout("policy", ctx.records, name="policy")
        texts = {i: g.text for i, g in drafts.items()}
        rewrites = ctx.rollout("improver", ctx.records, name="improver", drafts=texts)
        # optional extra rewrite samples: keep the first rewrite that differs from its draft
        for k in range(1, ctx.cfg.improver.rewrite_samples):
            same = [r for r in ctx.records if normalise(rewrites[r.id].text) == normalise(texts[r.id])]
            if not same:
                break
            more = ctx.rollout(f"improver{k}", same, name=f"improver{k}", drafts=texts)
            for r in same:
                if normalise(more[r.id].text) != normalise(texts[r.id]):
                    rewrites[r.id] = more[r.id]
        return [Pair(record_id=r.id, prompt=templates.policy_messages(r.prompt), chosen=rewrites[r.id].text,
                     rejected=drafts[r.id].text, chosen_finished=rewrites[r.id].finished,
                     rejected_finished=drafts[r.id].finished, meta={"round": ctx.round})
                for r in ctx.records]

    def plan_round(self, cfg, t: int) -> dict:
        """Dry runs: drafts + rewrites (extra rewrite samples counted as an upper bound)."""
        n = cfg.data.round_size
        return {"generations": n * (1 + cfg.improver.rewrite_samples), "pairs": n}
