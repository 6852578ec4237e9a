"""SFT only: supervised fine-tuning on the references, no preference rounds (the common starting point). It trains
once on every prompt the methods with rounds see (the SFT slice when ``sft: true``, the improver slice and every
round's), so that all methods see the same prompts."""
from __future__ import annotations

from sgpo.methods.base import NO_IMPROVER_TRAINING, NO_PREFERENCE_SET, Method


class SFT(Method):
    name = "sft"
    ignores = {"dpo": "it has no preference rounds", "pairs": "it has no preference rounds",
               **NO_IMPROVER_TRAINING, **NO_PREFERENCE_SET}

    def sft_prompts(self, data, cfg):
        return data.seen(cfg.sft)

    def rounds(self, data):
        return []
