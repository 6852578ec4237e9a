"""``sgpo compare``: several methods from the same start model, with the same prompts and budget, judged alike.

Each method runs as an ordinary run in ``OUT/<method>`` (the config with only ``method`` and ``eval.judge`` changed,
so prompts, sizes, rounds and DPO settings are shared), then every requested benchmark evaluates its final model
with the same judge. ``OUT/compare.json`` records each method's state: a finished method is skipped on a re-run, a
failed one is retried (its run directory resumes where it stopped). A failure is recorded with its error and does
not stop the other methods. The result is ``OUT/comparison.md`` (one table) and ``OUT/comparison.png``.

Benchmarks are functions in ``BENCHMARKS`` (``register_benchmark``); each takes an ``EvalJob`` and returns
``{"score", "ci_low", "ci_high", "n", "length", "label"}`` (score: a win rate in [0, 1]). The evaluation module can
replace an entry without touching the rest.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import config as config_mod
from .config import Config
from .files import atomic_write_json, atomic_write_text, content_hash

log = logging.getLogger("sgpo")

DEFAULT_METHODS = ("sft", "dpo", "spin", "synpo", "sgpo")


@dataclass
class EvalJob:
    method: str
    cfg: Config                  # the method's resolved config
    run_dir: Path                # its run directory
    out_dir: Path                # where this benchmark keeps its files for the whole comparison (shared by methods)
    judge_spec: str
    limit: int | None = None
    _judge: list = field(default_factory=list)  # shared lazily-built judge (one per comparison)

    @property
    def model_path(self) -> str:
        """The run's final model (``RUN/final``)."""
        return str(self.run_dir / "final")

    @property
    def judge(self):
        if not self._judge:
            from .eval.judges import make_judge

            self._judge.append(make_judge(self.judge_spec))
        return self._judge[0]


BENCHMARKS: dict[str, Callable[[EvalJob], dict]] = {}


def register_benchmark(name: str):
    def deco(fn):
        BENCHMARKS[name] = fn
        return fn
    return deco


@register_benchmark("dev")
def eval_dev(job: EvalJob) -> dict:
    """The run's own final figure: head-to-head against the start model on the held-out development prompts."""
    path = job.run_dir / "summary.json"
    s = json.loads(path.read_text()) if path.exists() else {}
    if "eval/dev/win_rate_vs_start" not in s:
        raise ValueError(f"{path} has no eval/dev/win_rate_vs_start (is eval.head_to_head_size 0?)")
    return {"score": s["eval/dev/win_rate_vs_start"], "ci_low": s["eval/dev/win_rate_vs_start_ci_low"],
            "ci_high": s["eval/dev/win_rate_vs_start_ci_high"], "n": s["eval/dev/win_rate_vs_start_n"],
            "length": s.get("eval/dev/length"), "label": "dev: win rate vs start"}


@register_benchmark("alpaca_eval")
def eval_alpaca(job: EvalJob) -> dict:
    return alpaca_eval_vs_start(job)


def _outputs(model_path: str, cfg: Config, tokenizer, records, shard: Path, role: str) -> dict[str, str]:
    """Responses of a model to ``records`` (sampled as in the runs, seeded per prompt), cached in ``shard``."""
    from .files import read_jsonl
    from .models import load_model, resolve
    from .rollout import Sampler
    from .vllm_backend import resolve_backend, worker_options

    have = {r["id"]: r["text"] for r in read_jsonl(shard)} if shard.exists() else {}
    if all(r.id in have for r in records):
        return have
    backend = resolve_backend(cfg.generation.backend, cfg.model.device)
    model = (resolve(model_path) if backend == "vllm"
             else load_model(model_path, device=cfg.model.device, dtype=cfg.model.dtype))
    sampler = Sampler(tokenizer, cfg.generation, cfg.seed, cfg.data.max_prompt_tokens, backend=backend,
                      vllm_options=worker_options(cfg, cfg.model.device))
    out = sampler.rollout(model, records, role, 0, shard=shard)
    del model
    return {i: x.text for i, x in out.items()}


def alpaca_eval_vs_start(job: EvalJob) -> dict:
    """AlpacaEval instructions, the final model head-to-head against the start model, judged with the GPT-4 Turbo
    outputs as references (ties half). Not AlpacaEval's own protocol (model vs GPT-4 Turbo): no LC win rate."""
    from .data import load_records
    from .eval.winrate import win_rate
    from .models import load_tokenizer, resolve

    cfg = job.cfg
    records, _ = load_records("sgpo:alpaca-eval", need="reference")
    if job.limit:
        records = records[:job.limit]
    tok = load_tokenizer(cfg.model.name)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    start = _outputs(resolve(cfg.model.name), cfg, tok, records, job.out_dir / "start.jsonl", "eval")
    final = _outputs(job.model_path, cfg, tok, records, job.out_dir / f"{job.method}.jsonl", "eval")
    prefs = job.judge.prefer([r.prompt_text for r in records], [final[r.id] for r in records],
                             [start[r.id] for r in records], [r.reference for r in records])
    atomic_write_text(job.out_dir / f"{job.method}_judgments.jsonl",
                      "".join(json.dumps({"id": r.id, "preference": p}) + "\n" for r, p in zip(records, prefs)))
    w = win_rate(prefs)
    return {"score": w["win_rate"], "ci_low": w["ci_low"], "ci_high": w["ci_high"], "n": w["n"],
            "length": sum(len(final[r.id].split()) for r in records) / max(1, len(records)),
            "label": "alpaca_eval: win rate vs start"}


# -- the comparison -------------------------------------------------------------------------------------------------
def run_figures(run_dir: Path) -> dict:
    """Wall time (sum of the stage times in the manifest), pairs trained on, DPO and SFT steps of a run."""
    from .report import stage_metrics

    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    stages = json.loads(manifest.read_text()).get("stages", {}) if manifest.exists() else {}
    out = {"time_s": sum(float(s.get("seconds", 0.0)) for s in stages.values()), "pairs": 0, "dpo_steps": 0,
           "sft_steps": 0}
    for name, m in stage_metrics(run_dir):
        if name.startswith("round_"):
            out["pairs"] += int(m.get("pairs/kept", 0)) if "dpo/steps" in m else 0
            out["dpo_steps"] += int(m.get("dpo/steps", 0))
        out["sft_steps"] += int(m.get("nll/steps", 0))
    prep = run_dir / "prepare" / "metrics.json"
    if prep.exists():
        out["sft_steps"] += int(json.loads(prep.read_text()).get("nll/steps", 0))
    return out


def _overlap_note(cfg: Config, benches) -> str | None:
    """The training prompts must not include the evaluation prompts; checked where the data is local."""
    if "alpaca_eval" not in benches:
        return None
    src = cfg.data.sft
    if not (src.startswith("sgpo:") or Path(src).exists()):
        return None
    from .data import load_records

    train = {r.id for r in load_records(src, split=cfg.data.split, on_error="skip")[0]}
    evals = {r.id for r in load_records("sgpo:alpaca-eval")[0]}
    n = len(train & evals)
    if not n:
        return None
    msg = (f"WARNING: {n} AlpacaEval instructions are also in the training data ({src}); "
           "the alpaca_eval figures are not held-out results")
    log.warning(msg)
    return msg


def compare(config_path: str | None, methods, benches, judge: str, out_dir: str | Path, *, overrides=(),
            limit: int | None = None) -> Path:
    from . import recipe

    methods = [m.strip() for m in methods if m.strip()]
    benches = [b.strip() for b in benches if b.strip()]
    unknown = [b for b in benches if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark '{unknown[0]}' (known: {', '.join(sorted(BENCHMARKS))})")
    if not methods:
        raise ValueError("no methods to compare")
    cfgs = {m: config_mod.load(config_path, [*overrides, f"method={m}", f"eval.judge={judge}"]) for m in methods}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "compare.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    state.setdefault("methods", {})
    state.update(config=config_path, judge=judge, benchmarks=benches, limit=limit)
    notes = [n for n in [_overlap_note(cfgs[methods[0]], benches)] if n]
    shared_judge: list = []

    for m in methods:
        cfg = cfgs[m]
        key = content_hash(config_mod.to_dict(cfg))
        entry = state["methods"].get(m, {})
        if entry.get("config") != key:
            entry = {"config": key}
        state["methods"][m] = entry
        if entry.get("status") == "done" and all(b in entry.get("eval", {}) for b in benches):
            log.info("compare: %s done earlier, skipped", m)
            continue
        log.info("compare: %s", m)
        try:
            if not entry.get("run_done"):
                recipe.run(cfg, out / m)
                entry["run_done"] = True
            entry.update(run_figures(out / m))
            entry.setdefault("eval", {})
            for b in benches:
                if b not in entry["eval"]:
                    job = EvalJob(m, cfg, out / m, out / "eval" / b, judge, limit, shared_judge)
                    entry["eval"][b] = BENCHMARKS[b](job)
            entry["status"] = "done"
            entry.pop("error", None)
        except Exception as e:  # one method's failure is reported and does not stop the others
            entry["status"] = "failed"
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
            log.error("compare: %s failed: %s", m, entry["error"])
            log.debug("%s", traceback.format_exc())
        finally:
            atomic_write_json(state_path, state)
            gc.collect()
            _free_accelerator_memory()
    return write_comparison(out, state, methods, benches, notes)


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def write_comparison(out: Path, state: dict, methods, benches, notes=()) -> Path:
    """``comparison.md`` (the table) and ``comparison.png`` (bars with 95% CIs) from the comparison state."""
    judge = state.get("judge", "")
    head = ["method"]
    for b in benches:
        head += [f"{b}: win rate vs start, % [95% CI] (n)", f"{b}: mean length (words)"]
    head += ["wall time (s)", "pairs used", "DPO steps", "status"]
    lines = ["# Method comparison", "",
             f"Every method starts from `{_start_model(out, methods)}` with the same prompts, sizes and rounds; "
             f"every final model is judged against the start model by the same judge (`{judge}`; ties count half).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        e = state["methods"].get(m, {})
        row = [m]
        for b in benches:
            r = e.get("eval", {}).get(b)
            if r:
                row += [f"{_pct(r['score'])} [{_pct(r['ci_low'])}–{_pct(r['ci_high'])}] ({r['n']})",
                        "–" if r.get("length") is None else f"{r['length']:.0f}"]
            else:
                row += ["–", "–"]
        row += [f"{e['time_s']:.0f}" if "time_s" in e else "–", str(e.get("pairs", "–")),
                str(e.get("dpo_steps", "–"))]
        status = e.get("status", "not run")
        if status == "failed":
            status = "failed: " + e.get("error", "").replace("|", "\\|")
        row.append(status)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "*wall time*: the sum of the run's stage times; *pairs used*: preference pairs trained on, summed "
              "over rounds (SynPO re-uses the pairs of earlier rounds, so its pairs and DPO steps grow with the "
              "rounds); *DPO steps*: optimizer steps per process."]
    if "alpaca_eval" in benches:
        lim = state.get("limit")
        lines += ["", "*alpaca_eval*: the AlpacaEval instructions"
                  + (f" (the first {lim})" if lim else "")
                  + "; each final model's answer against the start model's answer to the same instruction, the "
                  "judge given the GPT-4 Turbo output as the reference. This is not AlpacaEval's own protocol "
                  "(model vs GPT-4 Turbo), so there is no length-controlled win rate"
                  + (" (which would also need all 805 instructions)." if lim else ".")]
    if "dev" in benches:
        lines += ["", "*dev*: the held-out development prompts of the training data, against the start model's "
                  "answers with the SFT references given to the judge."]
    for n in notes:
        lines += ["", f"**{n}**"]
    png = _chart(out, state, methods, benches)
    if png:
        lines += ["", f"![comparison]({png.name})"]
    path = out / "comparison.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _start_model(out: Path, methods) -> str:
    for m in methods:
        p = out / m / "config.yaml"
        if p.exists():
            import yaml

            return (yaml.safe_load(p.read_text()) or {}).get("model", {}).get("name", "?")
    return "?"


def _chart(out: Path, state: dict, methods, benches) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(benches)), figsize=(1.2 + 1.1 * len(methods) * max(1, len(benches)), 3.4),
                             squeeze=False)
    for ax, b in zip(axes[0], benches):
        xs, ys, lo, hi, labels = [], [], [], [], []
        for i, m in enumerate(methods):
            r = state["methods"].get(m, {}).get("eval", {}).get(b)
            labels.append(m if r else f"{m}\n(failed)" if state["methods"].get(m, {}).get("status") == "failed"
                          else f"{m}\n(–)")
            if r and not math.isnan(r["score"]):
                xs.append(i)
                ys.append(100 * r["score"])
                lo.append(100 * (r["score"] - r["ci_low"]))
                hi.append(100 * (r["ci_high"] - r["score"]))
        ax.bar(xs, ys, yerr=[lo, hi], capsize=4, color="#4c72b0")
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(methods)), labels, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("win rate vs start (%)", fontsize=8)
        ax.set_title(b, fontsize=9)
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
