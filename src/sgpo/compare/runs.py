"""``sgpo compare``: several methods, and seeds, from the same start model, prompts and budget, judged alike.

Each (method, seed) is an ordinary run in ``OUT/<method>/seed_<seed>`` from the same config with only ``method`` and
``seed`` changed, so splits, slices, sizes, rounds and DPO settings are shared. Then each requested benchmark
evaluates its final model. ``OUT/compare.json`` records every run's state: a finished run is skipped on a re-run, a
failed or killed one resumes where its run directory stopped, and a benchmark already computed is not computed
again. A failure is recorded with its error and does not stop the others. The result is ``OUT/comparison.md`` and
its charts (``report.py``).

Benchmarks (``sgpo.core.registry.COMPARE_BENCHMARKS``; each takes an ``EvalJob`` and returns a dict of figures):

``test``         the run's own test-split figures (``summary.json``): final vs start under every judge the run used
                 (``eval.judge`` and ``eval.second_judge``), with the length-matched variant, mean length, finished
                 rate
``ifeval``       IFEval of the final and the start model (the start model's answers generated once per comparison),
                 prompt-level strict and loose, with the paired bootstrap CI of each difference
``dev``          the run's head-to-head against the start model on the development prompts
``alpaca_eval``  AlpacaEval instructions, final vs start, judged with GPT-4 Turbo's answers as references (a run
                 that trains on AlpacaEval prompts is warned about)
"""
from __future__ import annotations

import gc
import json
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from sgpo.config import schema as config_mod
from sgpo.compare.paired import run_dir_of, test_records
from sgpo.config.schema import Config
from sgpo.core.files import atomic_write_json, content_hash, read_jsonl
from sgpo.core.registry import COMPARE_BENCHMARKS

log = logging.getLogger("sgpo")

DEFAULT_METHODS = ("sft", "dpo", "spin", "synpo", "sgpo")


@dataclass
class EvalJob:
    name: str                    # the run's label in file names: <method>-seed<seed>
    cfg: Config                  # the run's resolved config
    run_dir: Path                # its run directory
    out_dir: Path                # where this benchmark keeps its files for the whole comparison (shared by runs)
    limit: int | None = None
    _judge: list = field(default_factory=list)  # shared lazily-built judge (one per comparison)
    test_judges: list[str] = field(default_factory=list)  # further judges of the saved test answers (``test``)

    @property
    def model_path(self) -> str:
        """The run's final model (``RUN/final``)."""
        return str(self.run_dir / "final")

    @property
    def judge(self):
        if not self._judge:
            from sgpo.eval.judges import api_settings, make_judge

            self._judge.append(make_judge(self.cfg.eval.judge, **api_settings(self.cfg.eval.judge, self.cfg.eval)))
        return self._judge[0]


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def eval_test(job: EvalJob) -> dict:
    """The run's test-split figures, final vs start, for each judge: ``{"judges": {name: {score, ci_low, ci_high, n,
    lc, lc_ci_low, lc_ci_high, lc_n}}, "length", "finished"}`` (lc: among length-matched answer pairs); a scorer
    judge's also ``<what>_<model>`` for what in score (mean score), perfect (share scored 1: prompt-level for
    ``ifeval``), constraints (weighted by each row's constraints: constraint-level) and model in start, pre_rounds,
    final, each ``{score, ci_low, ci_high, n}``. The judges of ``job.test_judges`` judge the run's saved answers now
    (their verdicts cached), and a scorer's figures are recomputed from the saved answers, so a run made before a
    figure existed gets it too."""
    s = {**_summary(job.run_dir), **recomputed_test_figures(job)}
    judges = {}
    for k in s:
        if k.startswith("eval/test/") and k.endswith("/win_rate_vs_start"):
            name, lm = k.split("/")[2], k + "_length_matched"
            judges[name] = {"score": s[k], "ci_low": s[k + "_ci_low"], "ci_high": s[k + "_ci_high"], "n": s[k + "_n"],
                            "lc": s.get(lm), "lc_ci_low": s.get(lm + "_ci_low"), "lc_ci_high": s.get(lm + "_ci_high"),
                            "lc_n": s.get(lm + "_n")}
    if not judges:
        raise ValueError(f"{job.run_dir / 'summary.json'} has no eval/test figures (is data.test_size 0?)")
    for name, j in judges.items():
        for k in (f"eval/test/{name}/{w}_{m}" for w in ("score", "perfect", "constraints")
                  for m in ("final", "start", "pre_rounds")):
            if k in s:
                j[k.split("/")[-1]] = {x: s[k + y] for x, y in
                                       (("score", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high"), ("n", "_n"))}
    return {"judges": judges, "length": s.get("eval/test/length_final"), "finished": s.get("eval/test/finished_final"),
            "start_length": s.get("eval/test/length_start"), "start_finished": s.get("eval/test/finished_start")}


def recomputed_test_figures(job: EvalJob) -> dict:
    """``summary.json``-style test figures made now from the run's saved test answers: every figure of each judge in
    ``job.test_judges`` (``held_out.versus``) and a scorer run judge's own scores (``held_out.scores``)."""
    from sgpo.core.judge_spec import is_scorer
    from sgpo.eval.held_out import judge_name, saved_answers, scores, versus
    from sgpo.eval.judges import judge_for_one_use

    run_specs = [x for x in (job.cfg.eval.judge, job.cfg.eval.second_judge) if is_scorer(x)]
    specs = list(dict.fromkeys(run_specs + job.test_judges))
    texts = saved_answers(job.run_dir / "test")
    if not specs or "final" not in texts:
        return {}
    test = test_records(job.cfg)
    m: dict = {}
    for spec in specs:
        with judge_for_one_use(spec) as judge:
            figures = versus if spec in job.test_judges else scores
            m.update(figures(judge, judge_name(spec), test, texts))
    return m


def eval_ifeval(job: EvalJob) -> dict:
    """IFEval (all 541 unless ``limit``; 256 new tokens, greedy) of the final model and the start model, whose answers
    are shared by every run of the comparison (cached in the benchmark's folder by model name): prompt-level
    (``strict``, ``loose``) and instruction-level (``instruction_strict``, ``instruction_loose``) accuracy, the start
    model's (``start_…``) and each difference with its paired CI (``…_diff``)."""
    from sgpo.eval.benchmark import EvalSpec, ifeval_versus

    spec = EvalSpec(output=job.out_dir, limit=job.limit)
    r = ifeval_versus(job.model_path, job.cfg.model.name, spec)
    out = {"n": r["n"]}
    for mode in ("strict", "loose"):
        out[mode] = r["a"][f"prompt_{mode}"]
        out[f"start_{mode}"] = r["b"][f"prompt_{mode}"]
        out[f"{mode}_diff"] = r[f"prompt_{mode}_diff"]
        out[f"instruction_{mode}"] = r["a"][f"instruction_{mode}"]
        out[f"start_instruction_{mode}"] = r["b"][f"instruction_{mode}"]
        out[f"instruction_{mode}_diff"] = r[f"instruction_{mode}_diff"]
    atomic_write_json(job.out_dir / f"ifeval_versus_{job.name}.json", r)
    return out


def eval_dev(job: EvalJob) -> dict:
    """The run's own final figure: head-to-head against the start model on the held-out development prompts."""
    s = _summary(job.run_dir)
    if "eval/dev/win_rate_vs_start" not in s:
        raise ValueError(f"{job.run_dir / 'summary.json'} has no eval/dev/win_rate_vs_start "
                         "(is eval.head_to_head_size 0?)")
    k = "eval/dev/win_rate_vs_start"
    return {"score": s[k], "ci_low": s[k + "_ci_low"], "ci_high": s[k + "_ci_high"], "n": s[k + "_n"],
            "length": s.get("eval/dev/length")}


def eval_alpaca(job: EvalJob) -> dict:
    """AlpacaEval instructions, the final model head-to-head against the start model, judged with the GPT-4 Turbo
    outputs as references (ties half). Not AlpacaEval's own protocol (model vs GPT-4 Turbo): no LC win rate."""
    from sgpo.data.records import load_records
    from sgpo.eval.base import prefer
    from sgpo.eval.winrate import win_rate
    from sgpo.models.loading import load_tokenizer, resolve

    cfg = job.cfg
    records, _ = load_records("sgpo:alpaca-eval", need="reference")
    records = records[:job.limit] if job.limit else records
    tok = load_tokenizer(cfg.model.name, cfg.model.chat_template)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    start = _outputs(resolve(cfg.model.name), cfg, tok, records, job.out_dir / "start.jsonl")
    final = _outputs(job.model_path, cfg, tok, records, job.out_dir / f"{job.name}.jsonl")
    prefs = prefer(job.judge, [r.prompt_text for r in records], [final[r.id] for r in records],
                   [start[r.id] for r in records], [r.reference for r in records], [r.row() for r in records])
    w = win_rate(prefs)
    return {"score": w["win_rate"], "ci_low": w["ci_low"], "ci_high": w["ci_high"], "n": w["n"],
            "length": sum(len(final[r.id].split()) for r in records) / max(1, len(records))}


def _outputs(model_path: str, cfg: Config, tokenizer, records, shard: Path) -> dict[str, str]:
    """Responses of a model to ``records`` (sampled as in the runs, seeded per prompt), cached in ``shard``."""
    from sgpo.models.loading import load_model, resolve
    from sgpo.generation.rollout import Sampler
    from sgpo.generation.vllm_backend import resolve_backend, worker_options

    have = {r["id"]: r["text"] for r in read_jsonl(shard)} if shard.exists() else {}
    if all(r.id in have for r in records):
        return have
    backend = resolve_backend(cfg.generation.backend, cfg.model.device)
    model = (resolve(model_path) if backend == "vllm"
             else load_model(model_path, device=cfg.model.device, dtype=cfg.model.dtype))
    sampler = Sampler(tokenizer, cfg.generation, cfg.seed, cfg.data.max_prompt_tokens, backend=backend,
                      vllm_options=worker_options(cfg, cfg.model.device))
    out = sampler.rollout(model, records, "eval", 0, shard=shard)
    del model
    return {i: x.text for i, x in out.items()}


# -- what a run cost ------------------------------------------------------------------------------------------------
def run_figures(run_dir: Path) -> dict:
    """Wall time (the stage times in the manifest), pairs trained on, DPO and SFT steps, and the tokens generated
    for training (every rollout shard but the development and test figures')."""
    from sgpo.run.report import stage_metrics

    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    stages = json.loads(manifest.read_text()).get("stages", {}) if manifest.exists() else {}
    out = {"time_s": sum(float(s.get("seconds", 0.0)) for s in stages.values()), "pairs": 0, "dpo_steps": 0,
           "sft_steps": 0, "generated_tokens": generated_tokens(run_dir)}
    for name, m in stage_metrics(run_dir):
        if name.startswith("round_"):
            out["pairs"] += int(m.get("pairs/kept", 0)) if "dpo/steps" in m else 0
            out["dpo_steps"] += int(m.get("dpo/steps", 0))
        out["sft_steps"] += int(m.get("nll/steps", 0))
    prep = run_dir / "prepare" / "metrics.json"
    if prep.exists():
        p = json.loads(prep.read_text())
        out["sft_steps"] += int(p.get("nll/steps", 0))
        out["dpo_steps"] += int(p.get("dpo/steps", 0))
    return out


def generated_tokens(run_dir: Path) -> int:
    """Tokens generated for training: the ``token_ids`` of every rollout shard of the run, not counting the
    development figures (``dev_*``) and the test answers."""
    total = 0
    for shard in Path(run_dir).glob("*/*.jsonl"):
        if shard.parent.name == "test" or shard.name.startswith("dev_"):
            continue
        for row in read_jsonl(shard):
            if isinstance(row, dict) and isinstance(row.get("token_ids"), list):
                total += len(row["token_ids"])
    return total


# -- the comparison -------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What ``sgpo compare`` was asked: the shared config, methods × seeds, extra (method, seed) runs beyond them
    (more seeds for some methods only), benchmarks, overrides, limit, other comparisons whose runs may lend an
    identical SFT (``sft_from``; this comparison's own runs always may), and judges beyond the runs' own for the
    ``test`` figures and the paired ones (``test_judges``: they judge the answers the runs saved)."""
    config: str | None
    methods: list[str]
    seeds: list[int]
    benchmarks: list[str]
    overrides: list[str] = field(default_factory=list)
    limit: int | None = None
    extra: list[tuple[str, int]] = field(default_factory=list)
    sft_from: list[str] = field(default_factory=list)
    test_judges: list[str] = field(default_factory=list)  # further judges of every run's saved test answers

    def runs(self) -> list[tuple[str, int]]:
        """Every (method, seed) once, grouped by method in the order named, seeds ascending."""
        runs = list(dict.fromkeys([(m, s) for m in self.methods for s in self.seeds] + list(self.extra)))
        order = list(dict.fromkeys(m for m, _ in runs))
        return sorted(runs, key=lambda r: (order.index(r[0]), r[1]))


def parse_runs(text: str | None) -> list[tuple[str, int]]:
    """``sgpo@2,spin@2`` → ``[("sgpo", 2), ("spin", 2)]``."""
    runs = []
    for item in (x.strip() for x in (text or "").split(",")):
        if not item:
            continue
        method, _, seed = item.partition("@")
        if not method or not seed.strip().lstrip("-").isdigit():
            raise ValueError(f"'{item}' is not METHOD@SEED (e.g. sgpo@2)")
        runs.append((method.strip(), int(seed)))
    return runs


def compare(plan: Plan, out_dir: str | Path) -> Path:
    """Run and evaluate every (method, seed) of ``plan`` into ``out_dir`` (resuming what is there); write the table."""
    from sgpo.compare.report import write_comparison

    cfgs = _configs(plan)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "compare.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    state.setdefault("runs", {})
    state.update(config=plan.config, benchmarks=plan.benchmarks, limit=plan.limit,
                 notes=[n for n in [_overlap_note(next(iter(cfgs.values())), plan.benchmarks)] if n])
    shared_judge: list = []
    for (m, seed), cfg in cfgs.items():
        entry = _entry(state, m, seed, cfg)
        try:
            run_and_evaluate(entry, cfg, out, plan, shared_judge)
        finally:
            atomic_write_json(state_path, state)
            gc.collect()
            _free_accelerator_memory()
    if "test" in plan.benchmarks:
        state["paired"] = _paired(out, state, plan, next(iter(cfgs.values())))
        atomic_write_json(state_path, state)
    return write_comparison(out, state, plan)


def _paired(out: Path, state: dict, plan: Plan, cfg: Config) -> dict:
    """SGPO against every other method of the same seed (``compare_paired``); a failure is logged, not raised."""
    from sgpo.compare.paired import paired_figures

    done = [(m, s) for m, s in plan.runs() if "test" in state["runs"].get(f"{m}@{s}", {}).get("eval", {})]
    try:
        return paired_figures(out, done, cfg, plan.test_judges)
    except Exception as e:  # the runs' own figures are still written
        log.error("compare: the paired figures failed: %s: %s", type(e).__name__, e)
        return {}


def _configs(plan: Plan) -> dict[tuple[str, int], Config]:
    """Every run's config, loaded (and so validated) before anything runs."""
    from sgpo.core.judge_spec import parse_judge_spec

    for b in plan.benchmarks:
        COMPARE_BENCHMARKS.get(b)  # an unknown name fails here, before anything runs
    for j in plan.test_judges:
        parse_judge_spec(j)  # so does a malformed judge
    if not plan.methods or not plan.seeds:
        raise ValueError("no methods or no seeds to compare")
    return {(m, s): config_mod.load(plan.config, [*plan.overrides, f"method={m}", f"seed={s}"])
            for m, s in plan.runs()}


def _overlap_note(cfg: Config, benches) -> str | None:
    """``alpaca_eval`` on a run that trains on AlpacaEval instructions is not held out: say so (local data only)."""
    if "alpaca_eval" not in benches:
        return None
    src = cfg.data.sft
    if not (src.startswith("sgpo:") or Path(src).exists()):
        return None
    from sgpo.data.records import load_records

    train = {r.id for r in load_records(src, split=cfg.data.split, on_error="skip")[0]}
    n = len(train & {r.id for r in load_records("sgpo:alpaca-eval")[0]})
    if not n:
        return None
    msg = (f"WARNING: {n} AlpacaEval instructions are also in the training data ({src}); the alpaca_eval figures are "
           "not held-out results (the test benchmark is)")
    log.warning(msg)
    return msg


def _entry(state: dict, method: str, seed: int, cfg: Config) -> dict:
    """The state of one run; a changed config starts it afresh."""
    key, digest = f"{method}@{seed}", content_hash(config_mod.to_dict(cfg))
    entry = state["runs"].get(key, {})
    if entry.get("config") != digest:
        entry = {"config": digest}
    entry.update(method=method, seed=seed)
    state["runs"][key] = entry
    return entry


def run_and_evaluate(entry: dict, cfg: Config, out: Path, plan: Plan, shared_judge: list) -> None:
    """One run (skipped when finished) and its benchmarks (each computed once); a failure is recorded, not raised."""
    from sgpo.run import recipe

    m, seed = entry["method"], entry["seed"]
    if entry.get("status") == "done" and not missing_benchmarks(entry, plan):
        log.info("compare: %s seed %d done earlier, skipped", m, seed)
        return
    log.info("compare: %s seed %d", m, seed)
    run_dir = run_dir_of(out, m, seed)
    try:
        if not entry.get("run_done"):  # an identical SFT another run of this seed trained is taken, not redone
            siblings = [run_dir_of(out, other, s) for other, s in plan.runs() if s == seed and other != m]
            siblings += sorted(p for d in plan.sft_from for p in Path(d).glob(f"*/seed_{seed}"))
            recipe.run(cfg, run_dir, sft_from=siblings)
            entry["run_done"] = True
        entry.update(run_figures(run_dir))
        entry.setdefault("eval", {})
        for b in missing_benchmarks(entry, plan):
            job = EvalJob(f"{m}-seed{seed}", cfg, run_dir, out / "eval" / b, plan.limit, shared_judge,
                          plan.test_judges)
            entry["eval"][b] = COMPARE_BENCHMARKS.get(b)(job)
        entry["status"] = "done"
        entry.pop("error", None)
    except Exception as e:  # one run's failure is reported and does not stop the others
        entry["status"] = "failed"
        entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
        log.error("compare: %s seed %d failed: %s", m, seed, entry["error"])
        log.debug("%s", traceback.format_exc())


def missing_benchmarks(entry: dict, plan: Plan) -> list[str]:
    """The plan's benchmarks a run has no figures of yet; ``test`` also when one of the plan's test judges is not
    among its judges."""
    from sgpo.eval.held_out import judge_name

    done = entry.get("eval", {})
    have = set(done.get("test", {}).get("judges", {}))
    return [b for b in plan.benchmarks if b not in done
            or (b == "test" and not {judge_name(j) for j in plan.test_judges} <= have)]


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
