"""``sgpo improver-eval``: the improver role on held-out prompts (rewrite vs draft)."""
from __future__ import annotations

import argparse


def command(args) -> int:
    from sgpo.eval.improver import ImproverEval, format_table, run_improver_eval

    res = run_improver_eval(ImproverEval(args.model, args.prompts, args.judge, args.limit, args.baseline, args.config,
                                         args.set or [], args.output, args.dev_slice, args.rewrite_samples))
    print(format_table(res), end="")
    return 0


def add_parser(sub) -> None:
    ie = sub.add_parser("improver-eval", help="measure the improver role on held-out prompts (rewrite vs draft)")
    ie.add_argument("--model", required=True, help="model name or path (e.g. RUN/improver/model)")
    ie.add_argument("--prompts", required=True,
                    help="prompts with references: a data file or dataset, or sgpo:alpaca-eval / sgpo:arena-hard-v2")
    ie.add_argument("--judge", default="reference", help="judge spec for the win rates (none: judge-free figures)")
    ie.add_argument("--limit", type=int, help="only the first N prompts")
    ie.add_argument("--baseline", default="start",
                    help="model to show beside it: start (the config's start model, zero-shot), a name/path, or none")
    ie.add_argument("--config", help="YAML config for the improver instruction and generation settings (default: "
                    "the config of the run the model belongs to, else the defaults)")
    ie.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    ie.add_argument("--dev-slice", action="store_true",
                    help="only the development slice a run holds out of these prompts (data.dev_size, data.split_seed)")
    ie.add_argument("--rewrite-samples", type=int, help="rewrite tries per draft (default: improver.experimental.rewrite_samples)")
    ie.add_argument("--output", "-o", default="improver_eval", help="directory for figures and cached generations")
    ie.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ie.set_defaults(func=command)
