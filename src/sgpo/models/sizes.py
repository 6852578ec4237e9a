"""Sizes to check a plan against before anything is downloaded: a model's parameter count, the bytes of its
checkpoints, an estimate of what one GPU holds under each training strategy, the vLLM engine's default share of the
GPU beside it (``python -m sgpo.models.sizes`` prints the tables of ``docs/multi-gpu.md``), and ``peak_bytes``, the
measurement the estimate is checked against (``tests/models/test_memory.py`` on a CPU, ``benchmarks/gpu_check.py`` on a
GPU). The estimates are arithmetic on a model's shape: not measurements."""
from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

GB = 1e9
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def parameter_count(name: str) -> tuple[int | None, str]:
    """(parameters, how they were found) for a model name without downloading: counted on an empty (meta) model built
    from a ``config.json`` already on disk (a local folder, or the Hugging Face cache), else read from the name
    ("Meta-Llama-3-8B" → 8e9, "smollm2-135m" → 1.35e8), else (None, "unknown")."""
    config = _local_config(name)
    if config is not None:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters()), "counted from its config"
    found = re.findall(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z])", name.rsplit("/", 1)[-1])
    if found:
        number, unit = found[-1]
        return int(float(number) * (1e9 if unit in "Bb" else 1e6)), "read from the name"
    return None, "unknown"


def _local_config(name: str):
    from transformers import AutoConfig

    if name.startswith("sgpo:"):
        return None
    try:
        if (Path(name) / "config.json").exists():
            return AutoConfig.from_pretrained(name)
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def weight_bytes(dtype: str) -> int:
    """Bytes per weight for a ``model.dtype``; ``auto`` counts bf16, what it gives on a GPU."""
    return _DTYPE_BYTES.get(dtype, 2)


def checkpoint_bytes(params: int, dtype: str, lora: bool, sharded: bool = False) -> tuple[int, int]:
    """(a model folder, a training checkpoint) in bytes. The training checkpoint holds the weights and, for full
    fine-tuning, AdamW's two fp32 moments and, for low-precision weights, the fp32 masters (``MasterAdamW`` with one
    process or DDP; DeepSpeed's own under ZeRO-2): 14 bytes a bf16 parameter. ``sharded`` (ZeRO-3, FSDP2): 12 bytes a
    parameter whatever the dtype, split over the processes: ZeRO-3 saves its fp32 partitions and moments but not the
    bf16 weights (``save_checkpoint`` writes the partitioned parameters as empty placeholders), and FSDP2 under mixed
    precision saves its fp32 shards and the moments. With LoRA the optimizer state is the adapter's, small beside the
    weights (not counted)."""
    w = weight_bytes(dtype)
    if lora:
        return params * w, params * w
    if sharded:
        return params * w, params * 12
    return params * w, params * (w + 8 + (4 if w < 4 else 0))


@dataclass(frozen=True)
class Shape:
    """What training memory depends on: parameters, layers, hidden size, MLP size, vocabulary, tied embeddings."""
    params: float
    layers: int
    hidden: int
    mlp: int
    vocab: int
    tied: bool = False

    @property
    def outer(self) -> float:
        """Parameters outside the decoder layers: the embeddings and the LM head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def layer(self) -> float:
        """Parameters of one decoder layer."""
        return (self.params - self.outer) / self.layers


SHAPES = {"1B (Llama-3.2-1B)": Shape(1.24e9, 16, 2048, 8192, 128256, tied=True),
          "8B (Llama-3-8B)": Shape(8.03e9, 32, 4096, 14336, 128256)}
OTHER_SHAPES = {"7B (Qwen2.5-7B)": Shape(7.62e9, 28, 3584, 18944, 152064)}  # for the dry run of the Qwen configs
STRATEGIES = ("single GPU", "DDP", "ZeRO-2", "ZeRO-3", "FSDP", "LoRA (single GPU / DDP)")
LSE_CHUNK = 1024      # = training.batching.LSE_CHUNK: positions whose log-sum-exp is taken at once, in fp32
LORA_SHARE = 0.01     # an adapter's parameters as a share of the model's (r=16 on Llama-3-8B's linear layers: 0.5%)
DS_BUCKET = 5e8 * 2   # DeepSpeed's reduce bucket: reduce_bucket_size (5e8 elements, its default) in bf16
DS_LIVE = 1e9 * 2     # ZeRO-3's gathered weights at most: stage3_max_live_parameters (1e9, its default) in bf16


def activation_bytes(shape: Shape, positions: int) -> float:
    """One micro-batch's activations in bf16 with gradient checkpointing: every layer's input kept, one layer's
    activations recomputed (attention and MLP), and at the LM head, for every kept position, its bf16 logits and
    their fp32 copies, which autograd keeps for the backward of the chunked log-sum-exp
    (``batching.logsumexp_fp32``: 6 bytes a position and word), with the backward's transients for one chunk (12
    bytes a position and word over ``LSE_CHUNK`` positions). The logit terms were measured on a CPU (the bf16 loss
    functions alone: 6.5 and 12 bytes at 8,192 and 1,024 positions)."""
    kept = shape.layers * shape.hidden * 2
    one_layer = (10 * shape.hidden + 3 * shape.mlp) * 2
    logits = shape.vocab * (2 + 4)
    return positions * (kept + one_layer + logits) + 12 * min(positions, LSE_CHUNK) * shape.vocab


def state_bytes(shape: Shape, strategy: str, gpus: int) -> tuple[float, float]:
    """(during the forward and backward passes, at the optimizer step): the bytes of weights, gradients and optimizer
    state one GPU holds, with the framework's buffers. One GPU: bf16 weights and gradients, MasterAdamW's fp32 masters
    and two fp32 moments (16 bytes a parameter); at the step also the masters' fp32 gradients (``MasterAdamW.step``)
    and foreach AdamW's fp32 temporary (the square root of the second moment): 24 bytes, measured on a CPU
    (``tests/models/test_memory.py``). DDP adds its gradient buckets (a bf16 copy of the gradients). ZeRO-2 keeps the bf16
    weights whole and shards the rest, with DeepSpeed's reduce bucket; ZeRO-3 shards everything, with the bucket and
    its gathered weights; FSDP2 under mixed precision keeps fp32 shards and fp32 gradients (no separate masters), and
    gathers the embeddings and LM head (kept from forward to backward) and two layers at a time in bf16, with their
    gradients. LoRA: the frozen bf16 weights and an fp32 adapter (PEFT's) of ``LORA_SHARE`` of the parameters."""
    p, n = shape.params, gpus
    if strategy in ("single GPU", "DDP"):
        extra = 2 * p if strategy == "DDP" else 0.0
        return 16 * p + extra, 24 * p + extra
    if strategy == "ZeRO-2":
        return 2 * p + 14 * p / n + DS_BUCKET, 2 * p + 22 * p / n + DS_BUCKET
    if strategy == "ZeRO-3":
        return 16 * p / n + DS_BUCKET + min(DS_LIVE, 2 * p), 24 * p / n + DS_BUCKET
    if strategy == "FSDP":
        return 16 * p / n + 2 * 2 * (shape.outer + 2 * shape.layer), 20 * p / n
    if strategy.startswith("LoRA"):
        a = LORA_SHARE * p
        return 2 * p + 16 * a, 2 * p + 20 * a
    raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


def per_gpu_bytes(shape: Shape, strategy: str, gpus: int, positions: int) -> float:
    """Training memory on one GPU at its peak: the state during the passes plus one micro-batch's activations, or the
    state at the optimizer step, whichever is larger (``state_bytes``, ``activation_bytes``). Not counted: CUDA's
    context (~1 GB) and the allocator's fragmentation."""
    passes, step = state_bytes(shape, strategy, gpus)
    return max(passes + activation_bytes(shape, positions), step)


def reference_pass_bytes(shape: Shape, positions: int, kept: int | None = None) -> float:
    """The reference pass (no gradients) of one forward of ``positions``: the bf16 weights, one layer's activations,
    and the logits of the ``kept`` positions (default: all, an upper bound; packed pairs keep their responses' only)
    in bf16, with one log-sum-exp chunk of them in fp32 and its temporary."""
    kept = positions if kept is None else kept
    one_layer = (10 * shape.hidden + 3 * shape.mlp) * 2
    return (2 * shape.params + positions * one_layer + 2 * kept * shape.vocab
            + 8 * min(kept, LSE_CHUNK) * shape.vocab)


# -- vLLM beside training ----------------------------------------------------------------------------------------------

VLLM_SHARES = {"single GPU": 0.3, "DDP": 0.3, "ZeRO-2": 0.35, "ZeRO-3": 0.5, "FSDP": 0.5,
               "LoRA (single GPU / DDP)": 0.5}
"""``generation.vllm_gpu_memory`` = 0: the share of each GPU the strategy's vLLM engine takes, kept for the whole run,
training included. Chosen for the paper's machine (80 GB GPUs, 8 of them, 8,192 positions a forward): ZeRO-3, FSDP
and LoRA train an 8B model in about 30 GB (``per_gpu_bytes``), which leaves vLLM half the GPU (16 GB of weights, the
rest KV cache); ZeRO-2 at 8B needs about 43 GB, hence 0.35 (28 GB); full fine-tuning with one GPU or DDP fits only up
to about 2B parameters on 80 GB, whose engine is served well by 0.3 (a 1B model needs 2.5 GB of weights)."""
CUDA_CONTEXT = 1 * GB
PAPER_GPU = 80 * GB


def launch_strategy(lora: bool = False, env: dict | None = None) -> str:
    """The strategy (a key of ``VLLM_SHARES``) this process was launched with, from the launcher's environment
    (accelerate sets ``ACCELERATE_USE_DEEPSPEED`` with ``ACCELERATE_DEEPSPEED_ZERO_STAGE``, ``ACCELERATE_USE_FSDP``,
    and the process count in ``WORLD_SIZE``). ZeRO-1 and an unknown stage count as ZeRO-2 (weights replicated);
    ``lora`` on one GPU or DDP is the LoRA row."""
    env = os.environ if env is None else env
    on = lambda key: env.get(key, "").lower() in ("1", "true")  # noqa: E731
    if on("ACCELERATE_USE_DEEPSPEED"):
        return "ZeRO-3" if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "ZeRO-2"
    if on("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if lora:
        return "LoRA (single GPU / DDP)"
    return "DDP" if int(env.get("WORLD_SIZE", "1") or 1) > 1 else "single GPU"


def vllm_share(configured: float, strategy: str) -> float:
    """The GPU share a vLLM engine gets: ``generation.vllm_gpu_memory`` when set (> 0), else the strategy's default."""
    return configured if configured > 0 else VLLM_SHARES[strategy]


def model_shape(name: str) -> tuple[Shape | None, str]:
    """The shape of ``name`` for the estimates, and where it came from: its ``config.json`` when one is on disk, else
    the known shape (``SHAPES``, ``OTHER_SHAPES``) nearest the parameter count read from its name (within 25%)."""
    config = _local_config(name)
    if config is not None and getattr(config, "num_hidden_layers", None):
        params, _ = parameter_count(name)
        return Shape(params, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                     config.vocab_size, bool(getattr(config, "tie_word_embeddings", False))), "its config"
    params, _ = parameter_count(name)
    if params is None:
        return None, "unknown"
    label, shape = min({**SHAPES, **OTHER_SHAPES}.items(), key=lambda kv: abs(kv[1].params - params))
    if abs(shape.params - params) > 0.25 * params:
        return None, "unknown"
    return shape, f"the shape of {label}"


def memory_lines(cfg, gpu_bytes: float = PAPER_GPU, gpus: int = 8, positions: int = 8192) -> list[str]:
    """The dry run's lines on GPU memory with vLLM: each strategy's engine share (``generation.vllm_gpu_memory``, or
    the strategy's default), the GPU memory it leaves to training and, when the model's shape is known, training's
    estimate for it, on ``gpus`` GPUs of ``gpu_bytes``. Nothing for the built-in engine."""
    if cfg.generation.backend == "engine":
        return []
    set_share = cfg.generation.vllm_gpu_memory
    shape, how = model_shape(cfg.model.name)
    rows = [s for s in STRATEGIES if s.startswith("LoRA") == (cfg.model.lora_r > 0)]
    shares = {s: vllm_share(set_share, s) for s in rows}
    left = {s: (1 - shares[s]) * gpu_bytes - CUDA_CONTEXT for s in rows}
    which = (f"generation.vllm_gpu_memory={set_share:g} for every strategy" if set_share > 0 else
             "generation.vllm_gpu_memory=0: each strategy's default share, sizes.VLLM_SHARES")
    head = f"vLLM beside training: each process's engine keeps its share of the GPU while training runs ({which})."
    if shape is None:  # the shares and what they leave, without an estimate to hold them against
        text = (f"{head} On {gpu_bytes / GB:.0f} GB GPUs, CUDA's context out, that leaves training "
                + ", ".join(f"{left[s] / GB:.0f} GB under {s} ({shares[s]:g})" for s in rows)
                + "; no estimate of what training needs: the model's shape is unknown here.")
        return textwrap.wrap(text, 118, subsequent_indent="  ")
    text = (f"{head} Estimates (sizes.per_gpu_bytes) for {gpus} GPUs of {gpu_bytes / GB:.0f} GB, {how}, "
            f"{positions:,} positions a forward, CUDA's context taken out:")
    lines = textwrap.wrap(text, 118) + [f"  {'strategy':<24}{'vLLM share':>11}{'left to training':>18}"
                                         f"{'training needs':>16}"]
    for s in rows:
        need = per_gpu_bytes(shape, s, gpus, positions)
        lines.append(f"  {s:<24}{shares[s]:>11.2f}{left[s] / GB:>15.0f} GB{need / GB:>13.0f} GB"
                     + ("  fits" if need <= left[s] else "  does not fit"))
    return lines


# -- the measurement ---------------------------------------------------------------------------------------------------

def peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """The most memory that tensors allocated while ``fn()`` ran held at once on ``device``, above what was allocated
    when it started. On CUDA, the caching allocator's peak; on a CPU, torch's own allocations as the profiler records
    them (every allocation and free of PyTorch's CPU allocator, added up in time order): exact, and blind to what
    glibc or Python hold, unlike RSS."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def held_bytes(model) -> int:
    """The bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def fit_table(gpus: int = 8, positions: int = 8192) -> str:
    """The markdown table of ``per_gpu_bytes`` for each shape and strategy."""
    names = list(SHAPES)
    lines = [f"| strategy ({gpus} GPUs, {positions} positions per forward) | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for s in STRATEGIES:
        cells = [f"{per_gpu_bytes(SHAPES[n], s, gpus, positions) / GB:.0f} GB" for n in names]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def share_table(gpu_bytes: float = PAPER_GPU, gpus: int = 8, positions: int = 8192) -> str:
    """The markdown table of each strategy's default vLLM share and the memory it leaves to training at 8B."""
    shape = SHAPES["8B (Llama-3-8B)"]
    lines = [f"| strategy | default `generation.vllm_gpu_memory` | vLLM | left to training ({gpu_bytes / GB:.0f} GB "
             f"GPU, CUDA's context out) | training at 8B (estimate) |", "|---|---|---|---|---|"]
    for s in STRATEGIES:
        share = VLLM_SHARES[s]
        left = (1 - share) * gpu_bytes - CUDA_CONTEXT
        need = per_gpu_bytes(shape, s, gpus, positions)
        lines.append(f"| {s} | {share:g} | {share * gpu_bytes / GB:.0f} GB | {left / GB:.0f} GB | "
                     f"{need / GB:.0f} GB{'' if need <= left else ' (does not fit)'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(fit_table())
    print()
    print(share_table())
