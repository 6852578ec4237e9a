"""Peak memory of generation with long prompts: the engine's prefill in row groups of at most
``kv_decoder.PREFILL_TOKENS`` positions against all rows in one forward, in the same run.

    python benchmarks/prefill_memory.py            # SmolLM2-135M, 64 improver-length prompts (~380 tokens), 16 new
    python benchmarks/prefill_memory.py --quick    # tiny random model: seconds (smoke test)

The prompts are as long as the improver's inputs in a round (request, reference and draft; cut to
``--prompt-tokens``), built from AlpacaEval instructions and GPT-4 Turbo answers; few new tokens, so the prefill is
what is measured. Each way runs ``--repeats`` times; printed: the peak RSS above the process's resting RSS (sampled
every 20 ms), the wall time, and the ratios. Both ways give the same tokens (checked). The last line is one JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import PeakRSS, rss_bytes, setup_env

setup_env()

from sgpo.generation import kv_decoder  # noqa: E402
from sgpo.data.records import load_records  # noqa: E402
from sgpo.generation.engine import Request, Settings, generate  # noqa: E402
from sgpo.models.loading import free_memory, load_model, load_tokenizer  # noqa: E402


def long_prompts(tok, n: int, tokens: int) -> list[tuple[int, ...]]:
    records, _ = load_records("sgpo:alpaca-eval", need="reference")
    out = []
    for i in range(n):
        a, b = records[i], records[(i + 1) % len(records)]
        text = f"{a.prompt_text}\n\nReference:\n{a.reference}\n\nDraft:\n{b.reference}\n\nRewrite the draft."
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        out.append(tuple(int(x) for x in ids[-tokens:]))
    return out


def measure(model, tok, reqs, s: Settings, prefill_tokens: int) -> tuple[float, float, list]:
    """(peak RSS above rest in GB, seconds, token ids) of one generation with ``PREFILL_TOKENS = prefill_tokens``."""
    kv_decoder.PREFILL_TOKENS = prefill_tokens
    free_memory()
    rest = rss_bytes()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        gens = generate(model, tok, reqs, s)
        dt = time.perf_counter() - t0
    return (peak.peak - rest) / 1e9, dt, [g.token_ids for g in gens]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=kv_decoder.PREFILL_TOKENS, help="the grouped way's limit")
    args = ap.parse_args(argv)
    name = "sgpo:tiny-random" if args.quick else "sgpo:smollm2-135m-instruct"
    n = args.prompts or (8 if args.quick else 64)
    tok = load_tokenizer(name)
    model = load_model(name, device="cpu", dtype="float32").eval()
    reqs = [Request(p, seed=i) for i, p in enumerate(long_prompts(tok, n, args.prompt_tokens))]
    s = Settings(4 if args.quick else 16, 0.7, 1.0, n)
    grouped_default, default = args.prefill_tokens, kv_decoder.PREFILL_TOKENS
    runs = {"grouped": [], "whole": []}
    tokens = {}
    for _ in range(args.repeats):
        for way, limit in (("grouped", grouped_default), ("whole", 10 ** 9)):
            mem, dt, tokens[way] = measure(model, tok, reqs, s, limit)
            runs[way].append((mem, dt))
    kv_decoder.PREFILL_TOKENS = default
    med = {w: (statistics.median(m for m, _ in r), statistics.median(t for _, t in r)) for w, r in runs.items()}
    lens = [len(r.prompt_ids) for r in reqs]
    print(f"model {name}  prompts {n} ({min(lens)}-{max(lens)} tokens)  new tokens {s.max_new_tokens}  batch {n}  "
          f"repeats {args.repeats}")
    for way, label in (("grouped", f"prefill in groups of ≤{grouped_default} positions"),
                       ("whole", "prefill of all rows at once")):
        print(f"{label:<44} peak +{med[way][0]:.2f} GB   {med[way][1]:.1f} s")
    ratio_mem, ratio_time = med["whole"][0] / max(med["grouped"][0], 1e-9), med["grouped"][1] / med["whole"][1]
    same = tokens["grouped"] == tokens["whole"]
    print(f"peak memory whole / grouped: {ratio_mem:.2f}x   time grouped / whole: {ratio_time:.2f}x   "
          f"same tokens: {same}")
    result = {"model": name, "prompts": n, "grouped_peak_gb": round(med["grouped"][0], 3),
              "whole_peak_gb": round(med["whole"][0], 3), "memory_ratio": round(ratio_mem, 3),
              "time_ratio": round(ratio_time, 3), "same_tokens": same}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
