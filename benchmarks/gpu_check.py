"""The GPU check: on one GPU without internet, exercise the GPU paths and write figures to OUT/results.json.

1. greedy fp32 generation of the seeded tiny model on the GPU vs the CPU (this machine's CPU, and the CPU outputs
   carried from the development machine): match rate;
2. generation speed of the SmolLM2-135M architecture (random weights) in bf16: the engine vs ``model.generate``
   in padded batches, tokens/s;
3. DPO pairs/s in bf16 with the reference pass, peak GPU memory;
4. ``sgpo run`` for one round with the GPU settings (auto device/dtype) on that model, stage times;
5. which optional backends are importable (vLLM, DeepSpeed).

    python benchmarks/gpu_check.py --carry .gpu_carry --out OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sgpo.generation import Request, Settings, generate  # noqa: E402
from sgpo.models import load_model, load_tokenizer  # noqa: E402
from sgpo.templates import completion_ids, policy_ids  # noqa: E402
from sgpo.config import DPOConfig  # noqa: E402
from sgpo.training.dpo import TokenPair, reference_logps, train_dpo  # noqa: E402
from sgpo.training.loop import Job  # noqa: E402


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompts(carry: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (carry / "prompts.jsonl").read_text().splitlines()]
    return rows[:n]


def greedy_match(carry: Path, rows: list[dict]) -> dict:
    path = str(carry / "tiny-random")
    tok = load_tokenizer(path)
    reqs = [Request(tuple(policy_ids(tok, (("user", r["prompt"]),))[-200:]), i) for i, r in enumerate(rows[:32])]
    s = Settings(max_new_tokens=32, temperature=0.0, batch_size=8)
    outs = {}
    for dev in ("cpu", DEVICE):
        m = load_model(path, device=dev, dtype="float32")
        outs[dev] = [list(g.token_ids) for g in generate(m, tok, reqs, s)]
    carried = json.loads((carry / "tiny_cpu_greedy.json").read_text())
    same = lambda a, b: sum(x == y for x, y in zip(a, b)) / len(a)  # noqa: E731
    return {"greedy_match_gpu_vs_cpu_here": same(outs[DEVICE], outs["cpu"]),
            "greedy_match_gpu_vs_dev_machine_cpu": same(outs[DEVICE], carried),
            "greedy_match_cpu_here_vs_dev_machine_cpu": same(outs["cpu"], carried), "greedy_n": len(reqs)}


def random_smollm2(carry: Path, out: Path) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    dst = out / "smollm2-random"
    cfg = AutoConfig.from_pretrained(carry / "smollm2-arch")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(dst)
    load_tokenizer(str(carry / "smollm2-arch")).save_pretrained(dst)
    return str(dst)


def generation_speed(path: str, rows: list[dict], batch_size: int, new_tokens: int) -> dict:
    tok = load_tokenizer(path)
    model = load_model(path, device=DEVICE, dtype="auto")
    reqs = [Request(tuple(policy_ids(tok, (("user", r["prompt"]),))[-384:]), i) for i, r in enumerate(rows)]
    s = Settings(max_new_tokens=new_tokens, temperature=0.7, batch_size=batch_size)
    generate(model, tok, reqs[:batch_size], s)  # warm-up
    sync()
    t = time.perf_counter()
    gens = generate(model, tok, reqs, s)
    sync()
    engine_s = time.perf_counter() - t
    engine_tokens = sum(len(g.token_ids) + (1 if g.finished else 0) for g in gens)

    tok.padding_side = "left"
    t = time.perf_counter()
    hf_tokens = 0
    for i in range(0, len(reqs), batch_size):
        batch = [list(r.prompt_ids) for r in reqs[i:i + batch_size]]
        enc = tok.pad({"input_ids": batch}, return_tensors="pt").to(DEVICE)
        out = model.generate(**enc, do_sample=True, temperature=0.7, top_p=1.0, max_new_tokens=new_tokens,
                             pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():
            n = len(row)
            if tok.eos_token_id in row:
                n = row.index(tok.eos_token_id) + 1
            hf_tokens += n
    sync()
    hf_s = time.perf_counter() - t
    return {"gen_tokens_per_s": engine_tokens / engine_s, "gen_hf_padded_tokens_per_s": hf_tokens / hf_s,
            "gen_ratio_vs_hf_padded": (engine_tokens / engine_s) / (hf_tokens / hf_s),
            "gen_batch_size": batch_size, "gen_prompts": len(reqs), "gen_max_new_tokens": new_tokens,
            "gen_dtype": str(next(model.parameters()).dtype)}


def dpo_speed(path: str, rows: list[dict], batch_size: int) -> dict:
    tok = load_tokenizer(path)
    model = load_model(path, device=DEVICE, dtype="auto")
    pairs = []
    for r in rows:
        p = policy_ids(tok, (("user", r["prompt"]),))[-256:]
        ref = completion_ids(tok, r["response"])[:96]
        pairs.append(TokenPair(p, ref, ref[: max(2, len(ref) // 2)] + [tok.eos_token_id]))
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    reference_logps(model, pairs, pad_id=tok.pad_token_id, batch_size=2 * batch_size, show_progress=False)
    m = train_dpo(model, pairs, DPOConfig(beta=0.1, batch_size=batch_size, epochs=1, lr=5e-7), Job(tok.pad_token_id, 0))
    sync()
    s = time.perf_counter() - t
    return {"dpo_pairs_per_s": len(pairs) / s, "dpo_pairs": len(pairs), "dpo_batch_size": batch_size,
            "dpo_peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None, "dpo_loss": m.get("dpo/loss")}


def sgpo_round(path: str, carry: Path, out: Path) -> dict:
    run = out / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    # SPIN's chosen side is the reference text, so a random-weight model still yields pairs and DPO runs
    cmd = [sys.executable, "-m", "sgpo", "run", "--output", str(run), "--method", "spin", "--set", f"model.name={path}",
           "--set", f"data.sft={carry / 'prompts.jsonl'}", "--set", "data.dev_size=8", "--set", "rounds=1",
           "--set", "data.improver_size=32", "--set", "data.round_size=48", "--set", "eval.improver_size=0",
           "--set", "eval.head_to_head_size=0", "--set", "generation.batch_size=48", "--set", "pairs.require_finished=none"]
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "sgpo_run.log").write_text(res.stdout + res.stderr)
    m = {"sgpo_run_rc": res.returncode, "sgpo_run_s": time.perf_counter() - t}
    man = run / "manifest.json"
    if man.exists():
        for name, st in json.loads(man.read_text())["stages"].items():
            m[f"sgpo_run_time/{name}_s"] = st.get("seconds")
    metrics = run / "round_1" / "metrics.json"
    if metrics.exists():
        r1 = json.loads(metrics.read_text())
        m.update({f"sgpo_run/{k}": v for k, v in r1.items() if k.startswith(("pairs/kept", "rewards/", "dpo/"))})
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--carry", default=".gpu_carry")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--device", default="cuda", help="cpu: a quick correctness run of this script")
    ap.add_argument("--prompts", type=int, default=96)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    carry, out = Path(args.carry), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = DEVICE == "cuda"
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
               "bf16": torch.cuda.is_bf16_supported() if cuda else False}
    import transformers

    results["transformers"] = transformers.__version__
    rows = prompts(carry, args.prompts)

    def step(name, fn):
        log(f"{name} ...")
        t = time.perf_counter()
        try:
            results.update(fn())
        except Exception as e:  # record and go on: one failure must not hide the other figures
            import traceback

            results[f"{name}_error"] = f"{type(e).__name__}: {e}"
            (out / f"{name}_error.txt").write_text(traceback.format_exc()[-6000:])
        results[f"time/{name}_s"] = time.perf_counter() - t
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        log(f"{name} done in {results[f'time/{name}_s']:.0f}s")

    step("greedy_match", lambda: greedy_match(carry, rows))
    path = random_smollm2(carry, out / "models")
    step("generation", lambda: generation_speed(path, rows, 48, 128))
    step("dpo", lambda: dpo_speed(path, rows[:64], 8))
    step("sgpo_round", lambda: sgpo_round(path, carry, out / "models"))
    for mod in ("vllm", "deepspeed", "flash_attn"):
        try:
            __import__(mod)
            results[f"has_{mod}"] = True
        except Exception:
            results[f"has_{mod}"] = False
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
