"""The run directory: the manifest of stages, skip/resume, the chain of stage inputs, metrics, config checks.

Layout::

    RUN/config.yaml          the resolved config
    RUN/manifest.json        stages with status (running/done), input hash, wall time
    RUN/<stage>/             a folder per stage, in run order: round_0/ (the start model on the development prompts),
                             sft/, the method's stages before the rounds (SGPO's improver/; prepare/: SynPO's separate
                             improver, DPO's preference set), round_<t>/, test/, test_second_judge/; each with its
                             metrics.json, its rollouts (JSONL) and, when it trained, model/
    RUN/final/               the last model in HF format

``open_run`` opens (or creates) it and refuses a run made with another config; ``Stages.run`` runs one stage unless
it is done, so that a re-run resumes at the first unfinished stage.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Protocol, Sequence

from sgpo.config import schema as config_mod
from sgpo.config.schema import Config
from sgpo.core.phases import PROFILE
from sgpo.core.files import RunError, atomic_write_json, content_hash, is_writer

log = logging.getLogger("sgpo")

MANIFEST_FORMAT = 1


class RunDir:
    """A run directory with a manifest of stages. Only the main process writes (``writer=False`` elsewhere)."""

    def __init__(self, root: str | Path, writer: bool = True):
        self.root = Path(root)
        self.writer = writer
        if writer:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".write-test{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise RunError(f"output directory {self.root} is not writable: {e.strerror or e}") from None
        self.manifest_path = self.root / "manifest.json"
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": MANIFEST_FORMAT, "stages": {}}
        try:
            m = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            m = None
        if not isinstance(m, dict) or not isinstance(m.get("stages"), dict):
            raise RunError(f"{self.manifest_path} is corrupted; use a new --output or --force-restart")
        if not isinstance(m.get("format", 1), int) or m.get("format", 1) > MANIFEST_FORMAT:
            raise RunError(f"{self.manifest_path} was written by a newer sgpo (manifest format {m.get('format')}; "
                           f"this sgpo reads up to {MANIFEST_FORMAT}); upgrade sgpo or use a new --output")
        return m

    def clear(self) -> None:
        """Forget the run here (``--force-restart``): remove the manifest and every stage folder it lists."""
        for name in list(self.manifest.get("stages", {})):
            target = self.path(name)
            if is_writer() and target.is_dir() and target.parent == self.root:
                shutil.rmtree(target, ignore_errors=True)
        for name in ("manifest.json", "summary.json"):
            if is_writer():
                self.path(name).unlink(missing_ok=True)
        self.manifest = {"format": MANIFEST_FORMAT, "stages": {}}

    def tidy(self, stage: str | None = None) -> None:
        """Remove what a killed process can leave behind: temporary files of interrupted atomic writes and, for a
        finished ``stage``, its resumable training checkpoints (its model is saved)."""
        if not is_writer():
            return
        folder = self.root if stage is None else self.path(stage)
        if stage is not None:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp*"):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)

    def check_inputs(self, stage: str, inputs_hash: str | None) -> None:
        """A stage recorded with other inputs (the data or an earlier stage changed) cannot be resumed or reused."""
        s = self.manifest["stages"].get(stage)
        if s and inputs_hash and s.get("inputs") and s["inputs"] != inputs_hash:
            raise RunError(f"{self.root}: stage '{stage}' was {'done' if s.get('status') == 'done' else 'started'} "
                           "with different inputs (the data or an earlier stage changed since); use another "
                           "--output, or --force-restart to start over")

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def save_manifest(self) -> None:
        if self.writer:
            atomic_write_json(self.manifest_path, self.manifest)

    def done(self, stage: str, inputs_hash: str | None = None) -> bool:
        s = self.manifest["stages"].get(stage)
        return bool(s and s.get("status") == "done" and (inputs_hash is None or s.get("inputs") == inputs_hash))

    @contextmanager
    def stage(self, name: str, inputs_hash: str | None = None):
        """Mark a stage running, then done with its wall time (``time/<name>_s``); a failure leaves it 'running'."""
        self.check_inputs(name, inputs_hash)
        entry = self.manifest["stages"].setdefault(name, {})
        entry.update(status="running", inputs=inputs_hash, started=time.time())
        self.save_manifest()
        t0 = time.perf_counter()
        yield entry
        entry.update(status="done", seconds=round(time.perf_counter() - t0, 2), finished=time.time())
        self.save_manifest()

    def record(self, key: str, value) -> None:
        """A run-level fact in the manifest (e.g. the generation backend used), updated when it changes."""
        if self.manifest.get(key) != value:
            self.manifest[key] = value
            self.save_manifest()

    def metrics(self, stage: str) -> dict:
        """The metrics a finished stage wrote ({} when it wrote none)."""
        path = self.path(stage, "metrics.json")
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{path} is corrupted; delete it and the '{stage}' entry of the manifest to redo the "
                           "stage, or --force-restart") from None

    def seconds(self, stage: str) -> float:
        return float(self.manifest["stages"].get(stage, {}).get("seconds", 0.0))


class Checkpointed(Protocol):
    """The current model of a run, as the stages save and restore it."""

    def save(self, stage: str) -> None: ...

    def resume_from(self, stage: str) -> None: ...


class Stages:
    """Runs the stages of a run in order. A stage's input hash covers its records and the hash of the stage before
    it (hence every earlier input): a done stage is reused, and a started one resumed, only when it matches."""

    def __init__(self, run: RunDir, dist, seed: int):
        self.run, self.dist = run, dist
        self.chain = [content_hash(["sgpo-run", seed])]
        self.current = "train"  # the stage now running (its training checkpoints go into its folder)
        self.on_stage: Callable[[str, dict], None] | None = None  # told every finished stage's metrics

    def run_stage(self, name: str, fn: Callable[[], dict], inputs: Sequence = (),
                  model: Checkpointed | None = None) -> dict:
        """``fn()`` as stage ``name`` unless done; its metrics (with ``time/<name>_s``) are written before the stage is
        marked done, so a kill never loses them. With ``model``, the stage ends by saving it (and a skipped stage
        makes its checkpoint the current model)."""
        self.chain.append(content_hash([self.chain[-1], name, [_identity(x) for x in inputs]]))
        self.dist.barrier()
        self.run.check_inputs(name, self.chain[-1])
        if self.run.done(name):
            if model is not None:
                model.resume_from(name)
            self.run.tidy(name)
            log.info("%s: done earlier, skipped", name)
            return self.run.metrics(name)
        self.current = PROFILE.stage = name
        with self.run.stage(name, self.chain[-1]):
            t0 = time.perf_counter()
            m = fn()
            if model is not None:
                model.save(name)
            m[f"time/{name}_s"] = round(time.perf_counter() - t0, 2)
            m.update(PROFILE.of(name, m[f"time/{name}_s"]))
            atomic_write_json(self.run.path(name, "metrics.json"), m)
            if self.on_stage is not None:
                self.on_stage(name, m)
        self.run.tidy(name)  # the stage's model is saved: its resumable training checkpoints are no longer needed
        self.dist.barrier()
        log.info("%s: done in %.0fs %s", name, m[f"time/{name}_s"], headline(m))
        return m


def _identity(record) -> tuple:
    """What of a stage's input record decides its outputs: id, prompt, reference, and the row's fields when it has
    any (a judge may read them); records without fields hash as they always have."""
    if not getattr(record, "fields", None):
        return (record.id, record.prompt, record.reference)
    return (record.id, record.prompt, record.reference, sorted(record.fields.items()))


def headline(m: dict) -> str:
    keys = ["pairs/kept", "rewards/accuracies", "rewards/margins", "nll/loss", "improver/changed_rate",
            "improver/win_rate", "eval/dev/win_rate_vs_start"]
    parts = [f"{k.split('/', 1)[-1] if k != 'pairs/kept' else 'pairs'}={m[k]:.3g}" for k in keys if k in m]
    return "| " + " ".join(parts) if parts else ""


def open_run(out_dir, cfg: Config, force_restart: bool, dist) -> RunDir:
    """Open (or create) the run directory on every process and save the config; all fail together or none does."""
    err: Exception | None = None
    run_dir = None
    try:
        run_dir = RunDir(out_dir, writer=dist.is_main)
        check_resume(run_dir, cfg, force_restart)
    except RunError as e:
        err = e
    if not dist.all_agree(err is None):
        raise err or RunError(f"{out_dir}: the main process could not open the run directory")
    dist.barrier()
    run_dir.tidy()
    from sgpo.core.files import atomic_write_text

    atomic_write_text(run_dir.path("config.yaml"), config_mod.dump(cfg))
    return run_dir


def check_resume(run: RunDir, cfg: Config, force_restart: bool) -> None:
    """An output directory holding a run with another config is an error naming the changed keys."""
    saved = run.path("config.yaml")
    if force_restart:
        run.clear()
        return
    if not saved.exists():
        if run.manifest["stages"]:
            raise RunError(f"{run.root} holds a run without its config.yaml; use another --output, or "
                           "--force-restart to start over")
        return
    import yaml

    try:
        old = yaml.safe_load(saved.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict):
        raise RunError(f"{saved} is corrupted; use another --output, or --force-restart to start over")
    if isinstance(old.get("version"), int) and old["version"] > config_mod.CONFIG_VERSION:
        raise RunError(f"{run.root} holds a run made by a newer sgpo (config version {old['version']}; this sgpo "
                       f"reads up to {config_mod.CONFIG_VERSION}); upgrade sgpo or use another --output")
    removed: list[str] = []
    old = _as_current(config_mod.to_dict(Config()), old, removed)
    if removed:
        log.info("resume: %d config key(s) of this run no longer exist and are ignored: %s", len(removed),
                 ", ".join(removed))
    changed = config_mod.diff(old, config_mod.to_dict(cfg))
    if changed:
        allow_changes(run, cfg, old, changed)


# keys that change what is measured, never what is trained
EVALUATION_KEYS = ("eval.", "report_to")
# keys that change how the run uses the machine, neither what it trains nor what it measures: they may change on
# resume and redo nothing (a run made before a default of theirs changed resumes)
MACHINE_KEYS = ("generation.vllm_gpu_memory", "collective_timeout_minutes")
AFTER_ROUNDS = ("final", "test", "test_second_judge")  # the stages after the last round


def allow_changes(run: RunDir, cfg: Config, old: dict, changed: list[str]) -> None:
    """What may change on resume. Evaluation settings: the finished training is kept and the test figures are
    recomputed (the figures stages already finished keep theirs, said in the log). More rounds (``rounds`` raised):
    when the earlier rounds' prompts do not move — no SFT step, whose slice follows the rounds' — the run goes on as a
    fresh run with more rounds would have gone. Machine settings (``MACHINE_KEYS``): taken, nothing redone. Anything
    else would change finished work: refused, naming the keys."""
    machine = [k for k in changed if k in MACHINE_KEYS]
    if machine:
        log.info("resume: machine settings changed (%s): nothing is redone", ", ".join(machine))
        changed = [k for k in changed if k not in MACHINE_KEYS]
        if not changed:
            return
    rest = [k for k in changed if not k.startswith(EVALUATION_KEYS) and k != "rounds"]
    more_rounds = "rounds" in changed and cfg.rounds > old["rounds"]
    if rest or ("rounds" in changed and not more_rounds):
        raise RunError(f"{run.root} holds a run with a different config (changed: {', '.join(changed)}); "
                       "use another --output, or --force-restart to start over")
    if more_rounds and cfg.sft and cfg.method != "sft":
        raise RunError(f"{run.root}: rounds {old['rounds']} → {cfg.rounds} would change finished work (the SFT "
                       "step's prompts follow the rounds' in the training pool); to go on from this run's model, "
                       f"start a new run from it: sgpo run CONFIG --set model.name={run.root / 'final'} --set sft=false "
                       f"--set rounds={cfg.rounds - old['rounds']} -o NEW_DIR")
    redo = [st for st in AFTER_ROUNDS if st in run.manifest["stages"] and (more_rounds or st != "final")]
    for st in redo:
        del run.manifest["stages"][st]
        if more_rounds and st != "final" and run.writer:  # its answers came from the old final model
            shutil.rmtree(run.path(st), ignore_errors=True)
    run.save_manifest()
    evaluation = [k for k in changed if k != "rounds"]
    if evaluation:
        log.info("resume: evaluation settings changed (%s): the finished training is kept, the test figures are "
                 "recomputed; stages finished before keep the figures they measured", ", ".join(evaluation))
    if more_rounds:
        log.info("resume: rounds %d → %d: rounds %d–%d follow, then the final model and its figures", old["rounds"],
                 cfg.rounds, old["rounds"] + 1, cfg.rounds)


def _as_current(defaults: dict, old: dict, removed: list[str], prefix: str = "") -> dict:
    """``old`` with the keys it lacks (added by a later sgpo) at their defaults, and without the keys a later sgpo
    removed (their dotted names appended to ``removed``)."""
    out = {}
    for k, v in old.items():
        if k not in defaults:
            removed.append(prefix + k)
        elif isinstance(v, dict) and isinstance(defaults[k], dict) and defaults[k]:  # a section (a mapping-valued
            # key such as data.fields defaults to {} and is a value)
            out[k] = _as_current(defaults[k], v, removed, prefix + k + ".")
        else:
            out[k] = v
    return {**defaults, **out}
