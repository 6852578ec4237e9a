"""``sgpo compare``: several methods and seeds from the same start and budget, judged alike."""
from __future__ import annotations

import argparse
import logging
import os
from datetime import datetime


def command(args) -> int:
    from sgpo.config import schema as config
    from sgpo.compare.runs import Plan, compare, parse_runs

    overrides = (args.set or []) + ([f"eval.judge={args.judge}"] if args.judge else [])
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [config.load(args.config, overrides).seed]
    plan = Plan(args.config, [m.strip() for m in args.methods.split(",") if m.strip()], seeds,
                [b.strip() for b in args.eval.split(",") if b.strip()], overrides, args.limit, parse_runs(args.also),
                args.sft_from or [], [j.strip() for x in args.test_judge or [] for j in x.split(",") if j.strip()])
    if args.dry_run:
        from sgpo.run.dry_run import dry_run, format_dry_run

        for m in dict.fromkeys(m for m, _ in plan.runs()):
            cfg = config.load(args.config, overrides + [f"method={m}"])
            print(format_dry_run(dry_run(cfg), cfg) + "\n")
        return 0
    out = args.output or os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S") + "-compare")
    logging.getLogger("sgpo").info("comparison directory: %s", out)
    print(compare(plan, out))
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="run several methods from the same start and budget, judge them alike, "
                                       "write comparison.md and a bar chart")
    c.add_argument("config", nargs="?", help="YAML config shared by all methods (omit for the embedded default)")
    c.add_argument("--methods", default="sft,dpo,spin,synpo,sgpo", help="comma-separated methods")
    c.add_argument("--seeds", help="comma-separated run seeds, each method runs once per seed (default: the config's)")
    c.add_argument("--also", metavar="METHOD@SEED,...", help="more runs beyond methods × seeds, e.g. sgpo@2,spin@2 "
                                                             "(a second seed for some methods only)")
    c.add_argument("--eval", default="test", help="comma-separated benchmarks: test (the runs' own test-split figures, "
                                                  "every judge), ifeval, dev, alpaca_eval")
    c.add_argument("--judge", help="override eval.judge for every method")
    c.add_argument("--limit", type=int, help="ifeval / alpaca_eval: the first N prompts only")
    c.add_argument("--output", "-o", help="comparison directory (re-running skips finished methods)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key for every method")
    c.add_argument("--sft-from", action="append", metavar="DIR",
                   help="another comparison directory whose runs may lend an identical SFT stage (same start model, "
                        "data, train settings and seed; this comparison's own runs always may)")
    c.add_argument("--test-judge", action="append", metavar="JUDGE",
                   help="a further judge of every run's saved test answers (final vs start and pre-rounds) and of the "
                        "paired figures, e.g. reference; nothing is generated again")
    c.add_argument("--dry-run", action="store_true", help="print each method's plan, run nothing")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    c.set_defaults(func=command)
