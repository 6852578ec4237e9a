"""``sgpo run``: a method end to end (default: SGPO on the embedded default experiment), its dry run and ``--show-prompts``."""
from __future__ import annotations

import argparse
import logging
import os
from datetime import datetime
from pathlib import Path


def command(args) -> int:
    from sgpo.config import schema as config
    from sgpo.run import recipe

    _config_after_show_prompts(args)
    cfg = config.load(args.config, args.set or [])
    if args.method:
        cfg = config.load(args.config, (args.set or []) + [f"method={args.method}"])
    out = args.output or os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg.method}")
    if args.show_prompts is not None:
        from sgpo.run.show_prompts import show_prompts

        print(show_prompts(cfg, args.show_prompts), end="")
        return 0
    if args.dry_run:
        from sgpo.run.dry_run import dry_run, format_dry_run

        print(config.dump(cfg))
        print(format_dry_run(dry_run(cfg), cfg))
        return 0
    logging.getLogger("sgpo").info("run directory: %s", out)
    recipe.run(cfg, out, force_restart=args.force_restart)
    print(Path(out) / "report.md")
    return 0


def _count_or_path(value: str):
    """``--show-prompts``' optional N; anything but a number is the config path written after the flag."""
    try:
        return int(value)
    except ValueError:
        return value


def _config_after_show_prompts(args) -> None:
    """``sgpo run --show-prompts my.yaml``: argparse gives the path to the flag's optional N; it is the config."""
    if isinstance(args.show_prompts, str):
        if args.config is not None:
            from sgpo.config.schema import ConfigError

            raise ConfigError(f"--show-prompts takes a number of rows, not '{args.show_prompts}' "
                              f"(the config is {args.config})")
        args.config, args.show_prompts = args.show_prompts, 3


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="run a method end to end (default: SGPO on the embedded default experiment)")
    r.add_argument("config", nargs="?", help="YAML config (omit for the embedded default)")
    r.add_argument("--output", "-o", help="run directory (an unfinished run there is resumed)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. rounds=3")
    r.add_argument("--method", help="sgpo, spin, synpo, dpo or sft (same as --set method=...)")
    r.add_argument("--force-restart", action="store_true", help="discard an unfinished run in --output")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, run nothing")
    r.add_argument("--show-prompts", nargs="?", type=_count_or_path, const=3, metavar="N",
                   help="print the first N rows (default 3) as the model sees them: the policy input and the improver "
                        "input in the chat template, the reference as trained, token counts and what was cut; loads "
                        "only the tokenizer and runs nothing")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    r.set_defaults(func=command)
