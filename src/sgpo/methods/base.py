"""What a method declares to the recipe (``Method``) and what it sees of a run (``Context``).

Every method states, as class attributes, which stages the recipe runs for it and how its pairs are made:

``trains_improver``  the improver stage runs first (the policy's own weights learn the improver role: SGPO)
``runs_sft``         the SFT stage runs whatever the ``sft`` config key says
``has_rounds``       preference rounds follow (False: a method that stops after SFT)
``has_prepare``      a one-off ``prepare(ctx)`` stage runs before the rounds (a separate improver, a fixed set)
``self_improving``   the round's pairs are the recipe's own — the policy drafts, the same weights rewrite (SGPO,
                     written out in ``recipe.round_stage``); otherwise the round calls ``make_pairs(ctx)``

and implements ``reference(cfg)`` ('round_start' or 'initial'), ``make_pairs``/``prepare`` where declared, and
``plan_round``/``plan_prepare`` for dry runs. Everything else (data, generation, gates, reference pass, DPO,
checkpoints, resume) is the shared loop in ``sgpo.recipe``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..data import Record
from ..generation import Generation
from ..pairs import Pair
from ..training.sft import NLLExample

if TYPE_CHECKING:
    from ..session import Session


class Method:
    name = ""
    trains_improver = False
    runs_sft = False
    has_rounds = True
    has_prepare = False
    self_improving = False

    def reference(self, cfg: Config) -> str:
        return "round_start"

    def make_pairs(self, ctx: "Context") -> list[Pair]:
        """Unfiltered (chosen, rejected) pairs for round ``ctx.round``."""
        raise NotImplementedError(f"method '{self.name}' makes no pairs of its own")

    def prepare(self, ctx: "Context") -> dict:
        """One-off work before the rounds (stage ``prepare``); returns its metrics."""
        raise NotImplementedError(f"method '{self.name}' has no prepare stage")

    def plan_prepare(self, cfg: Config) -> dict:
        return {}

    def plan_round(self, cfg: Config, t: int) -> dict:
        """``{"generations": n, "pairs": n}`` for round ``t`` (pairs before the gates)."""
        return {"generations": 0, "pairs": 0}


@dataclass
class Context:
    """A stage as a method sees it. ``records``: the round's prompts (in ``prepare``: the improver slice)."""
    session: "Session"
    stage: str
    round: int                   # t (1-based); 0 in ``prepare``
    records: list[Record]
    initial_path: str = ""       # π_0, the model the rounds start from (after SFT / improver training)
    plan: list[list[Record]] = field(default_factory=list)  # the prompts of every round, in order

    @property
    def cfg(self) -> Config:
        return self.session.cfg

    @property
    def tokenizer(self):
        return self.session.tokenizer

    @property
    def model(self):
        """The current policy π_t (round start); π_0 in ``prepare``."""
        return self.session.model

    def path(self, *parts: str) -> Path:
        return self.session.run.path(*parts)

    def rollout(self, role: str, records: list[Record], *, name: str, drafts: dict[str, str] | None = None,
                model: Any = None) -> dict[str, Generation]:
        """Resumable, seeded generation into ``<stage>/<name>.jsonl`` (improver mode when ``drafts`` are given)."""
        return self.session.sampler.rollout(model or self.session.generator, records, role, self.round, drafts=drafts,
                                            shard=self.path(self.stage, f"{name}.jsonl"))

    def initial(self):
        """π_0: the current model itself when the rounds have not changed it yet, else a copy loaded from disk."""
        s = self.session
        return s.model if self.initial_path == s.model_path else s.load(self.initial_path)

    def load_model(self, path: str | Path):
        return self.session.load(str(path))

    def train_separate(self, examples: list[NLLExample], desc: str, out: Path) -> dict:
        """Train a copy of the current model on ``examples`` and save it to ``out`` (resumable, multi-process)."""
        return self.session.train_separate(examples, desc, self.cfg.seed + 1, out)
