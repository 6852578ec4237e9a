"""What a method sees of a run (``Context``) and what it must provide (``Method``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..config import Config
from ..data import Record
from ..generation import Generation
from ..pairs import Pair
from ..runs import RunDir


@dataclass
class Context:
    cfg: Config
    run: RunDir
    tokenizer: Any
    model: Any                   # the current policy π_t (round start)
    round: int                   # t (1-based)
    records: list[Record]        # this round's prompts
    rollout: Callable[..., dict[str, Generation]]
    """rollout(role, records, *, name, drafts=None, model=None) -> {id: Generation}; resumable, seeded per prompt."""


class Method(Protocol):
    name: str
    trains_improver: bool        # the improver role of the policy weights is trained before the rounds

    def reference(self, cfg: Config) -> str:
        """'round_start' (π_t) or 'initial' (π_0)."""

    def make_pairs(self, ctx: Context) -> list[Pair]:
        """Unfiltered (chosen, rejected) pairs for round ``ctx.round``."""
