"""``sgpo eval``: a model on a benchmark, or head-to-head against another model."""
from __future__ import annotations

import argparse
import json
import os
from datetime import datetime


def _eval_spec(args, out: str):
    """The evaluation's settings: a config's ``generation`` section and seed (``--config``/``--set``), else greedy
    decoding of 256 tokens in batches of 16; the explicit flags win over both."""
    import dataclasses

    from sgpo.config import schema as config
    from sgpo.eval.benchmark import EvalSpec

    if args.config or args.set:
        cfg = config.load(args.config, args.set or [])
        gen, seed = cfg.generation, cfg.seed
    else:
        gen, seed = config.GenerationConfig(max_new_tokens=256, temperature=0.0, batch_size=16), 0
    flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "batch_size": args.batch_size}
    gen = dataclasses.replace(gen, **{k: v for k, v in flags.items() if v is not None})
    if gen.temperature < 0:
        raise config.ConfigError(f"--temperature: must be ≥ 0, got {gen.temperature}")
    return EvalSpec(judge=args.judge, output=out, limit=args.limit, generation=gen,
                    data_dir=args.data_dir, seed=seed if args.seed is None else args.seed)


def command(args) -> int:
    from sgpo.eval import benchmark as evaluate

    out = args.output or os.path.join("evals", datetime.now().strftime("%Y%m%d-%H%M%S"))
    if args.versus and args.benchmark == "ifeval":
        res = evaluate.ifeval_versus(args.model, args.versus, _eval_spec(args, out))
    elif args.versus:
        if not args.prompts:
            raise ValueError("--versus needs --prompts (a data file, HF dataset or sgpo:alpaca-eval)")
        res = evaluate.head_to_head(args.model, args.versus, args.prompts, _eval_spec(args, out))
    else:
        if not args.benchmark:
            raise ValueError("give --benchmark (" + ", ".join(evaluate.BENCHMARKS) + ") or --versus MODEL")
        res = evaluate.evaluate(args.model, args.benchmark, _eval_spec(args, out))
    print(json.dumps(res, indent=2, default=str))
    return 0


def add_parser(sub) -> None:
    from sgpo.core.registry import BENCHMARKS, JUDGES

    e = sub.add_parser("eval", help="evaluate a model on a benchmark, or head-to-head against another model "
                                    "(docs/eval.md)")
    e.add_argument("--model", required=True, help="hub name, local path, run's final/ or embedded model")
    e.add_argument("--benchmark", help=", ".join(BENCHMARKS.names()))
    e.add_argument("--versus", help="head-to-head: the other model (with --benchmark ifeval: both models' IFEval and "
                                    "the paired bootstrap CI of the difference)")
    e.add_argument("--prompts", help="head-to-head prompt set (file, HF dataset, sgpo:alpaca-eval)")
    e.add_argument("--judge", default="reference",
                   help="judge spec KIND[:ARG], KIND one of: " + ", ".join(JUDGES.names()) + " (docs/judges.md; "
                        "AlpacaEval 2.0 and Arena-Hard v0.1 as their leaderboards judge: openai:gpt-4-1106-preview; "
                        "checked before any answer is generated); default reference, which judges head-to-heads only")
    e.add_argument("--limit", type=int, help="first N prompts only (AlpacaEval LC needs all 805)")
    e.add_argument("--output", "-o", help="evaluation directory (cached generations and annotations are reused)")
    e.add_argument("--data-dir", help="benchmark inputs: Arena-Hard v0.1 folder, AlpacaEval LC tables folder")
    e.add_argument("--config", help="take the generation settings and seed from this run config (YAML)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. "
                                                                       "generation.max_new_tokens=512")
    e.add_argument("--max-new-tokens", type=int, help="longest answer in tokens (default 256, or the config's)")
    e.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy (the default without a config)")
    e.add_argument("--batch-size", type=int, help="sequences generated together (default 16, or the config's)")
    e.add_argument("--seed", type=int, help="sampling seed (default 0, or the config's)")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    e.set_defaults(func=command)
