"""DPO stage speed: sgpo's DPO (reference pass included) against TRL's ``DPOTrainer`` on the same pairs.

    python benchmarks/dpo.py                 # SmolLM2-135M-Instruct, fp32, CPU: 8 pairs, batch 4, 2 repeats
    python benchmarks/dpo.py --pairs 32 --repeats 3 --modes sgpo,trl,trl_precompute,sgpo_fused_adamw
    python benchmarks/dpo.py --quick         # the tiny random model: checks the script, measures nothing useful

Three modes, run in this one process, interleaved (the order rotates every repeat), each from freshly loaded weights:

* ``sgpo``: tokenisation of the pairs + ``reference_logps`` (inference mode, length-sorted batches, the prompt computed
  once per pair) + ``train_dpo`` (packed rows, length-bucketed batches, exact micro-batches of ≤ 512 positions).
* ``trl``: ``DPOTrainer`` with the reference model passed in (fp32, no gradient checkpointing), timed from building
  the trainer (its tokenisation) to the end of ``train()``.
* ``trl_precompute``: the same with ``precompute_ref_log_probs=True`` (its reference batch size = ours).
* ``sgpo_fused_adamw`` (on request): ``sgpo`` with a fused AdamW step, TRL's default optimizer on torch >= 2.8 (the
  training loop's own optimizer is a foreach AdamW).

Same pairs, model, batch size, epochs, learning rate and β for all. Pairs: AlpacaEval prompts (50–300 tokens in the
chat template), chosen = the prompt's GPT-4 Turbo reference, rejected = the next prompt's reference, both cut at a
sentence boundary to at most ``--max-tokens`` tokens including EOS. Machines shared with other work are noisy: compare
the ratios (per repeat, within the same process), not absolute times; pairs per CPU-second of this process vary less
than wall-clock rates when other jobs share the cores. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.setup_env()

import torch  # noqa: E402

MODES = ("sgpo", "trl", "trl_precompute")
EXTRA_MODES = ("sgpo_fused_adamw",)  # what-if: sgpo with a fused AdamW step (TRL's default optimizer on torch >= 2.8)


def build_pairs(tokenizer, n: int, max_tokens: int, seed: int, min_prompt: int = 50, max_prompt: int = 300) -> list[dict]:
    """``n`` text pairs: {messages, prompt_text (chat template applied), chosen, rejected}."""
    from sgpo.models import templates
    from sgpo.data.records import cut_reference, load_records

    records, _ = load_records("sgpo:alpaca-eval", need="reference")
    pool = [r for r in records if min_prompt <= len(templates.policy_ids(tokenizer, r.prompt)) <= max_prompt]
    random.Random(seed).shuffle(pool)
    if len(pool) < n + 1:
        raise SystemExit(f"only {len(pool)} prompts fit the length range")
    pairs = []
    for r, other in zip(pool[:n], pool[1:n + 1]):
        messages = templates.policy_messages(r.prompt)
        pairs.append({
            "messages": messages,
            "prompt_text": tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            "chosen": cut_reference(r.reference, tokenizer, max_tokens - 1),
            "rejected": cut_reference(other.reference, tokenizer, max_tokens - 1),
        })
    return pairs


def load(model_name: str):
    from sgpo.models.loading import load_model

    return load_model(model_name, device="cpu", dtype="float32")


def run_sgpo(model_name: str, tokenizer, pairs: list[dict], args, fused_adamw: bool = False) -> dict:
    from sgpo.models import templates
    from sgpo.training import dpo, loop
    from sgpo.config.schema import DPOConfig
    from sgpo.training.dpo import TokenPair, reference_logps, resolve_layout, train_dpo
    from sgpo.training.loop import Job

    model = load(model_name)
    gc.collect()
    positions = []
    collate = dpo.collate_pairs

    def counting(*a, **k):  # positions computed per forward (padding included)
        b = collate(*a, **k)
        positions.append(b.tokens)
        return b

    dpo.collate_pairs = counting
    make_optimizer = loop.make_optimizer
    if fused_adamw:
        def fused(model, lr, weight_decay=0.0):
            params = [p for p in model.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        loop.make_optimizer = fused
    try:
        with _common.PeakRSS() as rss, _common.Timer() as total:
            with _common.Timer() as ref:
                tps = [TokenPair(templates.render(tokenizer, p["messages"]),
                                 templates.completion_ids(tokenizer, p["chosen"]),
                                 templates.completion_ids(tokenizer, p["rejected"])) for p in pairs]
                reference_logps(model, tps, pad_id=tokenizer.pad_token_id, batch_size=2 * args.batch_size,
                                show_progress=False)
            n_ref = len(positions)
            m = train_dpo(model, tps, DPOConfig(beta=args.beta, batch_size=args.batch_size, epochs=args.epochs,
                                                lr=args.lr), Job(tokenizer.pad_token_id, args.seed, show_progress=False))
    finally:
        dpo.collate_pairs = collate
        loop.make_optimizer = make_optimizer
    train_pos = positions[n_ref:]
    out = {"seconds": total.seconds, "cpu_seconds": total.cpu_seconds, "ref_seconds": ref.seconds,
           "peak_rss": rss.peak, "loss": m["dpo/loss"],
           "positions_per_forward": statistics.mean(train_pos) if train_pos else 0,
           "layout": resolve_layout(model, tps),
           "tokens": sum(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in tps)}
    del model
    gc.collect()
    return out


def run_trl(model_name: str, tokenizer, pairs: list[dict], args, precompute: bool) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    model = load(model_name)
    ref_model = None if precompute else load(model_name)
    gc.collect()
    eos = tokenizer.eos_token
    rows = [{"prompt": p["prompt_text"], "chosen": p["chosen"] + eos, "rejected": p["rejected"] + eos} for p in pairs]
    ref_time = [0.0, 0]
    positions = []
    original = DPOTrainer.compute_ref_log_probs

    def timed_ref(self, *a, **k):
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            ref_time[0] += time.perf_counter() - t
            ref_time[1] += 1

    DPOTrainer.compute_ref_log_probs = timed_ref
    try:
        with tempfile.TemporaryDirectory() as out_dir, _common.PeakRSS() as rss, _common.Timer() as total:
            config = DPOConfig(
                output_dir=out_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                num_train_epochs=args.epochs, learning_rate=args.lr, beta=args.beta, max_grad_norm=1.0,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=args.seed,
                bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                precompute_ref_log_probs=precompute, precompute_ref_batch_size=2 * args.batch_size,
                max_length=None, report_to="none", save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0)
            trainer = DPOTrainer(model=model, ref_model=ref_model, args=config,
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
            trainer.remove_callback(PrinterCallback)  # its log lines only; the metrics are computed all the same
            collator = trainer.data_collator

            def counting(examples):
                b = collator(examples)
                positions.append(b["input_ids"].numel())
                return b

            trainer.data_collator = counting
            result = trainer.train()
    finally:
        DPOTrainer.compute_ref_log_probs = original
    ds = trainer.train_dataset
    tokens = sum(len(a) + len(b) + len(c) for a, b, c in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    train_pos = positions[-math.ceil(len(pairs) / args.batch_size) * args.epochs:]
    out = {"seconds": total.seconds, "cpu_seconds": total.cpu_seconds,
           "ref_seconds": ref_time[0] if precompute else None, "ref_batches": ref_time[1],
           "peak_rss": rss.peak, "loss": result.training_loss, "tokens": tokens,
           "positions_per_forward": statistics.mean(train_pos) if train_pos else 0}
    del trainer, model, ref_model
    gc.collect()
    return out


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sgpo:smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96, help="longest response, EOS included")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, among {', '.join(MODES + EXTRA_MODES)}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 4 pairs, 1 repeat: checks the script")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.pairs, args.batch_size, args.repeats, args.max_tokens = "sgpo:tiny-random", 4, 2, 1, 32
    return args


def _modes(args) -> list[str]:
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES) - set(EXTRA_MODES):
        raise SystemExit(f"unknown modes: {sorted(unknown)}")
    return modes


def _prepare(args) -> tuple:
    """The tokenizer and the pairs; prints the header line and warms the process up (untimed)."""
    import transformers
    import trl

    from sgpo.models.loading import load_tokenizer

    transformers.logging.set_verbosity_error()
    tokenizer = load_tokenizer(args.model)
    pairs = build_pairs(tokenizer, args.pairs, args.max_tokens, args.seed)
    print(f"model {args.model} | fp32 | {args.pairs} pairs | batch {args.batch_size} | {args.epochs} epoch(s) | "
          f"{args.repeats} repeat(s) | torch {torch.__version__} ({torch.get_num_threads()} threads) | "
          f"transformers {transformers.__version__} | trl {trl.__version__}", flush=True)

    # warm-up (untimed): the first forward of a process pays one-off costs
    warm = load(args.model)
    with torch.no_grad():
        warm(input_ids=torch.tensor([[1, 2, 3, 4]]))
    del warm
    return tokenizer, pairs


def _run_mode(mode: str, tokenizer, pairs: list[dict], args) -> dict:
    """One timed run of ``mode``, with its pairs per second (wall clock and CPU)."""
    if mode.startswith("sgpo"):
        r = run_sgpo(args.model, tokenizer, pairs, args, fused_adamw=mode == "sgpo_fused_adamw")
    else:
        r = run_trl(args.model, tokenizer, pairs, args, precompute=mode == "trl_precompute")
    r["pairs_per_s"] = args.pairs * args.epochs / r["seconds"]
    r["pairs_per_cpu_s"] = args.pairs * args.epochs / max(r["cpu_seconds"], 1e-9)
    return r


def _run_repeats(modes: list[str], tokenizer, pairs: list[dict], args) -> dict[str, list[dict]]:
    """Every mode ``args.repeats`` times, interleaved (the order rotates every repeat)."""
    runs = {m: [] for m in modes}
    for rep in range(args.repeats):
        order = modes[rep % len(modes):] + modes[:rep % len(modes)]
        for mode in order:
            r = _run_mode(mode, tokenizer, pairs, args)
            runs[mode].append(r)
            print(f"  repeat {rep + 1} {mode:<15} {r['seconds']:7.1f} s ({r['cpu_seconds']:.1f} CPU s)  "
                  f"{r['pairs_per_s']:.3f} pairs/s  "
                  f"loss {r['loss']:.4f}  peak RSS {_common.gb(r['peak_rss']):.2f} GB", flush=True)
    return runs


def _print_table(modes: list[str], runs: dict[str, list[dict]]) -> None:
    print()
    print(f"{'mode':<18}{'pairs/s min / median / max':<30}{'pairs/CPU-s (median)':>21}{'seconds (median)':>17}"
          f"{'ref pass s':>12}{'positions/forward':>19}{'tokens':>8}{'peak RSS GB':>13}")
    for mode in modes:
        rs = runs[mode]
        ref = [r["ref_seconds"] for r in rs if r.get("ref_seconds") is not None]
        print(f"{mode:<18}{_common.fmt_mmm([r['pairs_per_s'] for r in rs], 3):<30}"
              f"{statistics.median(r['pairs_per_cpu_s'] for r in rs):>21.3f}"
              f"{statistics.median(r['seconds'] for r in rs):>17.1f}"
              f"{(f'{statistics.median(ref):.1f}' if ref else 'in steps'):>12}"
              f"{statistics.mean(r['positions_per_forward'] for r in rs):>19.0f}{rs[0]['tokens']:>8}"
              f"{_common.gb(max(r['peak_rss'] for r in rs)):>13.2f}")


def _ratios(modes: list[str], runs: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Per-repeat rate ratios of each sgpo mode to each TRL mode (wall clock and per CPU-second), printed."""
    ratios = {}
    ours_modes = [m for m in modes if m.startswith("sgpo")]
    for ours in ours_modes:
        for other in [m for m in modes if not m.startswith("sgpo")]:
            vals = [a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(runs[ours], runs[other])]
            cpu = [a["pairs_per_cpu_s"] / b["pairs_per_cpu_s"] for a, b in zip(runs[ours], runs[other])]
            key = other + ("" if ours == "sgpo" else ours[len("sgpo"):])
            ratios[key], ratios[key + "_cpu"] = vals, cpu
            print(f"ratio {ours} / {other:<15} min / median / max: {_common.fmt_mmm(vals)}  (wall clock, per "
                  f"repeat); per CPU-second: {_common.fmt_mmm(cpu)}")
    return ratios


def _summary(args, runs: dict[str, list[dict]], ratios: dict[str, list[float]]) -> dict:
    return {
        "pairs_per_s": statistics.median(r["pairs_per_s"] for r in runs["sgpo"]) if "sgpo" in runs else None,
        "ratio_vs_trl": statistics.median(ratios["trl"]) if "trl" in ratios else None,
        "ratio_vs_trl_precompute": (statistics.median(ratios["trl_precompute"])
                                    if "trl_precompute" in ratios else None),
        "peak_rss_gb": round(_common.gb(max(r["peak_rss"] for r in runs["sgpo"])), 3) if "sgpo" in runs else None,
        "ratio_vs_trl_min_max": [min(ratios["trl"]), max(ratios["trl"])] if "trl" in ratios else None,
        "ratio_vs_trl_precompute_min_max": ([min(ratios["trl_precompute"]), max(ratios["trl_precompute"])]
                                            if "trl_precompute" in ratios else None),
        "ratio_vs_trl_cpu": statistics.median(ratios["trl_cpu"]) if "trl_cpu" in ratios else None,
        "ratio_vs_trl_precompute_cpu": (statistics.median(ratios["trl_precompute_cpu"])
                                        if "trl_precompute_cpu" in ratios else None),
        **{f"ratio_vs_{k}": statistics.median(v) for k, v in ratios.items() if "fused" in k},
        "model": args.model, "pairs": args.pairs, "batch_size": args.batch_size, "epochs": args.epochs,
        "repeats": args.repeats,
    }


def main(argv=None) -> dict:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = _modes(args)
    tokenizer, pairs = _prepare(args)
    runs = _run_repeats(modes, tokenizer, pairs, args)
    _print_table(modes, runs)
    ratios = _ratios(modes, runs)
    if "sgpo" in runs:
        print(f"sgpo layout: {runs['sgpo'][0]['layout']}")
    print(f"process peak RSS (all modes, two TRL models included): "
          f"{_common.gb(_common.process_peak_rss_bytes()):.2f} GB")
    summary = _summary(args, runs, ratios)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
