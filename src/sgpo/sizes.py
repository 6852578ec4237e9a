"""Sizes to check a plan against before anything is downloaded: a model's parameter count, the bytes of its
checkpoints, and an estimate of what one GPU holds under each training strategy (``python -m sgpo.sizes`` prints
the table of ``docs/multi-gpu.md``). All of it is arithmetic on parameter counts: estimates, not measurements."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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


def checkpoint_bytes(params: int, dtype: str, lora: bool) -> tuple[int, int]:
    """(a model folder, a training checkpoint) in bytes. The training checkpoint holds the weights and, for full
    fine-tuning, AdamW's two fp32 moments and, for low-precision weights, the fp32 masters (``MasterAdamW``); with
    LoRA the optimizer state is the adapter's, small beside the weights (not counted). Under ZeRO-3/FSDP it is split
    over the processes; the total is the same."""
    w = weight_bytes(dtype)
    if lora:
        return params * w, params * w
    return params * w, params * (w + 8 + (4 if w < 4 else 0))


@dataclass(frozen=True)
class Shape:
    """What activation memory depends on: layers, hidden size, MLP size, vocabulary."""
    params: float
    layers: int
    hidden: int
    mlp: int
    vocab: int


SHAPES = {"1B (Llama-3.2-1B)": Shape(1.24e9, 16, 2048, 8192, 128256),
          "8B (Llama-3-8B)": Shape(8.03e9, 32, 4096, 14336, 128256)}
STRATEGIES = ("single GPU / DDP", "ZeRO-2", "ZeRO-3 / FSDP", "LoRA (single GPU / DDP)")


def activation_bytes(shape: Shape, positions: int) -> float:
    """One micro-batch's activations in bf16 with gradient checkpointing: every layer's input kept, one layer's
    activations recomputed (attention and MLP), the kept logits and one fp32 log-sum-exp chunk of 1024 positions."""
    kept = shape.layers * shape.hidden * 2
    one_layer = (10 * shape.hidden + 3 * shape.mlp) * 2
    return positions * (kept + one_layer + shape.vocab * 2) + 1024 * shape.vocab * 4


def per_gpu_bytes(shape: Shape, strategy: str, gpus: int, positions: int) -> float:
    """Training memory on one GPU: bf16 weights and gradients, fp32 masters and Adam moments (16 bytes a parameter in
    all), sharded as the strategy shards them, plus one micro-batch of activations. LoRA: the frozen bf16 weights
    and an adapter of about 1% of the parameters with its gradients and optimizer state."""
    p = shape.params
    state = {"single GPU / DDP": 16 * p, "ZeRO-2": 2 * p + 14 * p / gpus, "ZeRO-3 / FSDP": 16 * p / gpus,
             "LoRA (single GPU / DDP)": 2 * p + 0.01 * p * 16}[strategy]
    return state + activation_bytes(shape, positions)


def fit_table(gpus: int = 8, positions: int = 8192) -> str:
    """The markdown table of ``per_gpu_bytes`` for each shape and strategy."""
    names = list(SHAPES)
    lines = [f"| strategy ({gpus} GPUs, {positions} positions per forward) | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for s in STRATEGIES:
        cells = [f"{per_gpu_bytes(SHAPES[n], s, gpus, positions) / GB:.0f} GB" for n in names]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(fit_table())
