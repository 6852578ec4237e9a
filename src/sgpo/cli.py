"""The ``sgpo`` command. Parsing and error reporting only; the work happens in the modules it calls."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

EXPECTED_ERRORS: tuple[type[BaseException], ...] = ()


def _expected_errors():
    from .config import ConfigError
    from .data import DataError
    from .models import ModelError
    from .runs import RunError

    return (ConfigError, DataError, ModelError, RunError, FileNotFoundError, PermissionError, ValueError)


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "accelerate", "urllib3", "httpx", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cmd_run(args) -> int:
    from . import config, recipe

    cfg = config.load(args.config, args.set or [])
    if args.method:
        cfg = config.load(args.config, (args.set or []) + [f"method={args.method}"])
    out = args.output or os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg.method}")
    if args.dry_run:
        print(config.dump(cfg))
        return 0
    logging.getLogger("sgpo").info("run directory: %s", out)
    recipe.run(cfg, out, force_restart=args.force_restart)
    print(Path(out) / "report.md")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_improver_eval(args) -> int:
    from .improver_eval import format_table, run_improver_eval

    res = run_improver_eval(args.model, args.prompts, judge_spec=args.judge, limit=args.limit,
                            baseline=args.baseline, config_path=args.config, overrides=args.set or [],
                            output=args.output, dev_slice=args.dev_slice, rewrite_samples=args.rewrite_samples)
    print(format_table(res), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgpo", description="Self-Generated Preference Optimization")
    p.add_argument("--debug", action="store_true", help="full tracebacks and verbose logs")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a method end to end (default: SGPO on the embedded default experiment)")
    r.add_argument("config", nargs="?", help="YAML config (omit for the embedded default)")
    r.add_argument("--output", "-o", help="run directory (an unfinished run there is resumed)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. rounds=3")
    r.add_argument("--method", help="sgpo, spin, synpo, dpo or sft (same as --set method=...)")
    r.add_argument("--force-restart", action="store_true", help="discard an unfinished run in --output")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, run nothing")
    r.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_run)

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
    ie.add_argument("--rewrite-samples", type=int, help="rewrite tries per draft (default: improver.rewrite_samples)")
    ie.add_argument("--output", "-o", default="improver_eval", help="directory for figures and cached generations")
    ie.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    ie.set_defaults(func=cmd_improver_eval)

    rep = sub.add_parser("report", help="write report.md and plots for a run directory")
    rep.add_argument("run_dir")
    rep.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    rep.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.debug)
    for k in ("HF_HUB_DISABLE_PROGRESS_BARS",):
        os.environ.setdefault(k, "1")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sgpo: interrupted (the run directory resumes where it stopped)", file=sys.stderr)
        return 130
    except _expected_errors() as e:
        if args.debug:
            raise
        print(f"sgpo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug:
            raise
        print(f"sgpo: error: {e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
