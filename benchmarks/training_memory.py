"""Peak memory of training steps with glibc's default allocation against ``models.mapped_buffers`` (every buffer of
``--threshold-kib`` or more, default ``models.MAPPED_THRESHOLD``, mapped on its own while training), in the same
run, and the speed of the generation that follows.

Each way runs in a fresh process (``ru_maxrss`` is a per-process peak) on SmolLM2-135M in fp32: ``--steps``
optimizer steps of SFT-shaped batches (``--batch`` rows of ``--prompt`` prompt and ``--completion`` target tokens,
exact micro-batches of at most 512 positions, as ``train_nll`` runs them on a CPU: clipping, AdamW), then a
generation of ``--gen-prompts`` prompts (the engine at batch 64, 64 new tokens), timed apart: the threshold glibc is
left with afterwards must not slow generation down. Printed: each way's peak RSS, training and generation seconds,
whether the trained weights and the generated tokens are bit-for-bit equal, the ratios, and as its last line one JSON
object.

    python benchmarks/training_memory.py [--steps 3] [--batch 4] [--prompt 60] [--completion 96]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
import time

from _common import process_peak_rss_bytes, setup_env


def train_then_generate(mapped: int, steps: int, batch: int, prompt: int, completion: int, gen_prompts: int) -> dict:
    setup_env()
    import torch

    from sgpo.generation.engine import Request, Settings, generate
    from sgpo.models.loading import embedded_smollm2_path, load_model, load_tokenizer, mapped_buffers
    from sgpo.training.loop import make_optimizer
    from sgpo.training.sft import NLLExample, nll_step

    torch.manual_seed(0)
    path = str(embedded_smollm2_path())
    model, tok = load_model(path, device="cpu", dtype="float32").train(), load_tokenizer(path)
    opt = make_optimizer(model, 2e-5)
    g = torch.Generator().manual_seed(0)
    step = nll_step(0, 512, torch.Tensor.backward)
    t0 = time.perf_counter()
    with mapped_buffers(mapped << 10) if mapped else contextlib.nullcontext():
        for _ in range(steps):
            examples = [NLLExample(tuple(torch.randint(100, 40000, (prompt,), generator=g).tolist()),
                                   tuple(torch.randint(100, 40000, (completion,), generator=g).tolist()))
                        for _ in range(batch)]
            loss, _ = step(model, examples)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    trained = time.perf_counter() - t0
    peak = process_peak_rss_bytes()
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    reqs = [Request(tuple(torch.randint(100, 40000, (60,), generator=g).tolist()), seed=i) for i in range(gen_prompts)]
    t0 = time.perf_counter()
    gens = generate(model.eval(), tok, reqs, Settings(64, 0.7, 1.0, 64))
    generated = time.perf_counter() - t0
    tokens = hashlib.sha256(json.dumps([g.token_ids for g in gens]).encode()).hexdigest()
    return {"train_s": trained, "generate_s": generated, "train_peak_gb": peak / 1e9, "weights": weights,
            "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=60)
    ap.add_argument("--completion", type=int, default=96)
    ap.add_argument("--gen-prompts", type=int, default=64)
    ap.add_argument("--threshold-kib", type=int, default=None, help="the mapped way's threshold (default: sgpo's)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = [args.steps, args.batch, args.prompt, args.completion, args.gen_prompts]
    if args.child is not None:
        print(json.dumps(train_then_generate(int(args.child), *shape)))
        return
    setup_env()
    res = {}
    flags = ["--steps", "--batch", "--prompt", "--completion", "--gen-prompts"]
    from sgpo.models.loading import MAPPED_THRESHOLD

    kib = args.threshold_kib or MAPPED_THRESHOLD >> 10
    for way, child in (("default", 0), ("mapped", kib)):
        cmd = [sys.executable, __file__, "--child", str(child)] + [x for f, v in zip(flags, shape) for x in (f, str(v))]
        res[way] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        r = res[way]
        print(f"{way:<8} training peak {r['train_peak_gb']:.2f} GB  training {r['train_s']:.1f} s  "
              f"generation after it {r['generate_s']:.1f} s")
    d, m = res["default"], res["mapped"]
    same = d["weights"] == m["weights"] and d["tokens"] == m["tokens"]
    print(f"peak default / mapped: {d['train_peak_gb'] / m['train_peak_gb']:.2f}x   training time mapped / default: "
          f"{m['train_s'] / d['train_s']:.2f}x   generation time mapped / default: "
          f"{m['generate_s'] / d['generate_s']:.2f}x   same weights and tokens: {same}")
    print(json.dumps({"default_peak_gb": round(d["train_peak_gb"], 3), "mapped_peak_gb": round(m["train_peak_gb"], 3),
                      "peak_ratio": round(d["train_peak_gb"] / m["train_peak_gb"], 3),
                      "train_time_ratio": round(m["train_s"] / d["train_s"], 3),
                      "generate_time_ratio": round(m["generate_s"] / d["generate_s"], 3), "same": same}))


if __name__ == "__main__":
    main()
