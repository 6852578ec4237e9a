"""SFT only: supervised fine-tuning on the references, no preference rounds (the common starting point)."""
from __future__ import annotations

from .base import MethodBase


class SFT(MethodBase):
    name = "sft"
    preference_rounds = False
    runs_sft = True  # the SFT stage runs whatever ``sft`` says in the config
