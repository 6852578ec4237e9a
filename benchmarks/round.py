"""One SGPO round at the default sizes: generation (policy drafts, improver rewrites), reference pass, DPO.

    python benchmarks/round.py                    # the default config (SmolLM2-135M-Instruct, fp32, CPU)
    python benchmarks/round.py --set data.round_size=16 --set pairs.require_eos=false
    python benchmarks/round.py --quick            # the smoke config (tiny random model): checks the script

The round runs through the recipe's own round stage (the code ``sgpo run`` executes), starting from the start model,
in a temporary run directory, in a fresh process. Printed: seconds and peak RSS per stage (RSS sampled while the stage
runs), pairs kept and dropped, positions computed per DPO step, and the process's peak RSS (the whole round, model
loading included). The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.setup_env()


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="a YAML config (default: the built-in defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--quick", action="store_true", help="the smoke config on the tiny random model")
    return ap.parse_args(argv)


def _timed(stages: dict[str, dict], name: str, fn):
    """``fn`` adding its seconds, CPU seconds and peak RSS to ``stages[name]`` at every call."""
    def wrapper(*a, **k):
        with _common.PeakRSS() as rss, _common.Timer() as t:
            out = fn(*a, **k)
        s = stages.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "peak_rss": 0})
        s["seconds"] += t.seconds
        s["cpu_seconds"] += t.cpu_seconds
        s["peak_rss"] = max(s["peak_rss"], rss.peak)
        return out
    return wrapper


@contextlib.contextmanager
def _instrumented(stages: dict[str, dict], positions: list[tuple[int, int]]):
    """Times the generation, reference and DPO stages into ``stages`` and records (positions, pairs) of every DPO
    collate into ``positions``, restoring the originals on exit."""
    from sgpo.run import trainer
    from sgpo.generation.rollout import Sampler
    from sgpo.training import dpo as dpo_mod

    collate = dpo_mod.collate_pairs

    def counting(*a, **k):
        b = collate(*a, **k)
        positions.append((b.tokens, b.n_pairs))
        return b

    saved = trainer.reference_logps, trainer.train_dpo, Sampler.rollout
    trainer.reference_logps = _timed(stages, "reference", trainer.reference_logps)
    trainer.train_dpo = _timed(stages, "dpo", trainer.train_dpo)
    Sampler.rollout = _timed(stages, "generation", Sampler.rollout)
    dpo_mod.collate_pairs = counting
    try:
        yield
    finally:
        trainer.reference_logps, trainer.train_dpo, Sampler.rollout = saved
        dpo_mod.collate_pairs = collate


def _run_round(cfg) -> tuple:
    """The first round through the recipe's round stage in a temporary run directory: its metrics, its prompts and
    the setup and total timers."""
    from sgpo.core import distributed
    from sgpo.run import recipe
    from sgpo.methods.base import Context, get_method
    from sgpo.run.stages import RunDir
    from sgpo.run.session import open_session
    from sgpo.data.splits import prepare_splits

    with tempfile.TemporaryDirectory() as tmp, _common.Timer() as total:
        with _common.Timer() as setup:
            s = open_session(cfg, RunDir(tmp), distributed.Dist(None))
            data = prepare_splits(cfg, s.tokenizer)
            s.policy.model  # noqa: B018  (load it now, outside the stage timings)
        records = data.rounds[0] if data.rounds else []
        s.stages.current = "round_1"
        m = recipe.round_stage(Context(s, "round_1", 1, records, s.policy.path), get_method(cfg.method))
    return m, records, setup, total


def _print_report(cfg, m: dict, records, stages: dict[str, dict], train_pos: list, setup, total) -> None:
    import torch

    print(f"model {cfg.model.name} | method {cfg.method} | {len(records)} prompts | max_new_tokens "
          f"{cfg.generation.max_new_tokens} | generation batch {cfg.generation.batch_size} | dpo batch "
          f"{cfg.dpo.batch_size}, {cfg.dpo.epochs} epoch(s) | torch {torch.__version__} ({torch.get_num_threads()} "
          "threads)")
    dropped = {k.split("/")[-1]: v for k, v in m.items() if k.startswith("pairs/dropped/") and v}
    print(f"pairs kept {int(m.get('pairs/kept', 0))}, dropped {dropped or 'none'}")
    print(f"{'stage':<14}{'seconds':>10}{'CPU s':>10}{'peak RSS GB':>14}")
    print(f"{'setup':<14}{setup.seconds:>10.1f}{setup.cpu_seconds:>10.1f}{'':>14}")
    for name in ("generation", "reference", "dpo"):
        s = stages.get(name)
        secs, cpu = (s["seconds"], s["cpu_seconds"]) if s else (0.0, 0.0)
        rss = f"{_common.gb(s['peak_rss']):.2f}" if s else "-"
        print(f"{name:<14}{secs:>10.1f}{cpu:>10.1f}{rss:>14}")
    print(f"{'round total':<14}{total.seconds:>10.1f}{total.cpu_seconds:>10.1f}")
    if train_pos:
        pairs_trained = int(m.get("pairs/kept", 0)) * cfg.dpo.epochs
        print(f"DPO: {int(m.get('dpo/steps', 0))} steps in {len(train_pos)} forward passes, "
              f"{sum(t for t, _ in train_pos) / len(train_pos):.0f} positions per forward, "
              f"{pairs_trained / stages['dpo']['seconds']:.3f} pairs/s "
              f"({pairs_trained / (stages['dpo']['seconds'] + stages['reference']['seconds']):.3f} with the "
              f"reference pass)")


def main(argv=None) -> dict:
    args = _parse_args(argv)

    import torch

    # every module the round uses is imported here, before the seed is set (the helpers import them again)
    from sgpo.config import schema as config_mod
    from sgpo.core import distributed
    from sgpo.run import recipe
    from sgpo.run import session  # noqa: F401
    from sgpo.methods.base import get_method  # noqa: F401
    from sgpo.generation.rollout import Sampler  # noqa: F401
    from sgpo.run.stages import RunDir  # noqa: F401
    from sgpo.data.splits import prepare_splits  # noqa: F401
    from sgpo.training import dpo as dpo_mod  # noqa: F401

    cfg_path = args.config or (str(_common.REPO / "configs" / "smoke.yaml") if args.quick else None)
    cfg = config_mod.load(cfg_path, args.set)
    torch.manual_seed(cfg.seed)
    stages: dict[str, dict] = {}
    positions = []
    with _instrumented(stages, positions):
        m, records, setup, total = _run_round(cfg)

    n_ref_batches = math.ceil(int(m.get("pairs/kept", 0)) / (2 * cfg.dpo.batch_size))
    train_pos = positions[n_ref_batches:]
    _print_report(cfg, m, records, stages, train_pos, setup, total)
    peak = _common.process_peak_rss_bytes()
    print(f"process peak RSS: {_common.gb(peak):.2f} GB")
    summary = {
        "model": cfg.model.name, "prompts": len(records), "pairs": int(m.get("pairs/kept", 0)),
        **{f"{k}_s": round(stages[k]["seconds"], 2) for k in ("generation", "reference", "dpo") if k in stages},
        "setup_s": round(setup.seconds, 2), "total_s": round(total.seconds, 2),
        "stage_peak_rss_gb": {k: round(_common.gb(v["peak_rss"]), 3) for k, v in stages.items()},
        "peak_rss_gb": round(_common.gb(peak), 3),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
