"""What a method sees of a run (``Context``) and what it must provide (``Method``).

A method is small: it says how a round's preference pairs are made and which model is their reference. Everything
else (data, generation, filtering, reference log-probabilities, DPO, checkpoints, resume) is the shared loop in
``sgpo.recipe``. Optional parts, each with a default in ``MethodBase``:

``prepare(ctx)``          one-off work before the rounds, run once as the resumable stage ``prepare`` (a separate
                          improver, an offline preference set); its files go under ``ctx.run.path("prepare", ...)``.
``plan_prepare(cfg)``     what ``prepare`` will cost, for dry runs (no model is loaded).
``plan_round(cfg, t)``    generations and pairs of round ``t``, for dry runs.
``uses_improver_prompts`` the method trains on the improver slice of the pool (recorded in the dry-run plan; the
                          slice is reserved for every method, so all methods see the same round prompts).
``preference_rounds``     False for a method that stops after SFT.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    model: Any                   # the current policy π_t (round start); π_0 in ``prepare``
    round: int                   # t (1-based); 0 in ``prepare``
    records: list[Record]        # this round's prompts; in ``prepare``: the improver slice of the pool
    rollout: Callable[..., dict[str, Generation]]
    """rollout(role, records, *, name, drafts=None, model=None) -> {id: Generation}; resumable, seeded per prompt."""
    model_path: str = ""
    """Where ``model`` was loaded from (a checkpoint directory or a hub name)."""
    initial: Callable[[], Any] | None = None
    """Returns π_0, the model the rounds start from (after SFT / improver training); ``model`` itself when equal."""
    load_model: Callable[[str], Any] | None = None
    """Loads a checkpoint on the run's device and dtype (e.g. a separate model trained in ``prepare``)."""
    plan: list[list[Record]] = field(default_factory=list)
    """The prompts of every round, in order (known before the rounds start; used by ``prepare``)."""


class Method(Protocol):
    name: str
    trains_improver: bool        # the improver role of the policy weights is trained before the rounds

    def reference(self, cfg: Config) -> str:
        """'round_start' (π_t) or 'initial' (π_0)."""

    def make_pairs(self, ctx: Context) -> list[Pair]:
        """Unfiltered (chosen, rejected) pairs for round ``ctx.round``."""


class MethodBase:
    """Defaults for the optional parts of a method."""

    name = ""
    trains_improver = False
    uses_improver_prompts = False
    preference_rounds = True

    def reference(self, cfg: Config) -> str:
        return "round_start"

    def make_pairs(self, ctx: Context) -> list[Pair]:
        return []

    def plan_prepare(self, cfg: Config) -> dict:
        return {}

    def plan_round(self, cfg: Config, t: int) -> dict:
        """``{"generations": n, "pairs": n}`` for round ``t`` (pairs before filtering)."""
        return {"generations": 0, "pairs": 0}


def has_prepare(method) -> bool:
    return callable(getattr(method, "prepare", None))
