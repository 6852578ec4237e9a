"""Experiment trackers (``report_to``): TensorBoard, Weights & Biases, Trackio, MLflow, through accelerate's tracker
classes.

What is logged, under the metric names of docs/outputs.md:
  every training step   its metrics (``dpo/loss``, ``rewards/chosen`` ``/rejected`` ``/margins`` ``/accuracies``,
                        ``nll/loss``) and ``train/learning_rate``, at the run's global training step (counted over all
                        training calls of the run, kept in the manifest so a resumed run continues the count);
  every finished stage  its numeric metrics (``pairs/kept``, ``pairs/judge_agreement``, ``eval/dev/win_rate_vs_start``,
                        ``eval/test/...``, ``time/<stage>_s``, ...) at the global step where it ended;
  once                  the resolved config, flattened (``dpo.beta``, ...), as hyper-parameters.
Files go under ``RUN/logs/``. Only the main process logs. W&B runs in offline mode when the hub is offline
(``HF_HUB_OFFLINE=1``) unless ``WANDB_MODE`` says otherwise; a resumed training call logs the steps after its last
checkpoint again.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from sgpo.core.registry import TRACKERS

log = logging.getLogger("sgpo")


class TrackerError(Exception):
    """A tracker was asked for that is unknown or not installed; the message says which and how to install it."""


def names(report_to: str) -> list[str]:
    """The trackers of ``report_to`` ("none", one name, or names separated by commas), checked."""
    out = [n.strip() for n in str(report_to).split(",") if n.strip() and n.strip() != "none"]
    for n in out:
        if n not in TRACKERS:
            raise TrackerError(f"report_to: unknown tracker '{n}' (known: none, {', '.join(TRACKERS)})")
    return out


def require_installed(report_to: str) -> list[str]:
    """The trackers of ``report_to``, every one installed; else a ``TrackerError`` naming those that are not (a dry
    run and a run's start both ask)."""
    wanted = names(report_to)
    missing = [n for n in wanted if importlib.util.find_spec(n) is None]
    if missing:
        raise TrackerError(f"report_to: {', '.join(missing)} is not installed (pip install {' '.join(missing)})")
    return wanted


def flat(values: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys whose values a tracker takes (bool, int, float, str)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def tensorboard_tracker(logs: Path, run_name: str):
    from accelerate import tracking

    return tracking.TensorBoardTracker("tensorboard", logs)


def wandb_tracker(logs: Path, run_name: str):
    from accelerate import tracking

    offline = os.environ.get("HF_HUB_OFFLINE") == "1" and "WANDB_MODE" not in os.environ
    return tracking.WandBTracker("sgpo", name=run_name, dir=str(logs), **({"mode": "offline"} if offline else {}))


def trackio_tracker(logs: Path, run_name: str):
    from accelerate import tracking

    return tracking.TrackioTracker("sgpo", name=run_name)


def mlflow_tracker(logs: Path, run_name: str):
    import mlflow
    from accelerate import tracking

    if not os.environ.get("MLFLOW_TRACKING_URI"):  # the run's own store, not ./mlruns wherever sgpo was started
        mlflow.set_tracking_uri((logs / "mlruns").resolve().as_uri())
    return tracking.MLflowTracker("sgpo", logging_dir=str(logs / "mlruns"), run_name=run_name)


class Trackers:
    """The run's trackers (none when ``report_to`` is none, or on a process other than the main one)."""

    def __init__(self, report_to: str, run_dir: Path, config: dict, is_main: bool = True):
        self.trackers = []
        wanted = names(report_to)
        if not wanted or not is_main:
            return
        require_installed(report_to)
        logs = Path(run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for n in wanted:
            t = TRACKERS.get(n)(logs, Path(run_dir).name)
            t.start()
            t.store_init_configuration(flat(config))
            self.trackers.append(t)
        log.info("logging to %s under %s", ", ".join(wanted), logs)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, values: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}  # NaN left out
        for t in self.trackers:
            t.log(numbers, step=step)

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []
