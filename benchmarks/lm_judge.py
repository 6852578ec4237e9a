"""The LM judge (``lm:sgpo:gemma-3-270m``, the default run's second judge): one response per forward against the
scorer's batches (responses sorted by length, at most ``--positions`` padded positions per forward), in the same run.

    python benchmarks/lm_judge.py                      # 64 comparisons: AlpacaEval prompts, two answers each
    python benchmarks/lm_judge.py --answers RUN/test   # a run's test answers: final vs start, as the run judges them
    python benchmarks/lm_judge.py --quick              # tiny random model: seconds (smoke test)

Without ``--answers`` the two answers of a comparison are the prompt's GPT-4 Turbo reference and the next prompt's
(responses of every length, as the judge meets them). Each way scores every response from scratch (its memo
emptied) ``--repeats`` times; printed: seconds per way (min / median / max), the ratio of medians, the largest
difference of a score between the two ways and how many preferences differ, and the matrix-multiply rate of each way
against this machine's fp32 matmul ceiling. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import fmt_mmm, setup_env

setup_env()

from sgpo.data.records import load_records  # noqa: E402
from sgpo.eval.judge_lm import PROMPT_CONTEXT, LMJudge  # noqa: E402
from sgpo.core.files import read_jsonl  # noqa: E402


def comparisons(answers: str | None, n: int) -> tuple[list[str], list[str], list[str]]:
    """(prompts, a, b): a run's final vs start test answers, or references of AlpacaEval prompts."""
    records, _ = load_records("sgpo:alpaca-eval", need="reference")
    if answers:
        prompts = {r.id: r.prompt_text for r in records}
        final = {row["id"]: row["text"] for row in read_jsonl(f"{answers}/answers_final.jsonl")}
        start = {row["id"]: row["text"] for row in read_jsonl(f"{answers}/answers_start.jsonl")}
        ids = [i for i in final if i in start and i in prompts][:n]
        return [prompts[i] for i in ids], [final[i] for i in ids], [start[i] for i in ids]
    recs = records[:n + 1]
    return ([r.prompt_text for r in recs[:n]], [r.reference for r in recs[:n]],
            [r.reference for r in recs[1:n + 1]])


def model_gflop(judge: LMJudge, prompts, responses) -> float:
    """Matrix-multiply work of scoring every response: 2 x the decoder's linear weights per position of context and
    response, 2 x the output layer's per response token (attention scores left out)."""
    import torch

    model = judge.scorer.model
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    total = 0
    for p, r in zip(prompts, responses):
        c, t = judge.scorer._encode(PROMPT_CONTEXT.replace("{instruction}", p[:judge.max_prompt_chars]),
                                    r[:judge.max_response_chars])
        if t:
            total += 2 * linear * (len(c) + len(t)) + 2 * head.weight.numel() * len(t)
    return total / 1e9


def matmul_gflops(size: int = 2048, reps: int = 5) -> float:
    """This machine's fp32 matrix-multiply rate (the best of ``reps``), the ceiling the judge is compared with."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(torch.mm, a, b) for _ in range(reps))
    return 2 * size ** 3 / best / 1e9


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def measure(judge: LMJudge, positions: int, prompts, a, b) -> tuple[float, list[float], list[float]]:
    """(seconds, scores of a + b, preferences) with every response scored anew."""
    judge.scorer.memo.clear()
    judge.scorer.positions = positions
    t0 = time.perf_counter()
    prefs = judge.prefer(prompts, a, b)
    dt = time.perf_counter() - t0
    return dt, judge.scores(list(prompts) * 2, list(a) + list(b)), prefs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--answers", default=None, help="a run's test folder (answers_final/answers_start.jsonl)")
    ap.add_argument("--n", type=int, default=None, help="comparisons (default 64; 8 with --quick)")
    ap.add_argument("--positions", type=int, default=2048, help="the batched way's padded positions per forward")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    name = "sgpo:tiny-random" if args.quick else "sgpo:gemma-3-270m"
    n = args.n or (8 if args.quick else 64)
    prompts, a, b = comparisons(args.answers, n)
    judge = LMJudge(name, device="cpu", dtype="float32")
    times: dict[str, list[float]] = {"one": [], "batched": []}
    scores, prefs = {}, {}
    for _ in range(args.repeats):
        for way, positions in (("one", 0), ("batched", args.positions)):
            dt, scores[way], prefs[way] = measure(judge, positions, prompts, a, b)
            times[way].append(dt)
    ratio = statistics.median(times["one"]) / statistics.median(times["batched"])
    diff = max(abs(x - y) for x, y in zip(scores["one"], scores["batched"]))
    flips = sum(x != y for x, y in zip(prefs["one"], prefs["batched"]))
    print(f"judge {judge.name}  comparisons {len(prompts)} ({len(set(a + b))} responses)  "
          f"repeats {args.repeats}  source {args.answers or 'AlpacaEval references'}")
    print(f"one response per forward        {fmt_mmm(times['one'])} s")
    print(f"batches of <= {args.positions} positions    {fmt_mmm(times['batched'])} s")
    print(f"one / batched: {ratio:.2f}x   largest score difference {diff:.2e}   preferences that differ: {flips}")
    work, ceiling = model_gflop(judge, list(prompts) * 2, list(a) + list(b)), matmul_gflops()
    rates = {w: work / statistics.median(t) for w, t in times.items()}
    print(f"matrix-multiply work {work:.0f} GFLOP: one per forward {rates['one']:.0f} GFLOP/s, batched "
          f"{rates['batched']:.0f} GFLOP/s; fp32 matmul ceiling {ceiling:.0f} GFLOP/s (batched at "
          f"{rates['batched'] / ceiling:.0%})")
    result = {"judge": judge.name, "comparisons": len(prompts), "positions": args.positions,
              "one_s": round(statistics.median(times["one"]), 2),
              "batched_s": round(statistics.median(times["batched"]), 2), "ratio": round(ratio, 3),
              "max_score_difference": diff, "preferences_differ": flips,
              "gflop": round(work, 1), "batched_gflops": round(rates["batched"], 1),
              "matmul_ceiling_gflops": round(ceiling, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
