"""Every name a config or a command line can choose from, mapped to the factory it stands for.

A ``Registry`` maps names (in declaration order) to ``"module:attr"`` strings, imported relative to its package only
when a name is asked for, so that reading the names (``config.validate``) imports nothing heavy. This module imports
nothing from the project: any module may import it. Adding a method, loss, judge, benchmark or tracker is writing its
factory and one line below.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterator


class Registry:
    """Names of one kind (``kind`` names them in errors) → factories, given as ``"module:attr"`` under ``package``."""

    def __init__(self, kind: str, package: str, entries: dict[str, str]):
        self.kind = kind
        self.package = package
        self._entries = dict(entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, name: str) -> Any:
        """The factory of ``name``; ``ValueError`` naming the kind and the known names for an unknown one."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} '{name}' (known: {', '.join(self._entries)})")
        module, attr = self._entries[name].split(":")
        return getattr(importlib.import_module(f"{self.package}.{module}"), attr)


METHODS = Registry("method", "sgpo.methods", {
    "sgpo": "sgpo:SGPO",
    "spin": "spin:SPIN",
    "synpo": "synpo:SynPO",
    "dpo": "dpo:DPO",
    "sft": "sft:SFT",
})
"""Alignment methods: ``Method`` classes (``sgpo/methods``)."""

LOSSES = Registry("preference loss", "sgpo.training", {
    "sigmoid": "losses:sigmoid",
    "ipo": "losses:ipo",
    "hinge": "losses:hinge",
    "norm": "losses:norm",
})
"""Preference losses: ``fn(logratios, beta) -> per-pair tensor`` (``sgpo/training/losses.py``)."""

JUDGES = Registry("judge", "sgpo.eval", {
    "reference": "judges:ReferenceJudge",
    "openai": "judge_openai:from_spec",
    "hf": "judge_hf:HFJudge",
    "reward": "judge_hf:RewardJudge",
    "lm": "judge_lm:LMJudge",
    "ifeval": "judge_exact:IFEvalJudge",
    "ifeval-loose": "judge_exact:ifeval_loose",
    "python": "judge_exact:PythonScorer",
})
"""Judge kinds (a spec's part before ``:``): ``factory(arg, **kwargs) -> Judge`` (``eval.judges.make_judge``); a spec is read
by ``judge_spec.parse_judge_spec``."""


BENCHMARKS = Registry("benchmark", "sgpo.eval", {
    "alpaca_eval": "benchmark:alpaca_eval_items",
    "arena_hard_v0.1": "benchmark:arena_hard_v01_items",
    "arena_hard_v2.0": "benchmark:arena_hard_v20_items",
    "ifeval": "benchmark:ifeval_items",
})
"""``sgpo eval`` benchmarks: ``loader(data_dir) -> list[Item]`` (``sgpo/eval/benchmark.py``)."""

COMPARE_BENCHMARKS = Registry("benchmark", "sgpo.compare", {
    "test": "runs:eval_test",
    "ifeval": "runs:eval_ifeval",
    "dev": "runs:eval_dev",
    "alpaca_eval": "runs:eval_alpaca",
})
"""``sgpo compare`` benchmarks: ``fn(EvalJob) -> dict`` of figures (``sgpo/compare/runs.py``)."""

TRACKERS = Registry("tracker", "sgpo.core", {
    "tensorboard": "trackers:tensorboard_tracker",
    "wandb": "trackers:wandb_tracker",
    "trackio": "trackers:trackio_tracker",
    "mlflow": "trackers:mlflow_tracker",
})
"""Experiment trackers (``report_to``): ``factory(logs_dir, run_name)`` -> an accelerate tracker (``core/trackers.py``)."""
