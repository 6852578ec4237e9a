"""Experiment trackers: a real run with ``report_to=tensorboard`` writes event files holding the per-step training
metrics at the run's global steps, every stage's metrics and the config; unknown or missing trackers are clear errors."""
from __future__ import annotations

import json

import pytest

from sgpo.config import schema as config
from sgpo.run import recipe
from sgpo.config.schema import ConfigError
from sgpo.core.trackers import TrackerError, Trackers, flat


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p.parent for p in logdir.rglob("events.out.tfevents.*")]
    assert runs, f"no event files under {logdir}"
    scalars = {}
    for run in set(runs):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return scalars


@pytest.mark.slow
def test_a_run_logs_steps_and_stages_to_tensorboard(tmp_path):
    cfg = config.load("configs/smoke.yaml", ["rounds=1", "eval.second_judge=", "report_to=tensorboard"])
    out = tmp_path / "run"
    recipe.run(cfg, out)
    tags = _events(out / "logs")
    metrics = {d.name: json.loads((d / "metrics.json").read_text()) for d in out.iterdir()
               if (d / "metrics.json").exists()}
    nll_steps = sum(m.get("nll/steps", 0) for m in metrics.values())
    dpo_steps = metrics["round_1"]["dpo/steps"]
    assert nll_steps > 0 and dpo_steps > 0
    # one event per optimizer step, at the run's global step: SFT and improver training first, then round 1's DPO
    assert sorted(tags["train/learning_rate"]) == list(range(1, nll_steps + dpo_steps + 1))
    assert sorted(tags["nll/loss"]) == list(range(1, nll_steps + 1))
    for tag in ("dpo/loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        assert sorted(tags[tag]) == list(range(nll_steps + 1, nll_steps + dpo_steps + 1)), tag
    # every stage's figures, at the step where it ended
    assert tags["pairs/kept"] == [nll_steps + dpo_steps]
    with_dev = [n for n, m in metrics.items() if "eval/dev/win_rate_vs_start" in m]
    assert len(tags["eval/dev/win_rate_vs_start"]) == len(with_dev) >= 2  # improver, round 1
    assert any(t.startswith("eval/test/") for t in tags)
    assert (out / "logs" / "tensorboard").is_dir()
    assert json.loads((out / "manifest.json").read_text())["train_steps"] == nll_steps + dpo_steps


def test_unknown_and_missing_trackers_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        config.load("configs/smoke.yaml", ["report_to=tensorbored"])
    assert config.load("configs/smoke.yaml", ["report_to=none"]).report_to == "none"
    assert config.from_dict({"report_to": ["tensorboard", "wandb"]}).report_to == "tensorboard,wandb"  # YAML list
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrackerError, match=r"wandb is not installed \(pip install wandb\)"):
        Trackers("tensorboard, wandb", tmp_path, {})
    assert not Trackers("tensorboard", tmp_path, {}, is_main=False)  # only the main process logs


def test_config_is_flattened_for_hyper_parameters():
    assert flat({"dpo": {"beta": 0.1, "loss": "sigmoid"}, "rounds": 2, "x": [1, 2], "b": True}) == {
        "dpo.beta": 0.1, "dpo.loss": "sigmoid", "rounds": 2, "x": "[1, 2]", "b": True}


def test_a_training_call_resumed_after_its_last_step_still_advances_the_step_count(tmp_path):
    from types import SimpleNamespace

    from sgpo.run.stages import RunDir
    from sgpo.run.trainer import Trainer

    run = RunDir(tmp_path / "run")
    s = SimpleNamespace(policy=SimpleNamespace(run=run), trackers=True, stages=SimpleNamespace(current="sft"))
    s._step_base = lambda desc: Trainer._step_base(s, desc)
    Trainer._count_steps(s, "sft", 5)  # no step was logged in this process: its checkpoint held all 5
    s.stages.current = "improver"
    Trainer._count_steps(s, "improver training", 3)
    assert run.manifest["train_steps"] == 8
    assert run.manifest["train_offsets"] == {"sft/sft": 0, "improver/improver training": 5}
    Trainer._count_steps(s, "improver training", 3)  # the same call again: its offset is kept, not moved
    assert run.manifest["train_steps"] == 8
