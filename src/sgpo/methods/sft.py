"""SFT only: supervised fine-tuning on the references, no preference rounds (the common starting point)."""
from __future__ import annotations

from .base import Method


class SFT(Method):
    name = "sft"
    trains_improver = False
    runs_sft = True
    has_rounds = False
    has_prepare = False
    self_improving = False
