"""``sgpo report``: report.md and plots for a run directory."""
from __future__ import annotations

import argparse


def command(args) -> int:
    from sgpo.run.report import write_report

    print(write_report(args.run_dir))
    return 0


def add_parser(sub) -> None:
    rep = sub.add_parser("report", help="write report.md and plots for a run directory")
    rep.add_argument("run_dir")
    rep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    rep.set_defaults(func=command)
