"""Speed of the LM judge's scoring (``lm:`` judges): one response at a time against padded batches, in the same run.

    python benchmarks/judge_speed.py            # Gemma-3-270M (the second judge), 96 AlpacaEval answers
    python benchmarks/judge_speed.py --quick    # tiny random model, a few answers: seconds (smoke test)

Both ways score the same (instruction, GPT-4 Turbo answer cut to 1,500 characters) items with the same model loaded
once; each starts from an empty memo. Printed: seconds and items/s of each way, the ratio, and the largest absolute
difference between the two ways' log-probability sums (float rounding only). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

from _common import setup_env

setup_env()

from sgpo.data import load_records  # noqa: E402
from sgpo.eval.judge_lm import PROMPT_CONTEXT, LMScorer  # noqa: E402


def items(n: int) -> list[tuple[str, str]]:
    records, _ = load_records("sgpo:alpaca-eval", need="reference")
    return [(PROMPT_CONTEXT.replace("{instruction}", r.prompt_text[:2000]), r.reference[:1500]) for r in records[:n]]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--items", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=4096, help="positions per padded batch")
    args = ap.parse_args(argv)
    model = args.model or ("sgpo:tiny-random" if args.quick else "sgpo:gemma-3-270m")
    work = items(args.items or (8 if args.quick else 96))
    scorer = LMScorer(model, device="cpu", dtype="float32")
    scorer._score(*work[0])  # warm-up, not timed
    t0 = time.perf_counter()
    single = [scorer._score(c, r) for c, r in work]
    t_single = time.perf_counter() - t0
    scorer.memo.clear()
    t0 = time.perf_counter()
    scorer.prefetch(work, max_tokens=args.max_tokens)
    t_batched = time.perf_counter() - t0
    diff = max(abs(scorer.memo[k][0] - s[0]) for k, s in zip(work, single))
    tokens = sum(s[1] for s in single)
    print(f"model {model}  items {len(work)} ({tokens} response tokens)  batch ≤{args.max_tokens} positions")
    print(f"one at a time: {t_single:.1f} s ({len(work) / t_single:.2f} items/s)")
    print(f"batched:       {t_batched:.1f} s ({len(work) / t_batched:.2f} items/s)")
    print(f"ratio batched / one at a time: {t_single / t_batched:.2f}x   largest |difference|: {diff:.2e}")
    result = {"model": model, "items": len(work), "single_s": round(t_single, 2), "batched_s": round(t_batched, 2),
              "ratio": round(t_single / t_batched, 3), "max_abs_diff": diff}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
