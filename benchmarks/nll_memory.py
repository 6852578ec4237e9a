"""Peak memory of one NLL training step (the improver stage's step): the whole batch in one forward pass vs exact
micro-batches of at most 512 positions (what ``train_nll`` does on a CPU).

Each way runs in its own fresh process (``ru_maxrss`` is a per-process peak) on SmolLM2-135M in fp32, with a batch
shaped like improver examples: ``--batch`` rows of ``--prompt`` prompt tokens (instruction + request + draft) and
``--completion`` target tokens. Prints both peaks, the time of each step, the loss of each (equal: the micro-batched
gradient is the whole batch's), the ratio, and as its last line one JSON object.

    python benchmarks/nll_memory.py [--batch 4] [--prompt 480] [--completion 96]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import process_peak_rss_bytes, setup_env


def one_step(max_positions: int | None, batch: int, prompt: int, completion: int) -> dict:
    setup_env()
    import torch

    from sgpo.models.loading import embedded_smollm2_path, load_model
    from sgpo.training.sft import NLLExample, nll_step

    model = load_model(str(embedded_smollm2_path()), device="cpu", dtype="float32").train()
    g = torch.Generator().manual_seed(0)
    examples = [NLLExample(tuple(torch.randint(100, 40000, (prompt,), generator=g).tolist()),
                           tuple(torch.randint(100, 40000, (completion,), generator=g).tolist()))
                for _ in range(batch)]
    loaded = process_peak_rss_bytes()
    t0 = time.perf_counter()
    step = nll_step(0, max_positions, torch.Tensor.backward if max_positions else None)
    loss, _ = step(model, examples)
    loss.backward()
    return {"loss": float(loss.detach()), "seconds": time.perf_counter() - t0,
            "peak_gb": process_peak_rss_bytes() / 1e9, "after_load_gb": loaded / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=480)
    ap.add_argument("--completion", type=int, default=96)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        mp = None if args.child == "none" else int(args.child)
        print(json.dumps(one_step(mp, args.batch, args.prompt, args.completion)))
        return
    res = {}
    for name, mp in (("whole_batch", "none"), ("micro_batches_512", "512")):
        out = subprocess.run([sys.executable, __file__, "--child", mp, "--batch", str(args.batch), "--prompt",
                              str(args.prompt), "--completion", str(args.completion)],
                             capture_output=True, text=True, check=True)
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[name]
        print(f"{name:18s} peak RSS {r['peak_gb']:.2f} GB (model loaded: {r['after_load_gb']:.2f} GB), "
              f"step {r['seconds']:.1f} s, loss {r['loss']:.5f}")
    ratio = res["whole_batch"]["peak_gb"] / res["micro_batches_512"]["peak_gb"]
    print(f"peak RSS whole batch / micro-batches: {ratio:.2f}x")
    print(json.dumps({"batch": args.batch, "positions_per_row": args.prompt + args.completion, **res,
                      "peak_ratio": ratio}))


if __name__ == "__main__":
    main()
