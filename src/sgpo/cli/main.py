"""The ``sgpo`` command: the parser of every command (one module each beside this one) and one-line errors for
the mistakes a user can make."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from sgpo.cli import compare, config, evaluate, improver_eval, metrics, push, report, run

COMMANDS = (run, evaluate, metrics, compare, improver_eval, report, config, push)
"""The commands in the order ``sgpo --help`` lists them; each has ``add_parser(sub)`` and ``command(args)``."""


def _expected_errors():
    from sgpo.config.schema import ConfigError
    from sgpo.data.records import DataError
    from sgpo.models.loading import ModelError
    from sgpo.core.files import RunError
    from sgpo.run.model_card import PushError
    from sgpo.core.trackers import TrackerError
    from sgpo.generation.vllm_backend import BackendError
    from sgpo.eval.base import JudgeError
    from sgpo.eval.ifeval import IFEvalError
    from sgpo.generation.rollout import PeerFailed

    return (ConfigError, DataError, ModelError, RunError, PushError, TrackerError, BackendError, JudgeError,
            IFEvalError, PeerFailed, FileNotFoundError, PermissionError, ValueError)


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "accelerate", "urllib3", "httpx", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgpo", description="Self-Generated Preference Optimization")
    p.add_argument("--debug", action="store_true", help="full tracebacks and verbose logs")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
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
