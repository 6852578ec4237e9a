"""``sgpo metrics``: leaderboard metrics from an annotations or judgments file."""
from __future__ import annotations

import argparse
import json


def command(args) -> int:
    if args.kind == "alpaca-eval":
        from sgpo.eval.alpaca_eval import main_metrics

        res = main_metrics(args.file, args.data_dir)
    else:
        from sgpo.eval.arena_hard import main_metrics

        res = main_metrics(args.file, version=args.version)
    print(json.dumps(res, indent=2, default=str))
    return 0


def add_parser(sub) -> None:
    mt = sub.add_parser("metrics", help="leaderboard metrics from an annotations / judgments file")
    mt.add_argument("kind", choices=("alpaca-eval", "arena-hard"))
    mt.add_argument("file")
    mt.add_argument("--data-dir", help="alpaca-eval: folder with instruction_difficulty.csv and "
                                       "gamed_baseline_rows.csv (default: the hub dataset, online)")
    mt.add_argument("--version", default="v0.1", choices=("v0.1", "v2.0"), help="arena-hard scoring")
    mt.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    mt.set_defaults(func=command)
