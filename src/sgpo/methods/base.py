"""What a method is to the recipe (``Method``) and what it sees of a run (``Context``).

A method says only what differs between methods; the recipe (``sgpo.run.recipe``) does the rest — data, SFT, rounds,
gates, the reference pass, DPO, checkpoints, resume, figures — the same way for every method:

``make_pairs(ctx)``      round t's (chosen, rejected) candidates, before the gates (every method with rounds)
``reference(cfg)``       the DPO reference model: 'round_start' (π_t) or 'initial' (π_0, the pre-rounds model)
``before_rounds(ctx)``   one-off stages between SFT and round 1 (SGPO: its improver training; SynPO: a separate
                         improver; DPO: its preference set); none by default
``sft_prompts(data)``    the SFT stage's prompts (None: no SFT stage); default: the SFT slice when ``sft: true``
``rounds(data)``         the prompts of every round; default: the rounds the data was dealt (SFT alone: none)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sgpo.config.schema import Config
from sgpo.core.registry import METHODS
from sgpo.data.records import Record
from sgpo.generation.engine import Generation
from sgpo.methods.pairs import Pair

if TYPE_CHECKING:
    from sgpo.run.session import Session
    from sgpo.data.splits import Splits


class Method:
    name = ""

    def reference(self, cfg: Config) -> str:
        return "round_start"

    def sft_prompts(self, data: "Splits", cfg: Config) -> list[Record] | None:
        return data.sft if cfg.sft else None

    def before_rounds(self, ctx: "Context") -> dict | None:
        """One-off stages before round 1 (``ctx.run_stage``); returns the last one's figures when they are the
        policy's (they then stand for the run when no round follows)."""

    def rounds(self, data: "Splits") -> list[list[Record]]:
        return data.rounds

    def make_pairs(self, ctx: "Context") -> list[Pair]:
        """Unfiltered (chosen, rejected) pairs for round ``ctx.round``."""
        raise NotImplementedError(f"method '{self.name}' makes no pairs of its own")


@dataclass
class Context:
    """A stage as a method sees it. ``records``: the round's prompts (before the rounds: the improver slice)."""
    session: "Session"
    stage: str
    round: int                   # t (1-based); 0 before the rounds
    records: list[Record]
    initial_path: str = ""       # π_0, the pre-rounds model: the one entering round 1 (after SFT and before_rounds)
    plan: list[list[Record]] = field(default_factory=list)  # the prompts of every round, in order

    @property
    def cfg(self) -> Config:
        return self.session.cfg

    def path(self, *parts: str) -> Path:
        return self.session.run.path(*parts)

    def run_stage(self, name: str, fn, inputs: list[Record] = (), model: bool = False) -> dict:
        """``fn()`` as stage ``name`` of the run, skipped when done (``inputs`` enter its hash chain); with ``model``,
        the stage ends with a checkpoint of the current model."""
        self.stage = name
        return self.session.stage(name, fn, inputs, model=model)

    @property
    def initial_is_current(self) -> bool:
        """π_0 is the current model (no round has trained it yet)."""
        return self.initial_path == self.session.policy.path

    def rollout(self, role: str, records: list[Record], *, name: str, drafts: dict[str, str] | None = None,
                model: Any = None) -> dict[str, Generation]:
        """Resumable, seeded generation into ``<stage>/<name>.jsonl`` (improver mode when ``drafts`` are given) with
        the current model, or ``model`` (a loaded copy or, for vLLM, a checkpoint path)."""
        s = self.session
        return s.sampler.rollout(model or s.policy.generator, records, role, self.round, drafts=drafts,
                                 shard=self.path(self.stage, f"{name}.jsonl"))

    def rewrite(self, records: list[Record], drafts: dict[str, str]) -> dict[str, Generation]:
        """The current model in improver mode rewrites each draft (shards ``<stage>/improver*.jsonl``)."""
        s = self.session
        return s.sampler.rewrite(s.policy.generator, records, drafts, self.round, shard_dir=self.path(self.stage),
                                 samples=self.cfg.improver.experimental.rewrite_samples)

    def generator_at(self, path: str | Path):
        """What a rollout of the model saved at ``path`` generates with (π_0: ``initial_path``)."""
        return self.session.policy.generator_at(str(path))


def get_method(name: str) -> Method:
    """A new instance of the method called ``name`` (``ValueError`` for an unknown name)."""
    return METHODS.get(name)()
