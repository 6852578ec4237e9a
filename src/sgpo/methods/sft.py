"""SFT only: supervised fine-tuning on the references, no preference rounds (the common starting point). It trains
once on every prompt the methods with rounds see (the SFT slice when ``sft: true``, the improver slice and every
round's), so that all methods see the same prompts."""
from __future__ import annotations

from sgpo.methods.base import Method


class SFT(Method):
    name = "sft"

    def sft_prompts(self, data, cfg):
        return data.seen(cfg.sft)

    def rounds(self, data):
        return []
