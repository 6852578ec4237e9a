"""SGPO: the policy drafts y_l ~ π_t(P(x)); the same weights in improver mode rewrite it, y_w ~ π_t(I(x, y_l)).
Its pairs are written out in ``recipe.round_stage``; the improver role is trained first (``recipe.improver_stage``)."""
from __future__ import annotations

from .base import Method


class SGPO(Method):
    name = "sgpo"
    trains_improver = True
    runs_sft = False
    has_rounds = True
    has_prepare = False
    self_improving = True

    def reference(self, cfg) -> str:
        return cfg.dpo.reference

    def plan_round(self, cfg, t: int) -> dict:
        """Dry runs: drafts + rewrites (extra rewrite samples counted as an upper bound)."""
        n = cfg.data.round_size
        return {"generations": n * (1 + cfg.improver.experimental.rewrite_samples), "pairs": n}
