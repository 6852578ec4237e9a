"""The shared optimisation loop: AdamW, warm-up, clipping, accelerate for devices and processes, checkpoints.

Several processes: ``batches`` is the global plan (the same on every rank). Each global batch is split into
disjoint slices, ``batch[rank::world]``; each rank's loss is scaled by its share of the batch's weight (examples, or
completion tokens for NLL) times the world size, so that the gradient averaged across ranks is the gradient of the
whole batch's loss. ``train.batch_size``/``dpo.batch_size`` therefore mean examples per optimizer step over all
processes, and a run with N processes follows the same trajectory as a run with one (to float tolerance).

Checkpoints (``checkpoint_dir``): every ``checkpoint_every`` steps and after the last step, the model, optimizer,
scheduler, step, metric history and RNG states are written atomically to ``checkpoint_dir/step_<n>``; only the
latest is kept. A later call with the same ``checkpoint_dir`` and the same batch plan resumes after that step.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sgpo.core.files import RunError, atomic_write_text, fsync_dir, is_writer, write_error

CHECKPOINT_FORMAT = 1


LOW_PRECISION = (torch.bfloat16, torch.float16)


def make_optimizer(model, lr: float, weight_decay: float = 0.0, masters: bool = True):
    """AdamW over the trainable parameters; over fp32 master copies (``MasterAdamW``) when some are bf16/fp16 and
    ``masters`` (off where the launcher keeps fp32 masters itself: DeepSpeed ZeRO, FSDP)."""
    params = [p for p in model.parameters() if p.requires_grad]
    cls = MasterAdamW if masters and any(p.dtype in LOW_PRECISION for p in params) else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=weight_decay, fused=False, foreach=True)


class MasterAdamW(torch.optim.AdamW):
    """AdamW on fp32 master copies of low-precision (bf16/fp16) parameters: the gradients are read into the masters,
    the update is computed and accumulated in fp32, and the model's parameters are the masters rounded. Without it an
    update below half of bf16's spacing (≈6e-5 near |w| = 0.02; DPO's 5e-7 steps) rounds to nothing and training
    silently stalls. The masters travel with the optimizer's ``state_dict``: a resumed run continues from them."""

    def __init__(self, params, **kwargs):
        self.model_params = list(params)
        masters = [p.detach().float().clone().requires_grad_(True) for p in self.model_params]
        super().__init__(masters, **kwargs)

    @property
    def masters(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self.model_params, self.masters):
            m.grad = None if p.grad is None else p.grad.detach().float()
        loss = super().step(closure)
        for p, m in zip(self.model_params, self.masters):
            p.copy_(m)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.model_params:
            p.grad = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "masters": [m.detach() for m in self.masters]}  # no copy: 4 bytes a weight

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters", None)
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, m, saved in zip(self.model_params, self.masters, masters or []):
                m.copy_(saved)
                p.copy_(saved)


def warmup_schedule(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0)


def plan_fingerprint(batches: Sequence, **settings) -> str:
    """A hash of the batch plan and the optimisation settings: a checkpoint only resumes the run it belongs to."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for b in batches:
        h.update(repr(b).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _is_sharded(accelerator) -> bool:
    from sgpo.core.distributed import is_sharded

    return is_sharded(accelerator)


class Checkpoints:
    """The checkpoints of one training call, in ``root/step_<n>`` folders (the latest complete one counts)."""

    def __init__(self, root: str | Path, accelerator=None):
        self.root = Path(root)
        self.acc = accelerator
        self.sharded = _is_sharded(accelerator)

    def latest(self) -> Path | None:
        if not self.root.is_dir():
            return None
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and (p / "meta.json").exists())
        return done[-1] if done else None

    @property
    def writer(self) -> bool:
        return is_writer() and (self.acc is None or self.acc.is_main_process)

    def _barrier(self):
        if self.acc is not None and self.acc.num_processes > 1:
            self.acc.wait_for_everyone()

    def _gather(self, obj):
        if self.acc is None or self.acc.num_processes <= 1:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def save(self, step: int, model, optimizer, scheduler, history: list[dict], fingerprint: str) -> None:
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".step_{step:07d}.tmp"
        rng = self._gather(_rng_state())  # a collective: every rank takes part
        if self.writer:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                raise RunError(f"cannot write checkpoint {tmp}: {e.strerror or e}") from None
        self._barrier()
        try:
            if self.sharded:  # each rank writes its shard of the weights and optimizer state
                self.acc.save_state(str(tmp / "accelerate"))
            if self.writer:
                extra = {"scheduler": scheduler.state_dict(), "rng": rng}
                if not self.sharded:
                    extra.update(model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                                 optimizer=optimizer.state_dict())
                with open(tmp / "state.pt", "wb") as f:
                    torch.save(extra, f)
                    f.flush()
                    os.fsync(f.fileno())
                meta = {"format": CHECKPOINT_FORMAT, "step": step, "fingerprint": fingerprint, "history": history,
                        "world_size": self.acc.num_processes if self.acc is not None else 1, "sharded": self.sharded}
                atomic_write_text(tmp / "meta.json", json.dumps(meta) + "\n")
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            if self.writer:
                shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(final, e) from None
        self._barrier()
        if self.writer:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.root)
            for old in self.root.glob("step_*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def load(self, path: Path, model, optimizer, scheduler, fingerprint: str, rank: int) -> tuple[int, list[dict]]:
        """Restore a checkpoint into model/optimizer/scheduler/RNG; returns (steps done, metric history)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            step, history = int(meta["step"]), list(meta["history"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"training checkpoint {path} is corrupted ({type(e).__name__}); delete it to redo this "
                           "stage's training from its start") from None
        if meta.get("format", 1) > CHECKPOINT_FORMAT:
            raise RunError(f"training checkpoint {path} was written by a newer sgpo")
        if meta.get("fingerprint") != fingerprint:
            raise RunError(f"training checkpoint {path} belongs to other training data or settings; delete it to "
                           "redo this stage's training from its start")
        if bool(meta.get("sharded")) != self.sharded:
            raise RunError(f"training checkpoint {path} was written "
                           f"{'with' if meta.get('sharded') else 'without'} sharded training (FSDP/DeepSpeed); "
                           "resume it with the same launcher configuration")
        try:
            with open(path / "state.pt", "rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
            if self.sharded:
                self.acc.load_state(str(path / "accelerate"))
            else:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rng = state["rng"]
            _set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        except Exception as e:  # truncated or tampered file: say which and how to recover
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise RunError(f"training checkpoint {path} is corrupted ({type(e).__name__}: {msg}); delete it to "
                           "redo this stage's training from its start") from None
        return step, history


def _split(batch, weight_fn, rank: int, world: int):
    """This rank's slice of a global batch and its share of the batch's weight (0 for a padding slice)."""
    if world <= 1:
        return batch, 1.0
    part = batch[rank::world]
    total = weight_fn(batch)
    share = (weight_fn(part) / total) if (part and total) else 0.0
    if not part:  # fewer items than ranks: run one item with weight 0 so every rank joins the gradient sync
        part = batch[:1]
    return part, share


@dataclass(frozen=True)
class Optim:
    """The optimiser settings of a training call (from the ``train`` or ``dpo`` config section)."""
    lr: float
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    checkpoint_every: int = 0
    checkpoint_minutes: float = 0.0


@dataclass
class Job:
    """What a training call needs besides its config section and its data."""
    pad_id: int
    seed: int
    desc: str = "train"
    accelerator: Any = None
    checkpoint_dir: str | Path | None = None
    """Resumable checkpoints of this call (``None``: none written, nothing resumed)."""
    show_progress: bool = True
    max_positions: int | None | str = "auto"
    """Positions per forward pass (a larger batch runs in exact micro-batches); ``auto`` = ``default_max_positions``."""
    on_step: Callable[[int, dict], None] | None = None
    """Called on the main process after every optimizer step with (steps done, the step's metrics and
    ``train/learning_rate``): the experiment trackers' feed."""
    tokenizer: Any = None
    """Saved beside the weights a sharded call exports, so that the export is a whole model folder."""


def run_steps(model, batches: list, step_fn: Callable, opt: Optim, job: Job,
              weight_fn: Callable[[list], float] = len, backward=None) -> list[dict]:
    """Run one optimizer step per global batch. ``step_fn(model, part, batch) -> (loss, metrics dict)``: ``part`` is
    this rank's slice of the global ``batch``, the loss a mean over ``part`` weighted as ``weight_fn`` counts it
    (examples by default); a loss whose terms are weighted otherwise reads ``batch`` to weigh them exactly.
    ``backward``: the step function's ``SliceBackward`` when it back-propagates micro-batches itself (told the wrapped
    model, each step's scale and every rank's slice of the step's batch, so that all ranks make the same number of
    passes).

    Returns the per-step metrics, already averaged across processes (weighted by each rank's share).
    With sharded training (FSDP/DeepSpeed) and a ``checkpoint_dir``, the trained weights are also exported as an
    ordinary HF checkpoint to ``checkpoint_dir/weights`` (see ``exported_weights``).
    """
    from tqdm.auto import tqdm

    acc = job.accelerator
    world = acc.num_processes if acc is not None else 1
    state = _TrainState.begin(model, batches, opt, job)
    bar = tqdm(total=len(batches), initial=state.start, desc=job.desc, leave=False,
               disable=not job.show_progress or state.rank != 0, unit="step")
    if backward is not None:
        backward.model = state.pmodel
    try:
        for i in range(state.start, len(batches)):
            part, share = _split(batches[i], weight_fn, state.rank, world)
            if backward is not None:  # every rank's slice too: each makes as many passes as the rank needing most
                backward.scale = share * world if world > 1 else 1.0
                backward.peers = [_split(batches[i], weight_fn, r, world)[0] for r in range(world)] if world > 1 else []
            loss, metrics = step_fn(state.pmodel, part, batches[i])
            state.update(loss * (share * world) if world > 1 else loss, opt.max_grad_norm, acc)
            metrics = {k: float(v) for k, v in metrics.items()}
            if world > 1:
                metrics = _combine(acc, metrics, share)
            state.history.append(metrics)
            if job.on_step is not None and state.rank == 0:
                job.on_step(i + 1, {**metrics, "train/learning_rate": state.scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
            if state.ckpt and state.checkpoint_due(i + 1, len(batches), opt, acc):
                state.ckpt.save(i + 1, model, state.optimizer, state.scheduler, state.history, state.fingerprint)
                state.saved_at = time.monotonic()
    finally:
        bar.close()
    if state.sharded and job.checkpoint_dir is not None:
        _export(acc, state.pmodel, exported_weights(job.checkpoint_dir), job.tokenizer, state.dtype)
    if acc is not None:
        acc.free_memory()
    model.eval()
    return state.history


@dataclass
class _TrainState:
    """Optimizer, scheduler, checkpoints and the (possibly wrapped) model of one ``run_steps`` call."""
    pmodel: Any
    optimizer: Any
    popt: Any
    scheduler: Any
    ckpt: Checkpoints | None
    fingerprint: str
    rank: int
    sharded: bool
    start: int = 0
    history: list = field(default_factory=list)
    saved_at: float = field(default_factory=time.monotonic)  # when the last checkpoint was written (or training began)
    dtype: Any = None  # the weights' dtype before ``prepare`` (FSDP upcasts what it shards): the export's

    def checkpoint_due(self, done: int, total: int, opt: Optim, accelerator) -> bool:
        """After the last step, every ``checkpoint_every`` steps, and when ``checkpoint_minutes`` have passed since the
        last checkpoint — by the main process's clock, so that every process agrees (a checkpoint is a collective)."""
        if done == total or (opt.checkpoint_every and done % opt.checkpoint_every == 0):
            return True
        if not opt.checkpoint_minutes:
            return False
        due = time.monotonic() - self.saved_at >= 60 * opt.checkpoint_minutes
        from sgpo.core.distributed import Dist

        return Dist(accelerator).broadcast(due)

    @classmethod
    def begin(cls, model, batches: list, opt: Optim, job: Job) -> "_TrainState":
        """Build the optimizer, restore the latest checkpoint of ``job`` when there is one, wrap for accelerate."""
        acc = job.accelerator
        sharded = _is_sharded(acc)
        if sharded:
            check_sharded_precision(acc, model)
        optimizer = make_optimizer(model, opt.lr, opt.weight_decay, masters=not sharded)
        scheduler = warmup_schedule(optimizer, opt.warmup_steps)
        fingerprint = plan_fingerprint(batches, lr=opt.lr, weight_decay=opt.weight_decay,
                                       warmup_steps=opt.warmup_steps, max_grad_norm=opt.max_grad_norm)
        ckpt = Checkpoints(job.checkpoint_dir, acc) if job.checkpoint_dir is not None else None
        rank = acc.process_index if acc is not None else 0
        start, history = 0, []
        latest = ckpt.latest() if ckpt else None
        if latest is not None and not sharded:  # restore before wrapping: every rank reads the same files
            start, history = ckpt.load(latest, model, optimizer, scheduler, fingerprint, rank)
        pmodel, popt, dtype = model, optimizer, weights_dtype(model)
        if acc is not None:
            acc.free_memory()
            _deepspeed_batch_sizes(acc, batches, acc.num_processes)
            pmodel, popt = acc.prepare(model, optimizer)
            if latest is not None and sharded:
                start, history = ckpt.load(latest, pmodel, popt, scheduler, fingerprint, rank)
        pmodel.train()
        return cls(pmodel, optimizer, popt, scheduler, ckpt, fingerprint, rank, sharded, start, history, dtype=dtype)

    def update(self, loss, max_grad_norm: float, accelerator) -> None:
        """Backward, clip, optimizer and scheduler step."""
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if max_grad_norm and max_grad_norm > 0:
            if accelerator is not None:
                accelerator.clip_grad_norm_(self.pmodel.parameters(), max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_([p for p in self.pmodel.parameters() if p.grad is not None],
                                               max_grad_norm)
        self.popt.step()
        self.scheduler.step()
        self.popt.zero_grad(set_to_none=True)


def check_sharded_precision(accelerator, model) -> None:
    """Sharded training keeps fp32 masters only under mixed precision (FSDP upcasts the weights it shards, DeepSpeed's
    bf16 optimizer keeps fp32 copies): bf16/fp16 weights launched with ``mixed_precision: no`` would be updated in
    bf16, where DPO's steps round to nothing. Refused with what to do instead."""
    low = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype in LOW_PRECISION]
    if low and accelerator.mixed_precision == "no":
        raise RunError(f"{len(low)} trainable weights are {model.dtype} but the launcher's mixed_precision is 'no': "
                       "sharded training would update them in low precision, where small steps (DPO's) round to "
                       "nothing. Launch with --mixed_precision bf16 (as configs/accelerate/*.yaml do), or set "
                       "model.dtype: float32")


def _deepspeed_batch_sizes(accelerator, batches: list, world: int) -> None:
    """DeepSpeed wants batch sizes at ``prepare`` time (normally read from a dataloader, which this loop has not)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not batches:
        return
    conf = plugin.deepspeed_config
    per_rank = max(1, -(-max(len(b) for b in batches) // world))
    if conf.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        conf["train_micro_batch_size_per_gpu"] = per_rank
    if conf.get("train_batch_size", "auto") == "auto":
        conf["train_batch_size"] = per_rank * world * int(conf.get("gradient_accumulation_steps", 1) or 1)


def exported_weights(checkpoint_dir: str | Path) -> Path:
    """Where sharded training leaves the full trained weights (an HF checkpoint) for generation and saving."""
    return Path(checkpoint_dir) / "weights"


def weights_dtype(model) -> torch.dtype:
    """The dtype of a model's weights (its first floating-point parameter's, as transformers reports it)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _full_state(accelerator, pmodel) -> dict | None:
    """The full weights of a sharded model on the main process, None on the others. ZeRO-1/2 replicate the weights:
    only the main process, which saves them, copies them to the CPU (not one copy per process). ZeRO-3 and FSDP2 gather
    them with every process taking part (a collective); accelerate leaves the result on the main process only."""
    from sgpo.core.distributed import is_deepspeed

    conf = accelerator.deepspeed_config if is_deepspeed(accelerator) else None
    if conf is not None and conf["zero_optimization"]["stage"] < 3 and conf.get("tensor_parallel", {}).get(
            "autotp_size", 0) <= 1:
        if not accelerator.is_main_process:
            return None
        from deepspeed.checkpoint.utils import clone_tensors_for_torch_save

        return clone_tensors_for_torch_save(accelerator.unwrap_model(pmodel).state_dict())
    state = accelerator.get_state_dict(pmodel)
    return state if accelerator.is_main_process else None


def _in_dtype(state: dict, dtype) -> dict:
    """``state``'s floating-point tensors in ``dtype`` (converted one at a time: the peak is one tensor more)."""
    for k, v in state.items():
        if dtype is not None and v.is_floating_point() and v.dtype != dtype:
            state[k] = v.to(dtype)
    return state


def _export(accelerator, pmodel, out: Path, tokenizer=None, dtype=None) -> None:
    """The full weights of a sharded model (and ``tokenizer``) as an HF model folder in ``out``, in ``dtype``: the
    dtype the model was loaded in (under mixed precision FSDP2 keeps, and gathers, its shards in fp32; an fp32 export
    of a bf16 model would double every later load and make vLLM serve fp32)."""
    state = _full_state(accelerator, pmodel)
    if accelerator.is_main_process:
        from sgpo.core.files import atomic_dir
        from sgpo.training.adapters import merged_state

        model = accelerator.unwrap_model(pmodel)
        state = merged_state(model, state)  # LoRA: merged on the gathered weights, a full model for vLLM and the run
        state = _in_dtype(state, dtype)
        model = getattr(model, "get_base_model", lambda: model)()
        # a tied weight (lm_head = embed_tokens) comes back gathered as a copy of its own: saved once, as a plain save
        first: dict[int, str] = {}
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, state_dict={k: v for k, v in state.items() if k not in tied},
                                  safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()


def _combine(accelerator, metrics: dict, share: float) -> dict:
    """Per-rank means → the mean over the whole global batch (each rank weighted by its share)."""
    from accelerate.utils import gather_object

    parts = gather_object([(metrics, share)])
    keys = sorted({k for m, _ in parts for k in m})
    out = {}
    for k in keys:
        num = sum(m[k] * s for m, s in parts if k in m)
        den = sum(s for m, s in parts if k in m)
        out[k] = num / den if den else float("nan")
    return out


def mean_metrics(history: list[dict]) -> dict:
    keys = {k for h in history for k in h}
    return {k: sum(h[k] for h in history if k in h) / max(1, sum(1 for h in history if k in h)) for k in keys}
