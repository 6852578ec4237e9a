"""Generation speed: the engine (``sgpo.generation.engine.generate``) against plain ``model.generate``, in the same run.

    python benchmarks/generation.py            # SmolLM2-135M-Instruct, 64 AlpacaEval prompts, 128 new tokens
    python benchmarks/generation.py --quick    # tiny random model, a few prompts: runs in seconds (smoke test)

Compared, on the same prompts and sampling settings (temperature, top_p = 1, no top-k):
  (a) the engine, at its batch size;
  (b) ``model.generate`` one prompt at a time (on the first ``--sequential-prompts`` prompts: its tokens/s hardly
      depends on the subset, and all of them would take many minutes);
  (c) ``model.generate`` on padded batches of the engine's batch size, in input order;
  (d) with ``--vllm``: the ``vllm`` backend (vLLM's ``LLM.generate`` in its own process, with this process's thread
      count), its start-up timed apart from its generation;
  (e) with ``--vllm`` (or ``--sweep``): the engine at each batch size of ``--sweep`` (default 16,32,64,128, those up
      to the number of prompts), and the engine/vLLM ratio at the default run's batch (``generation.batch_size``)
      and at the engine's best batch, with that batch's fraction of the matmul ceiling.
Tokens are the generated tokens before EOS. Each figure is given as min / median / max over ``--repeats`` runs; the
ratios use medians. Tokens per CPU-second of this process are shown beside them: on a machine shared with other jobs
they vary less than wall-clock rates (with one thread; with several, spinning threads count too). Two ceilings frame the figures:
  matmul ceiling       model FLOPs per token against the measured fp32 matmul throughput;
  decode-step ceiling  tokens/s of one batched decode step with a KV cache at the engine's batch size and the mean
                       context length (the faster of the model's own forward and the engine's step).
The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from sgpo.generation import kv_decoder  # noqa: E402
from sgpo.generation.engine import Request, Settings, generate  # noqa: E402
from sgpo.models.loading import load_model, load_tokenizer  # noqa: E402

_FALLBACK_PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a rainbow forms, step by step, for a curious ten-year-old who likes science.",
    "List five fruits.",
    "Summarise the plot of a detective story in two sentences.",
    "How do I boil an egg?",
    "Describe the water cycle and why it matters for farming, weather and drinking water.",
]


def alpaca_prompts(n: int) -> tuple[list[str], str]:
    """The first ``n`` AlpacaEval instructions, read in place from the installed evaluation package."""
    spec = importlib.util.find_spec("eval_framework")
    if spec is not None and spec.submodule_search_locations:
        path = (Path(list(spec.submodule_search_locations)[0]) / "tasks" / "alpaca_eval" / "data"
                / "alpaca_eval_gpt4_baseline.json")
        if path.exists():
            rows = json.loads(path.read_text())
            return [r["instruction"] for r in rows[:n]], "AlpacaEval"
    prompts = (_FALLBACK_PROMPTS * (n // len(_FALLBACK_PROMPTS) + 1))[:n]
    return prompts, "built-in prompts (AlpacaEval data not installed)"


def render(tokenizer, texts: list[str]) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append([int(x) for x in ids])
    return out


def _eos_set(model, tokenizer) -> set[int]:
    ids = set()
    for e in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(e)
    return ids


def _count(rows: torch.Tensor, eos: set[int]) -> int:
    """Generated tokens before the first EOS, summed over rows."""
    total = 0
    for row in rows.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in eos:
                n = i
                break
        total += n
    return total


def _hf_kwargs(args, tokenizer) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0)
    else:
        kw.update(do_sample=False)
    return kw


@torch.inference_mode()
def run_sequential(model, tokenizer, prompts, args) -> tuple[int, float]:
    eos = _eos_set(model, tokenizer)
    kw = _hf_kwargs(args, tokenizer)
    tokens, t0 = 0, time.perf_counter()
    for i, p in enumerate(prompts):
        torch.manual_seed(i)
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        tokens += _count(out[:, len(p):], eos)
    return tokens, time.perf_counter() - t0


@torch.inference_mode()
def run_padded(model, tokenizer, prompts, batch_size, args) -> tuple[int, float]:
    eos = _eos_set(model, tokenizer)
    kw = _hf_kwargs(args, tokenizer)
    pad = tokenizer.pad_token_id
    tokens, t0 = 0, time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        torch.manual_seed(start)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        tokens += _count(out[:, width:], eos)
    return tokens, time.perf_counter() - t0


def run_engine(model, tokenizer, prompts, batch_size, args) -> tuple[int, float, list]:
    reqs = [Request(tuple(p), seed=i) for i, p in enumerate(prompts)]
    s = Settings(args.max_new_tokens, args.temperature, 1.0, batch_size)
    t0 = time.perf_counter()
    gens = generate(model, tokenizer, reqs, s)
    return sum(len(g.token_ids) for g in gens), time.perf_counter() - t0, gens


def run_vllm(model_name: str, tokenizer, prompts, batch_size, args) -> tuple[int, float, float]:
    """The vllm backend on the same requests and settings: tokens, generation seconds, start-up seconds."""
    from sgpo.generation import vllm_backend
    from sgpo.models.loading import resolve

    reqs = [Request(tuple(p), seed=i) for i, p in enumerate(prompts)]
    s = Settings(args.max_new_tokens, args.temperature, 1.0, batch_size)
    calls = vllm_backend.plan_calls(reqs, s)
    with vllm_backend.Engine({"dtype": "float32", "device": "cpu"}) as engine:
        gens, timings = vllm_backend.generate_calls(resolve(model_name), tokenizer, reqs, s, calls, engine=engine)
    return sum(len(g.token_ids) for g in gens), timings["generate_s"], timings["start_s"]


def matmul_gflops(size: int, reps: int) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def flops_per_token(model, context: float) -> float:
    """Multiply-adds x 2 of every linear layer (LM head included) plus attention at the given context length."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attention = 2 * 2 * cfg.num_hidden_layers * heads * head_dim * context  # QK^T and AV
    return 2 * linear + attention


@torch.inference_mode()
def decode_step_tokens_per_s(model, batch_size: int, context: int, reps: int) -> dict:
    """Tokens/s of one decode step at ``batch_size`` rows and ``context`` cached tokens (best of ``reps``)."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(10, vocab, (batch_size, context), generator=gen)
    step_ids = torch.randint(10, vocab, (batch_size, 1), generator=gen)
    out = {}
    res = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = {_cache_kwarg(model): res.past_key_values}
    best = float("inf")
    for _ in range(reps):
        # the cache grows by one token per call: fine for a timing at (context + a few) tokens
        t0 = time.perf_counter()
        model(input_ids=step_ids, use_cache=True, logits_to_keep=1, **cache)
        best = min(best, time.perf_counter() - t0)
    out["model_forward"] = batch_size / best
    if kv_decoder.supports(model):
        dec = kv_decoder.KVDecoder(model, rows_hint=batch_size)
        dec.reserve(batch_size, context + reps + 1)
        dec.add(prompt.tolist())
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            dec.step(step_ids.view(-1))
            best = min(best, time.perf_counter() - t0)
        dec.release()
        out["engine_step"] = batch_size / best
    return out


def _cache_kwarg(model) -> str:
    """The name under which this transformers version takes the KV cache (``cache`` in newer releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _stats(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


@torch.inference_mode()
def greedy_check(model, tokenizer, prompts, max_new: int) -> bool:
    """The engine's greedy output against ``model.generate(do_sample=False)`` one prompt at a time."""
    reqs = [Request(tuple(p), seed=i) for i, p in enumerate(prompts)]
    gens = generate(model, tokenizer, reqs, Settings(max_new, 0.0, 1.0, len(prompts)))
    eos = _eos_set(model, tokenizer)
    for p, g in zip(prompts, gens):
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(out) if t in eos), len(out))
        if tuple(out[:cut]) != g.token_ids:
            return False
    return True


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, few prompts and tokens (seconds)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--sequential-prompts", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--no-greedy-check", action="store_true")
    ap.add_argument("--vllm", action="store_true", help="add the vllm backend (needs scripts/setup.sh --with-vllm)")
    ap.add_argument("--sweep", default=None, help="engine batch sizes to time, comma-separated (default with --vllm: "
                                                  "16,32,64,128 up to the number of prompts)")
    args = ap.parse_args(argv)
    quick = dict(model="sgpo:tiny-random", prompts=8, max_new_tokens=16, batch_size=4, repeats=1,
                 sequential_prompts=4)
    full = dict(model="sgpo:smollm2-135m-instruct", prompts=64, max_new_tokens=128, batch_size=16, repeats=1,
                sequential_prompts=3)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _load(args) -> tuple:
    """The tokenizer, the model and the rendered prompts; prints the header line."""
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device="cpu", dtype="float32").eval()
    texts, source = alpaca_prompts(args.prompts)
    prompts = render(tokenizer, texts)
    bs = args.batch_size
    lens = [len(p) for p in prompts]
    print(f"model {args.model}  prompts {len(prompts)} ({source}, {min(lens)}-{max(lens)} tokens, "
          f"mean {statistics.mean(lens):.1f})  max_new_tokens {args.max_new_tokens}  "
          f"temperature {args.temperature}  batch {bs}  threads {torch.get_num_threads()}  repeats {args.repeats}",
          flush=True)
    return tokenizer, model, prompts


def _measure(key: str, model, tokenizer, prompts, args) -> tuple[int, float, float, list[int] | None]:
    """One timed run of method ``key`` (engine, padded or sequential) on ``prompts``: tokens, wall-clock seconds, CPU
    seconds of this process and, for the engine, the number of new tokens of each generation."""
    c0 = time.process_time()
    new_tokens = None
    if key == "engine":
        n, dt, gens = run_engine(model, tokenizer, prompts, args.batch_size, args)
        new_tokens = [len(g.token_ids) for g in gens]
    elif key == "padded":
        n, dt = run_padded(model, tokenizer, prompts, args.batch_size, args)
    elif key == "vllm":
        n, dt, start = run_vllm(args.model, tokenizer, prompts, args.batch_size, args)
        args.vllm_start.append(start)
    else:
        n, dt = run_sequential(model, tokenizer, prompts, args)
    return n, dt, time.process_time() - c0, new_tokens


def _time_methods(model, tokenizer, prompts, args) -> tuple[dict, dict, dict, list[int]]:
    """Every method ``args.repeats`` times: tokens/s, tokens per CPU-second, tokens, and the engine's new tokens."""
    seq_prompts = prompts[:args.sequential_prompts]
    keys = ("engine", "padded", "sequential") + (("vllm",) if args.vllm else ())
    rates = {k: [] for k in keys}
    cpu_rates = {k: [] for k in keys}  # tokens per CPU-second of this process (vLLM's own process not counted)
    tokens = {}
    new_tokens = []
    for _ in range(args.repeats):
        print(f"timing ({', '.join(keys)}) ...", flush=True)
        for key in keys:
            n, dt, cpu, new = _measure(key, model, tokenizer, seq_prompts if key == "sequential" else prompts, args)
            if new is not None:
                new_tokens = new
            rates[key].append(n / dt)
            cpu_rates[key].append(n / cpu)
            tokens[key] = n
    return rates, cpu_rates, tokens, new_tokens


def _sweep(model, tokenizer, prompts, args) -> dict[int, float]:
    """The engine's median tokens/s at each batch size of the sweep (and at the default run's batch)."""
    from sgpo.config.schema import GenerationConfig

    sizes = [int(x) for x in args.sweep.split(",")] if args.sweep else [16, 32, 64, 128]
    sizes = sorted({b for b in sizes if b <= len(prompts)} | {min(GenerationConfig().batch_size, len(prompts))})
    out = {}
    for b in sizes:
        rates = [n / dt for n, dt, _ in (run_engine(model, tokenizer, prompts, b, args) for _ in range(args.repeats))]
        out[b] = statistics.median(rates)
        print(f"engine at batch {b}: {out[b]:.1f} tok/s", flush=True)
    return out


def _print_sweep(sweep: dict[int, float], vllm: float | None, ceil: dict) -> dict:
    """The sweep's lines and figures: the best batch, the ratios to vLLM at the default run's batch and at the best."""
    from sgpo.config.schema import GenerationConfig

    default = min(GenerationConfig().batch_size, max(sweep))
    best = max(sweep, key=sweep.get)
    out = {"sweep_tokens_per_s": {str(b): round(r, 1) for b, r in sweep.items()}, "best_batch": best,
           "best_tokens_per_s": round(sweep[best], 1),
           "best_matmul_ceiling_fraction": round(sweep[best] / ceil["matmul"], 3)}
    print(f"engine's best batch: {best} ({sweep[best]:.1f} tok/s, {sweep[best] / ceil['matmul']:.0%} of the matmul "
          f"ceiling); at the default run's batch {default}: {sweep[default]:.1f} tok/s")
    if vllm:
        out.update(engine_vs_vllm_default_batch=round(sweep[default] / vllm, 3),
                   engine_vs_vllm_best_batch=round(sweep[best] / vllm, 3))
        print(f"ratio engine / vllm: {sweep[default] / vllm:.2f}x at batch {default}, "
              f"{sweep[best] / vllm:.2f}x at the engine's best batch {best}")
    return out


def _ceilings(model, args, mean_context: float) -> dict:
    """The matmul ceiling (with its GFLOP/s and FLOPs per token) and the decode-step ceiling (with its steps)."""
    gflops = matmul_gflops(512 if args.quick else 1024, 3 if args.quick else 8)
    fpt = flops_per_token(model, mean_context)
    steps = decode_step_tokens_per_s(model, args.batch_size, max(1, round(mean_context)), 3 if args.quick else 5)
    return {"gflops": gflops, "fpt": fpt, "matmul": gflops * 1e9 / fpt, "steps": steps,
            "decode": max(steps.values())}


def _print_report(args, rates: dict, cpu_rates: dict, tokens: dict, ceil: dict, mean_context: float,
                  greedy: bool | None) -> None:
    bs = args.batch_size
    eng, pad, seq = (_stats(rates[k]) for k in ("engine", "padded", "sequential"))
    print()
    print(f"{'method':<38}{'tokens':>7}{'min tok/s':>11}{'median':>9}{'max':>9}{'tok/CPU-s':>11}")
    rows = [("engine (batch %d)" % bs, "engine", eng),
            ("model.generate, one prompt at a time", "sequential", seq),
            ("model.generate, padded batch %d" % bs, "padded", pad)]
    if args.vllm:
        rows.append(("vllm backend (start-up apart)", "vllm", _stats(rates["vllm"])))
    for label, key, (lo, med, hi) in rows:
        cpu_s = "-" if key == "vllm" else f"{statistics.median(cpu_rates[key]):.1f}"
        print(f"{label:<38}{tokens[key]:>7}{lo:>11.1f}{med:>9.1f}{hi:>9.1f}{cpu_s:>11}")
    cpu = {k: statistics.median(v) for k, v in cpu_rates.items()}
    if args.vllm:
        print(f"ratio vllm / engine: {statistics.median(rates['vllm']) / eng[1]:.2f}x   vLLM start-up: "
              f"{statistics.median(args.vllm_start):.1f} s once per run and process (not in its rate)")
    print(f"ratio engine / sequential: {eng[1] / seq[1]:.2f}x   engine / padded: {eng[1] / pad[1]:.2f}x   "
          f"(per CPU-second: {cpu['engine'] / cpu['sequential']:.2f}x, {cpu['engine'] / cpu['padded']:.2f}x)")
    print(f"matmul ceiling: {ceil['matmul']:.0f} tok/s ({ceil['gflops']:.0f} GFLOP/s fp32, "
          f"{ceil['fpt'] / 1e6:.0f} MFLOP/token)  engine at {eng[1] / ceil['matmul']:.0%}")
    print("decode-step ceiling: %.0f tok/s (batch %d, context %d; %s)  engine at %.0f%%" % (
        ceil["decode"], bs, round(mean_context), ", ".join(f"{k} {v:.0f}" for k, v in ceil["steps"].items()),
        100 * eng[1] / ceil["decode"]))
    if greedy is not None:
        print(f"greedy output identical to model.generate(do_sample=False): {greedy}")


def _result(args, rates: dict, cpu_rates: dict, ceil: dict, greedy: bool | None) -> dict:
    eng, pad, seq = (_stats(rates[k]) for k in ("engine", "padded", "sequential"))
    cpu = {k: statistics.median(v) for k, v in cpu_rates.items()}
    return {
        "tokens_per_s": round(eng[1], 2),
        "ratio_vs_sequential": round(eng[1] / seq[1], 3),
        "ratio_vs_padded": round(eng[1] / pad[1], 3),
        "matmul_ceiling_tokens_per_s": round(ceil["matmul"], 1),
        "decode_ceiling_tokens_per_s": round(ceil["decode"], 1),
        "sequential_tokens_per_s": round(seq[1], 2),
        "padded_tokens_per_s": round(pad[1], 2),
        "cpu_ratio_vs_sequential": round(cpu["engine"] / cpu["sequential"], 3),
        "cpu_ratio_vs_padded": round(cpu["engine"] / cpu["padded"], 3),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "model": args.model,
        "greedy_identical": greedy,
        **({"vllm_tokens_per_s": round(statistics.median(rates["vllm"]), 2),
            "ratio_vllm_vs_engine": round(statistics.median(rates["vllm"]) / eng[1], 3),
            "vllm_start_s": round(statistics.median(args.vllm_start), 1)} if args.vllm else {}),
    }


def main(argv=None) -> dict:
    args = _parse_args(argv)
    args.vllm_start = []
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, model, prompts = _load(args)
    bs = args.batch_size

    # warm-up (allocator, first-call paths), not timed
    run_engine(model, tokenizer, prompts[:min(bs, 2)], bs, _with(args, max_new_tokens=2))
    run_padded(model, tokenizer, prompts[:min(bs, 2)], bs, _with(args, max_new_tokens=2))

    rates, cpu_rates, tokens, new_tokens = _time_methods(model, tokenizer, prompts, args)
    mean_context = statistics.mean([len(p) for p in prompts]) + statistics.mean(new_tokens) / 2
    ceil = _ceilings(model, args, mean_context)
    greedy = None
    if not args.no_greedy_check:
        greedy = greedy_check(model, tokenizer, prompts[:4], 8 if args.quick else 48)
    _print_report(args, rates, cpu_rates, tokens, ceil, mean_context, greedy)
    result = _result(args, rates, cpu_rates, ceil, greedy)
    if args.vllm or args.sweep:
        vllm = statistics.median(rates["vllm"]) if args.vllm else None
        result.update(_print_sweep(_sweep(model, tokenizer, prompts, args), vllm, ceil))
    print(json.dumps(result))
    return result


def _with(args, **kw):
    ns = argparse.Namespace(**vars(args))
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


if __name__ == "__main__":
    main()
