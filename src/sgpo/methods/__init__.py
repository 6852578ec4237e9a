"""Alignment methods. A method says how a round makes its preference pairs and which model is the reference;
the loop (``sgpo.recipe``) does everything else. Add one by writing a module with a ``Method`` and registering it
in ``sgpo.registry.METHODS`` (name → "module:Class"); ``methods/base.py`` lists what a method declares."""
from __future__ import annotations

from ..registry import METHODS
from .base import Context, Method


def get_method(name: str) -> Method:
    """A new instance of the method called ``name`` (``ValueError`` for an unknown name)."""
    return METHODS.get(name)()


__all__ = ["Context", "METHODS", "Method", "get_method"]
