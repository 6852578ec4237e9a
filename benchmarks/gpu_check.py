"""The GPU check: one prepared script, one GPU, no network, about 5 minutes on an H200; prints one JSON line.

A randomly initialised model of Llama-3.2-1B's shape (built from a config: nothing downloaded), bf16:

1. ``sgpo run`` (SGPO, one round, engine generation): SFT, improver training, a DPO round; for each training
   stage the share of weights it changed at bf16 resolution (fp32 masters: DPO at 5e-7 must still move them);
2. the reference pass at the paper's shapes (32 pairs of a 2,560-token prompt and two 1,024-token responses, a
   128k vocabulary) with the GPU position budget, and without it: peak memory, seconds;
3. the engine against ``model.generate`` (sampling, padded batches): tokens/s and their ratio;
4. the sharded branch: ``accelerate launch`` with the FSDP config and one process, generation through sgpo's vLLM
   worker with a stand-in for vLLM (``benchmarks/vllm_standin``: the worker, its job and process boundary are real;
   vLLM itself is not installed on the GPU machine); the export is reloaded, with its tokenizer, for the next rollout;
5. LoRA (one process): the stage checkpoints are full models with the adapter merged.

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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sgpo.generation import Request, Settings, generate  # noqa: E402
from sgpo.models import load_model, load_tokenizer  # noqa: E402
from sgpo.training.batching import default_max_positions  # noqa: E402
from sgpo.training import dpo  # noqa: E402
from sgpo.training.dpo import TokenPair, reference_logps  # noqa: E402

SHAPES = {  # Llama-3.2-1B's shape (its 128k vocabulary only where no tokenizer reads the ids), and a tiny one
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
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
    """The share of weights of checkpoint ``b`` that differ from ``a`` at bf16 resolution."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    moved = sum((wa[k].to(torch.bfloat16) != wb[k].to(torch.bfloat16)).sum().item() for k in wa)
    return moved / sum(v.numel() for v in wa.values())


def sgpo_run(model: Path, carry: Path, out: Path, launcher: list[str] = (), extra: list[str] = ()) -> dict:
    """``sgpo run`` SGPO for one round on ``model`` with small sizes; its stage times and changed weights."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks" / "vllm_standin"),
                                                       os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", SGPO_VLLM_PYTHON=sys.executable)
    sets = [f"model.name={model}", f"data.sft={carry / 'prompts.jsonl'}", "rounds=1", "data.sft_size=64",
            "data.dev_size=8", "data.improver_size=32", "data.round_size=48", "eval.improver_size=0",
            "eval.head_to_head_size=0", "eval.second_judge=", "data.test_size=0", "generation.max_new_tokens=64",
            "generation.batch_size=16", "train.batch_size=16", "dpo.batch_size=16", "pairs.require_finished=none",
            *extra]
    cmd = [sys.executable, *(["-m", "accelerate.commands.launch", *launcher] if launcher else []), "-m", "sgpo",
           "run", "-o", str(out)] + [x for s in sets for x in ("--set", s)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    (out.parent / f"{out.name}.log").write_text(p.stdout + p.stderr)
    res = {"rc": p.returncode, "s": round(time.perf_counter() - t, 1)}
    if p.returncode:
        res["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        return res
    manifest = json.loads((out / "manifest.json").read_text())
    res["stage_s"] = {k: v.get("seconds") for k, v in manifest["stages"].items()}
    before = model
    for stage in ("sft", "improver", "round_1"):
        res[f"changed/{stage}"] = round(changed(before, out / stage / "model"), 4)
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
        if device == "cuda":
            res[f"{name}_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def generation_speed(path: Path, carry: Path, device: str, n: int, new_tokens: int) -> dict:
    """The engine against ``model.generate`` in padded batches of 16, sampling: tokens/s."""
    from sgpo.templates import policy_ids

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
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
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
    steps = {
        "run": lambda: sgpo_run(model, carry, work / "run"),
        "reference_pass": lambda: reference_memory(args.shape, args.device, 1.0 if cuda else 0.05),
        "generation": lambda: generation_speed(model, carry, args.device, 64 if cuda else 8, 128 if cuda else 8),
        "fsdp_vllm_worker": lambda: sgpo_run(model, carry, work / "fsdp", fsdp, ["generation.backend=vllm"]
                                             + ([] if cuda else ["model.dtype=float32"])),
        "lora": lambda: sgpo_run(model, carry, work / "lora", extra=["model.lora_r=16", "model.lora_alpha=32"]),
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
