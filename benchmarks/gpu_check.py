"""The GPU check: one prepared script, one GPU, no network; prints one JSON line. Meant to stay under 8 minutes on one
H100 (the memory step under one by arithmetic: an 8B forward of 8,192 positions is ~1.3e14 FLOPs); not yet run on a
GPU in this form. An earlier version (SmolLM2-135M's architecture, engine and DPO only) ran once, on an H100 on
2026-11-27 (docs/performance.md).

Randomly initialised models (built from a config: nothing downloaded), bf16:

1. ``run``: ``sgpo run`` (SGPO, one round) with ``generation.backend=engine``, the built-in engine (the manifest's
   ``generation_backend`` is checked): SFT, improver training, a DPO round, Llama-3.2-1B's shape; for each training
   stage the share of weights it changed, compared in the export's own dtype, and that dtype (bf16 on a GPU: fp32
   masters, DPO at 5e-7 must still move bf16 weights);
2. the reference pass at the paper's shapes (32 pairs of a 2,560-token prompt and two 1,024-token responses, a
   128k vocabulary) with the GPU position budget, and without it: peak memory, seconds;
3. the engine against ``model.generate`` (sampling, padded batches): tokens/s and their ratio;
4. ``fsdp_vllm_worker``: ``accelerate launch`` with the FSDP config, one process, ``--mixed_precision bf16``, with
   ``generation.backend=vllm`` through sgpo's vLLM worker and a stand-in for vLLM (``benchmarks/vllm_standin``: the
   worker, its job and process boundary are real; vLLM itself is not installed on the GPU machine). Only this step
   has the stand-in on its path. Its exports must be bf16 (FSDP2 under mixed precision gathers fp32 shards);
5. ``lora`` (one process, the built-in engine): the stage checkpoints are full bf16 models with the adapter merged;
6. ``memory``: on the device, a random model of Llama-3-8B's shape: the reference pass of one forward of 8,192
   positions and two LoRA steps of 8,192 positions; of Llama-3.2-1B's shape, two full fine-tuning steps (MasterAdamW):
   each peak beside ``sgpo.models.sizes``' estimate (``--shape tiny``: all three at the tiny shape, 512 positions).

The runs and the memory step record ``ok``: what they claim held (the backend the manifest names and the vLLM engines
started, the dtype of every export, every training stage moved the weights; the estimates within 0.9–1.5× of the
measured peaks). A failing step does not stop the others.

    python benchmarks/gpu_prepare.py                       # where sgpo is installed: the carried folder
    python benchmarks/gpu_check.py --carry .gpu_carry --out OUT
    python benchmarks/gpu_check.py --device cpu --shape tiny   # this script's own check, on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sgpo.models import sizes  # noqa: E402
from sgpo.training import memory  # noqa: E402
from sgpo.generation.engine import Request, Settings, generate  # noqa: E402
from sgpo.models.loading import load_model, load_tokenizer  # noqa: E402
from sgpo.training.batching import default_max_positions  # noqa: E402
from sgpo.training import dpo  # noqa: E402
from sgpo.training.dpo import TokenPair, reference_logps  # noqa: E402

SHAPES = {  # Llama-3.2-1B's and Llama-3-8B's shapes (their 128k vocabulary only where no tokenizer reads the ids)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
PAPER = {"pairs": 32, "prompt": 2560, "response": 1024, "vocab": 128256}  # the reference pass at paper shapes


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(carry: Path, shape: str, out: Path, vocab: int | None = None) -> Path:
    """A random Llama of ``shape`` in bf16 with the carried SmolLM2 tokenizer (its vocabulary unless ``vocab``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(carry / "smollm2-arch"))
    cfg = LlamaConfig(vocab_size=vocab or len(tok), max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def changed(a: Path, b: Path) -> float:
    """The share of weights of checkpoint ``b`` that differ from ``a``, compared in ``b``'s dtype: ``a`` is cast to it
    only when it is the start model in bf16 and ``b`` an fp32 run's (exact); ``b`` is never rounded, so an export in
    another dtype than the run's shows in ``export_dtypes`` and is not hidden here."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    moved = sum((wa[k].to(wb[k].dtype) != wb[k]).sum().item() for k in wa)
    return moved / sum(v.numel() for v in wa.values())


def export_dtypes(folder: Path) -> list[str]:
    """The dtypes of a checkpoint's floating-point tensors, read from its header (``bfloat16``, ``float32``)."""
    from safetensors import safe_open

    names = {"BF16": "bfloat16", "F32": "float32", "F16": "float16", "F64": "float64"}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        found = {f.get_slice(k).get_dtype() for k in f.keys()}
    return sorted(names[d] for d in found if d in names)


def sgpo_run(model: Path, carry: Path, out: Path, expect: dict, launcher: list[str] = (),
             extra: list[str] = ()) -> dict:
    """``sgpo run`` SGPO for one round on ``model`` with small sizes; its stage times, changed weights and export
    dtypes, checked against ``expect``: ``backend`` (the manifest's ``generation_backend``, set with
    ``generation.backend``; ``vllm`` puts the stand-in on the path, nothing else does), ``dtype`` (every stage's
    export, and the vLLM engine's) and, with vLLM, ``share`` (the GPU share its one engine was built with)."""
    standin = expect["backend"] == "vllm"
    path = [str(ROOT / "src")] + ([str(ROOT / "benchmarks" / "vllm_standin")] if standin else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("SGPO_VLLM_PYTHON", None)
    engines = out.parent / f"{out.name}.engines.jsonl"  # what the stand-in's engines were built with
    if standin:
        env.update(SGPO_VLLM_PYTHON=sys.executable, SGPO_VLLM_STANDIN_LOG=str(engines))
    sets = [f"model.name={model}", f"data.sft={carry / 'prompts.jsonl'}", "rounds=1", "data.sft_size=64",
            "data.dev_size=8", "data.improver_size=32", "data.round_size=48", "eval.improver_size=0",
            "eval.head_to_head_size=0", "eval.second_judge=", "data.test_size=0", "generation.max_new_tokens=64",
            "generation.batch_size=16", "train.batch_size=16", "dpo.batch_size=16", "pairs.require_finished=none",
            f"generation.backend={expect['backend']}", *extra]
    cmd = [sys.executable, *(["-m", "accelerate.commands.launch", *launcher] if launcher else []), "-m", "sgpo",
           "run", "-o", str(out)] + [x for s in sets for x in ("--set", s)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    (out.parent / f"{out.name}.log").write_text(p.stdout + p.stderr)
    res = {"rc": p.returncode, "s": round(time.perf_counter() - t, 1), "ok": False}
    if p.returncode:
        res["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        return res
    res.update(run_figures(model, out))
    if standin:  # the engine's share of the GPU as sgpo set it (the launch strategy's default) and its dtype
        res["engines"] = [json.loads(line) for line in engines.read_text().splitlines()] if engines.exists() else []
    res["ok"] = run_ok(res, expect)
    return res


def run_ok(res: dict, expect: dict) -> bool:
    """Whether a run did what its step claims: generated with ``expect["backend"]`` (one vLLM engine, of the expected
    share and dtype, or none), exported every stage in ``expect["dtype"]``, moved the weights in every training stage,
    and saved the tokenizer with the model."""
    vllm = expect["backend"] == "vllm"
    engines = res.get("engines", [])
    return (res["generation_backend"] == expect["backend"] and res["vllm_engine_starts"] == int(vllm)
            and len(engines) == int(vllm)
            and all(e["gpu_memory_utilization"] == expect["share"] and e["dtype"] == expect["dtype"] for e in engines)
            and all(res[f"dtype/{st}"] == [expect["dtype"]] for st in STAGES)
            and all(res[f"changed/{st}"] > 0 for st in STAGES) and res["tokenizer_with_model"])


STAGES = ("sft", "improver", "round_1")
# the runs on a CPU (this script's own check): every stage still trains and the round keeps pairs, on a quarter of the
# prompts and short texts (the tiny model's 49k-word LM head in fp32 is most of a CPU run's time)
CPU_SIZES = ["data.sft_size=16", "data.improver_size=16", "data.round_size=16", "data.dev_size=4",
             "data.max_prompt_tokens=128", "data.max_reference_tokens=32", "generation.max_new_tokens=16",
             "train.batch_size=8", "dpo.batch_size=8"]


def run_figures(model: Path, out: Path) -> dict:
    """What a finished run says: stage times, the backend and vLLM engines it used, per training stage the share of
    weights changed and the export's dtypes, the round's DPO figures."""
    manifest = json.loads((out / "manifest.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    res = {"stage_s": {k: v.get("seconds") for k, v in manifest["stages"].items()},
           "generation_backend": manifest.get("generation_backend"),
           "vllm_engine_starts": summary.get("generation/vllm_engine_starts")}
    before = model
    for stage in STAGES:
        res[f"changed/{stage}"] = round(changed(before, out / stage / "model"), 4)
        res[f"dtype/{stage}"] = export_dtypes(out / stage / "model")
        before = out / stage / "model"
    metrics = json.loads((out / "round_1" / "metrics.json").read_text())
    res.update({k: metrics[k] for k in ("pairs/kept", "dpo/loss", "dpo/steps") if k in metrics})
    res["tokenizer_with_model"] = (out / "round_1" / "model" / "tokenizer.json").exists()
    return res


def reference_memory(shape: str, device: str, scale: float) -> dict:
    """The reference pass at paper shapes (``scale`` shrinks them for a CPU): peak memory and seconds with the
    default position budget, then uncut."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = int(PAPER["vocab"] * scale) or 1000
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, **SHAPES[shape]))
    model = model.to(device=device, dtype=torch.bfloat16)
    n, lp, lr = PAPER["pairs"], int(PAPER["prompt"] * scale), int(PAPER["response"] * scale)
    g = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    pairs = [TokenPair(ids(lp), ids(lr), ids(lr)) for _ in range(n)]
    res = {"pairs": n, "prompt_tokens": lp, "response_tokens": lr, "vocab": vocab,
           "budget": default_max_positions(model, training=False)}
    budgeted = dpo.default_max_positions
    for name in ("budget", "uncut"):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if name == "uncut":  # the same pass with no position budget
            dpo.default_max_positions = lambda model, training=True: None
        t = time.perf_counter()
        try:
            reference_logps(model, pairs, pad_id=0, batch_size=n, show_progress=False)
            res[f"{name}_s"] = round(time.perf_counter() - t, 2)
        except torch.OutOfMemoryError:
            res[f"{name}_s"] = "out of memory"
        finally:
            dpo.default_max_positions = budgeted
        if device == "cuda":
            res[f"{name}_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def random_model(shape: str, device: str, vocab: int):
    """A random Llama of ``shape`` in bf16, made on ``device`` directly (8B is never built on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, **SHAPES[shape]))
    finally:
        torch.set_default_dtype(default)


def measured(peak: Callable[[], int], estimate: float) -> dict:
    """A measured peak beside its estimate (GB, 1e9 bytes), or the out-of-memory it ran into."""
    try:
        got = peak()
    except torch.OutOfMemoryError:
        return {"error": "out of memory", "estimate_gb": round(estimate / 1e9, 4)}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"peak_gb": round(got / 1e9, 4), "estimate_gb": round(estimate / 1e9, 4), "ratio": round(estimate / got, 3)}


def memory_check(device: str, big: str, small: str, positions: int, vocab: int) -> dict:
    """Peak memory beside ``sgpo.models.sizes``' estimate: the reference pass of one forward of ``positions`` and two LoRA
    steps on a random model of shape ``big``, two full fine-tuning steps (one micro-batch of ``positions`` each,
    MasterAdamW, gradient checkpointing) on one of shape ``small``."""
    res = {"positions": positions, "shapes": {"reference_pass": big, "lora_step": big, "full_step": small}}
    model = random_model(big, device, vocab)
    shape = shape_of(model)
    res["reference_pass"] = measured(lambda: memory.reference_peak(model, positions),
                                     sizes.reference_pass_bytes(shape, positions, kept=positions // 2))
    res["lora_step"] = measured(lambda: memory.training_peak(model, positions, lora_r=16),
                                sizes.per_gpu_bytes(shape, "LoRA (single GPU / DDP)", 1, positions))
    del model
    model = random_model(small, device, vocab)
    res["full_step"] = measured(lambda: memory.training_peak(model, positions),
                                sizes.per_gpu_bytes(shape_of(model), "single GPU", 1, positions))
    res["ok"] = all(0.9 <= res[k].get("ratio", 0) <= 1.5 for k in ("reference_pass", "lora_step", "full_step"))
    return res


def shape_of(model) -> sizes.Shape:
    c = model.config
    return sizes.Shape(sum(p.numel() for p in model.parameters()), c.num_hidden_layers, c.hidden_size,
                       c.intermediate_size, c.vocab_size, bool(c.tie_word_embeddings))


def generation_speed(path: Path, carry: Path, device: str, n: int, new_tokens: int) -> dict:
    """The engine against ``model.generate`` in padded batches of 16, sampling: tokens/s."""
    from sgpo.models.templates import policy_ids

    tok = load_tokenizer(str(path))
    model = load_model(str(path), device=device, dtype="bfloat16")
    rows = [json.loads(x) for x in (carry / "prompts.jsonl").read_text().splitlines()][:n]
    reqs = [Request(tuple(policy_ids(tok, (("user", r["prompt"]),))[-384:]), i) for i, r in enumerate(rows)]
    s = Settings(max_new_tokens=new_tokens, temperature=0.7, batch_size=16)
    generate(model, tok, reqs[:4], s)  # warm-up
    t = time.perf_counter()
    engine = sum(len(g.token_ids) + g.finished for g in generate(model, tok, reqs, s)) / (time.perf_counter() - t)
    tok.padding_side, hf_tokens = "left", 0
    t = time.perf_counter()
    for i in range(0, len(reqs), 16):
        enc = tok.pad({"input_ids": [list(r.prompt_ids) for r in reqs[i:i + 16]]}, return_tensors="pt").to(device)
        new = model.generate(**enc, do_sample=True, temperature=0.7, top_p=1.0, max_new_tokens=new_tokens,
                             pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
        hf_tokens += sum(row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
                         for row in new.tolist())
    hf = hf_tokens / (time.perf_counter() - t)
    return {"engine_tokens_per_s": round(engine, 1), "hf_generate_tokens_per_s": round(hf, 1),
            "ratio": round(engine / hf, 2), "prompts": len(reqs), "max_new_tokens": new_tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--carry", default=".gpu_carry")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="1b", choices=("1b", "tiny"), help="the runs' model (the memory step: 8B and "
                    "1B, or tiny)")
    ap.add_argument("--work", help="where the models and runs go (default: a temporary folder; OUT gets the logs)")
    args = ap.parse_args()
    carry, out = Path(args.carry), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="sgpo-gpu-check-"))
    cuda = args.device == "cuda"
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
               "shape": args.shape}
    model = build_model(carry, args.shape, work / "start")
    fsdp = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
            "--mixed_precision", "bf16" if cuda else "no"]
    dtype = "bfloat16" if cuda else "float32"  # model.dtype auto: bf16 on a GPU, fp32 on a CPU (FSDP there: fp32)
    engine = {"backend": "engine", "dtype": dtype}
    vllm = {"backend": "vllm", "dtype": dtype, "share": sizes.VLLM_SHARES["FSDP"]}  # launched with fsdp.yaml
    memory = ("8b", "1b", 8192, PAPER["vocab"]) if args.shape != "tiny" else ("tiny", "tiny", 512, 1000)
    small = [] if cuda else CPU_SIZES
    steps = {
        "run": lambda: sgpo_run(model, carry, work / "run", engine, extra=small),
        "reference_pass": lambda: reference_memory(args.shape, args.device, 1.0 if cuda else 0.05),
        "generation": lambda: generation_speed(model, carry, args.device, 64 if cuda else 8, 128 if cuda else 8),
        "fsdp_vllm_worker": lambda: sgpo_run(model, carry, work / "fsdp", vllm, fsdp,
                                             small + ([] if cuda else ["model.dtype=float32"])),
        "lora": lambda: sgpo_run(model, carry, work / "lora", engine,
                                 extra=small + ["model.lora_r=16", "model.lora_alpha=32"]),
        "memory": lambda: memory_check(args.device, *memory),
    }
    for name, fn in steps.items():
        log(f"{name} ...")
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # recorded: one failure must not hide the other figures
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        results[name]["step_s"] = round(time.perf_counter() - t, 1)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        log(f"{name} done in {results[name]['step_s']:.0f}s")
    for f in work.glob("*.log"):  # the runs' own logs beside the results; the models stay in ``work``
        shutil.copy(f, out / f.name)
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
