"""What a method is to the recipe (``Method``) and what it sees of a run (``Context``).

A method says only what differs between methods; the recipe (``sgpo.run.recipe``) does the rest — data, SFT, rounds,
gates, the reference pass, DPO, checkpoints, resume, figures — the same way for every method:

``make_pairs(ctx)``      round t's (chosen, rejected) candidates, before the gates (every method with rounds)
``reference(cfg)``       the DPO reference model, a ``Reference``: ROUND_START (π_t) or INITIAL (π_0, the pre-rounds
                         model)
``ignores``              the config keys the method never reads, each with why (``ignored_settings``: a run warns
                         when one is set)
``before_rounds(ctx)``   one-off stages between SFT and round 1 (SGPO: its improver training; SynPO: a separate
                         improver; DPO: its preference set); none by default
``sft_prompts(data)``    the SFT stage's prompts (None: no SFT stage); default: the SFT slice when ``sft: true``
``rounds(data)``         the prompts of every round; default: the rounds the data was dealt (SFT alone: none)
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sgpo.config.schema import Config, dotted_keys, get, key_type
from sgpo.core.registry import METHODS
from sgpo.data.records import Record
from sgpo.generation.engine import Generation
from sgpo.methods.pairs import Pair

if TYPE_CHECKING:
    from sgpo.run.session import Session
    from sgpo.data.splits import Splits


log = logging.getLogger("sgpo")


class Reference(enum.Enum):
    """The model a round's pairs are scored under, DPO's reference (the config's ``dpo.reference`` names one by
    ``value``)."""
    ROUND_START = "round_start"  # π_t, the model at the start of the round
    INITIAL = "initial"          # π_0, the pre-rounds model: the one entering round 1


# keys read by one part only, for the ``ignores`` of the methods without it: improver training
# (``improver.train_improver``) and method dpo's preference set (``methods/dpo.py``)
NO_IMPROVER_TRAINING = dict.fromkeys(("improver.target", "improver.step", "improver.chain", "improver.mix_policy",
                                      "improver.experimental.drafts_per_prompt"), "it trains no improver")
NO_PREFERENCE_SET = dict.fromkeys(("data.preference", "data.preference_split"),
                                  "only method dpo reads a preference set")


class Method:
    name = ""
    ignores: ClassVar[dict[str, str]] = {}
    """Config keys (dotted; a section stands for every key in it) this method never reads → why, in a few words. A
    run warns when one is set away from its default (``ignored_settings``). Declare only what the method's code
    shows."""

    def reference(self, cfg: Config) -> Reference:
        return Reference.ROUND_START

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


def ignored_settings(method: Method, cfg: Config) -> list[str]:
    """One line per reason for the keys ``method`` ignores that ``cfg`` sets away from their defaults (a ``Config()``),
    e.g. "dpo.reference=initial is set but method 'spin' does not use it (its reference is the round's start model)".
    Empty when there are none."""
    default, by_reason = Config(), {}
    for key, why in method.ignores.items():
        typ = key_type(key)
        for k in dotted_keys(typ, key + ".") if dataclasses.is_dataclass(typ) else [key]:
            if not dataclasses.is_dataclass(key_type(k)) and get(cfg, k) != get(default, k):
                by_reason.setdefault(why, []).append(f"{k}={get(cfg, k)}")
    return [f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} set but method '{method.name}' does not use "
            f"{'it' if len(keys) == 1 else 'them'} ({why})" for why, keys in by_reason.items()]


def warn_ignored(method: Method, cfg: Config) -> None:
    """A warning for each line of ``ignored_settings``: a setting the run will not act on is not silently dropped."""
    for line in ignored_settings(method, cfg):
        log.warning(line)


def get_method(name: str) -> Method:
    """A new instance of the method called ``name`` (``ValueError`` for an unknown name)."""
    return METHODS.get(name)()
