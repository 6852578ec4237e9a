"""The current model of a run: where its weights are (``path``), the loaded copy (``model``), what rollouts generate
with (``generator``), and its checkpoints (``save``, ``resume_from``). Only the main process writes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from sgpo.config.schema import ModelConfig
from sgpo.core.files import atomic_dir, is_writer
from sgpo.models.loading import free_memory, load_model, resolve
from sgpo.core.phases import phase


class PolicyPart(Protocol):
    """What a run asks of its current model — ``Policy``, and the dry run's ``CountingPolicy``
    (``tests/run/test_protocols.py`` holds both to it): where its weights are (``path``; the start model's:
    ``start_path``), its ``tokenizer`` (None in a dry run), the ``run`` directory (``run.stages.RunDir``), and the
    members ``Policy`` documents. ``save`` and ``resume_from`` are what the stages ask (``run.stages.Checkpointed``)."""

    tokenizer: Any
    path: str
    start_path: str
    run: Any

    @property
    def model(self): ...

    @property
    def generator(self): ...

    def load(self, path: str): ...

    def model_at(self, path: str): ...

    def generator_at(self, path: str): ...

    def unload(self) -> None: ...

    def trained(self, exported: Path | None = None) -> None: ...

    def adopt(self, path: str) -> None: ...

    def resume_from(self, stage: str) -> None: ...

    def save(self, stage: str) -> None: ...


class Policy:
    """``run``: the run directory (checkpoints go to ``<stage>/model``, the last one to ``final/``); ``stages``: the
    running stage (a vLLM rollout saves the current weights into it); ``backend``: the rollouts' generation backend."""

    def __init__(self, cfg: ModelConfig, tokenizer, device: str, run, stages, dist, backend: str = "engine"):
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.run, self.stages, self.dist, self.backend = run, stages, dist, backend
        self.path = resolve(cfg.name)
        self.start_path = self.path    # the start model: the other side of every head-to-head
        self._model = None
        self._changed = False  # the in-memory weights differ from ``path`` (trained since it was saved)
        self._exported = False  # ``path`` is a sharded training call's export: the stage's checkpoint moves it

    @property
    def model(self):
        if self._model is None:
            self._model = self.load(self.path)
        return self._model

    @property
    def generator(self):
        """What rollouts generate with: the current model for the engine; for vLLM a checkpoint directory of exactly
        the current weights: ``path``, or, when training changed them since, the running stage's ``model/``, saved now
        (the stage's end then keeps it instead of saving again). The loaded copy is then let go (``release``)."""
        if self.backend != "vllm":
            return self.model
        if self._changed:
            self.save(self.stages.current)
        self.release()
        return self.path

    @phase("loading")
    def load(self, path: str):
        """A model from ``path`` on the run's device and dtype (a separate copy: the current model is untouched)."""
        return load_model(str(path), device=self.device, dtype=self.cfg.dtype)

    def model_at(self, path: str):
        """The current model when ``path`` holds it, else a copy loaded from ``path``."""
        return self.model if str(path) == self.path else self.load(path)

    def generator_at(self, path: str):
        """What a rollout of the model at ``path`` generates with (a vLLM worker loads a checkpoint itself)."""
        if self.backend == "vllm":
            if str(path) == self.path:
                return self.generator
            self.release()
            return str(path)
        return self.model_at(path)

    def unload(self) -> None:
        """Hand the current model's memory back (it is saved: the next use loads it again from ``path``)."""
        if self._changed:
            raise RuntimeError("the current model has unsaved training: save it before unloading")
        self._model = None
        free_memory()

    def release(self) -> None:
        """Before a vLLM rollout: the loaded copy of the current model is let go when ``path`` holds its weights. The
        engine runs beside this process on the same GPU, which the copy would share with it for the whole rollout
        (16 GB at 8B in bf16; vLLM refuses to start where less than its share is free); the next use (the reference
        pass, training) loads it again from ``path``, the folder vLLM has just read. Unsaved training is kept."""
        if self._model is not None and not self._changed:
            self.unload()

    def trained(self, exported: Path | None = None) -> None:
        """Training changed the weights in memory; sharded training (FSDP/DeepSpeed) leaves them split across ranks,
        and the run continues from their ``exported`` full copy instead."""
        free_memory()
        self._changed = True
        if exported is not None:
            self.path, self._model, self._changed, self._exported = str(exported), None, False, True

    def adopt(self, path: str) -> None:
        """The current model is the model folder at ``path`` (another run's checkpoint, loaded when needed); the
        running stage's end copies it into its own checkpoint."""
        self.path, self._model, self._changed, self._exported = str(path), None, False, False

    def resume_from(self, stage: str) -> None:
        """The stage is done: the current model is its checkpoint (loaded when needed)."""
        self.path, self._model, self._changed, self._exported = str(self.run.path(stage, "model")), None, False, False

    @phase("saving")
    def save(self, stage: str) -> None:
        """Save the current model as the stage's checkpoint atomically (main process only; the others wait).
        ``final/`` holds the model itself, every other stage keeps it in ``<stage>/model``."""
        path = self.run.path(stage) if stage == "final" else self.run.path(stage, "model")
        if not self._changed and self.path == str(path):  # saved already (for a vLLM rollout)
            return
        # the weights are a model folder already (an export, decided by the flag alone: the main process may have moved
        # it before another process looks): moved or copied, never loaded on every process to be saved again
        if self._exported or (not self._changed and Path(self.path).is_dir()):
            if is_writer():
                place_folder(Path(self.path), path, move=self._exported)
        else:
            save_model(self.model, self.tokenizer, path)
        self.dist.barrier()
        self.path, self._changed, self._exported = str(path), False, False


def place_folder(src: Path, dst: Path, move: bool) -> None:
    """``src``, a model folder, as ``dst`` (replaced atomically): renamed when ``move``, else copied."""
    with atomic_dir(dst) as tmp:
        shutil.rmtree(tmp, ignore_errors=True)
        if move:
            os.replace(src, tmp)
        else:
            shutil.copytree(src, tmp)


def save_model(model, tokenizer, path: Path) -> None:
    """Model and tokenizer into ``path`` atomically (main process only)."""
    with atomic_dir(path) as tmp:
        if is_writer():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
