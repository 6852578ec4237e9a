"""Alignment methods. A method says how a round makes its preference pairs and which model is the reference;
the loop (``sgpo.recipe``) does everything else. Add one by writing a module with a ``Method`` and registering it."""
from __future__ import annotations

from .base import Context, Method


def get_method(name: str) -> Method:
    from . import sgpo

    methods = {"sgpo": sgpo.SGPO}
    if name not in methods:
        raise ValueError(f"unknown method '{name}' (known: {', '.join(sorted(methods))})")
    return methods[name]()


__all__ = ["Context", "Method", "get_method"]
