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


def cmd_run(args) -> int:
    from sgpo.config import schema as config
    from sgpo.run import recipe

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


def cmd_eval(args) -> int:
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


def cmd_metrics(args) -> int:
    if args.kind == "alpaca-eval":
        from sgpo.eval.alpaca_eval import main_metrics

        res = main_metrics(args.file, args.data_dir)
    else:
        from sgpo.eval.arena_hard import main_metrics

        res = main_metrics(args.file, version=args.version)
    print(json.dumps(res, indent=2, default=str))
    return 0


def cmd_compare(args) -> int:
    from sgpo.config import schema as config
    from sgpo.compare.runs import Plan, compare, parse_runs

    overrides = (args.set or []) + ([f"eval.judge={args.judge}"] if args.judge else [])
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [config.load(args.config, overrides).seed]
    plan = Plan(args.config, [m.strip() for m in args.methods.split(",") if m.strip()], seeds,
                [b.strip() for b in args.eval.split(",") if b.strip()], overrides, args.limit, parse_runs(args.also))
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


def cmd_config(args) -> int:
    from sgpo.config.reference import text

    print(text(args.section), end="")
    return 0


def cmd_push(args) -> int:
    from sgpo.run.model_card import push

    print(push(args.run_dir, args.repo_id, private=args.private))
    return 0


def cmd_report(args) -> int:
    from sgpo.run.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_improver_eval(args) -> int:
    from sgpo.eval.improver import ImproverEval, format_table, run_improver_eval

    res = run_improver_eval(ImproverEval(args.model, args.prompts, args.judge, args.limit, args.baseline, args.config,
                                         args.set or [], args.output, args.dev_slice, args.rewrite_samples))
    print(format_table(res), end="")
    return 0


def _add_run_parser(sub) -> None:
    r = sub.add_parser("run", help="run a method end to end (default: SGPO on the embedded default experiment)")
    r.add_argument("config", nargs="?", help="YAML config (omit for the embedded default)")
    r.add_argument("--output", "-o", help="run directory (an unfinished run there is resumed)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. rounds=3")
    r.add_argument("--method", help="sgpo, spin, synpo, dpo or sft (same as --set method=...)")
    r.add_argument("--force-restart", action="store_true", help="discard an unfinished run in --output")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, run nothing")
    r.add_argument("--show-prompts", nargs="?", type=int, const=3, metavar="N",
                   help="print the first N rows (default 3) as the model sees them: the policy input and the improver "
                        "input in the chat template, the reference as trained, token counts and what was cut; loads "
                        "only the tokenizer and runs nothing")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_run)


def _add_eval_parser(sub) -> None:
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
    e.set_defaults(func=cmd_eval)


def _add_metrics_parser(sub) -> None:
    mt = sub.add_parser("metrics", help="leaderboard metrics from an annotations / judgments file")
    mt.add_argument("kind", choices=("alpaca-eval", "arena-hard"))
    mt.add_argument("file")
    mt.add_argument("--data-dir", help="alpaca-eval: folder with instruction_difficulty.csv and "
                                       "gamed_baseline_rows.csv (default: the hub dataset, online)")
    mt.add_argument("--version", default="v0.1", choices=("v0.1", "v2.0"), help="arena-hard scoring")
    mt.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    mt.set_defaults(func=cmd_metrics)


def _add_compare_parser(sub) -> None:
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
    c.add_argument("--dry-run", action="store_true", help="print each method's plan, run nothing")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_compare)


def _add_improver_eval_parser(sub) -> None:
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
    ie.set_defaults(func=cmd_improver_eval)


def _add_push_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a run's final model with its model card to the Hugging Face Hub")
    p.add_argument("run_dir", help="a finished run directory (its final/ is uploaded)")
    p.add_argument("--repo-id", required=True, help="hub repository, e.g. you/smollm2-135m-sgpo")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=cmd_push)


def _add_config_parser(sub) -> None:
    c = sub.add_parser("config", help="every config key with its type, default, allowed values and meaning")
    c.add_argument("section", nargs="?", help="only this section (model, data, generation, improver, train, dpo, "
                                              "pairs, eval; '' for the top-level keys)")
    c.set_defaults(func=cmd_config)


def _add_report_parser(sub) -> None:
    rep = sub.add_parser("report", help="write report.md and plots for a run directory")
    rep.add_argument("run_dir")
    rep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    rep.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgpo", description="Self-Generated Preference Optimization")
    p.add_argument("--debug", action="store_true", help="full tracebacks and verbose logs")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    _add_eval_parser(sub)
    _add_metrics_parser(sub)
    _add_compare_parser(sub)
    _add_improver_eval_parser(sub)
    _add_report_parser(sub)
    _add_config_parser(sub)
    _add_push_parser(sub)
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
