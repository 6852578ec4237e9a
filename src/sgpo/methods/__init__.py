"""Alignment methods. A method says how a round makes its preference pairs and which model is the reference;
the loop (``sgpo.recipe``) does everything else. Add one by writing a module with a ``Method`` and registering it
in ``METHODS`` (name → "module:Class"); ``methods/base.py`` lists what a method declares."""
from __future__ import annotations

import importlib

from .base import Context, Method

METHODS = {
    "sgpo": "sgpo:SGPO",
    "spin": "spin:SPIN",
    "synpo": "synpo:SynPO",
    "dpo": "dpo:DPO",
    "sft": "sft:SFT",
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


__all__ = ["Context", "METHODS", "Method", "get_method"]
