"""``sgpo eval``: generate a model's answers to a benchmark, judge them, and write a leaderboard row.

Benchmarks: ``alpaca_eval`` (805 instructions vs GPT-4 Turbo), ``arena_hard_v0.1`` (500 vs gpt-4-0314),
``arena_hard_v2.0`` (750 vs o3-mini), ``ifeval`` (541, official checkers, no judge). Generations and annotations
are cached in the output directory (keyed by content), so an interrupted evaluation resumes and a second judge
re-scores without regenerating. Head-to-head (``--versus``) compares two models on any prompt set.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from sgpo.data.records import Record, load_records
from sgpo.eval.base import prefer
from sgpo.eval.judges import make_judge
from sgpo.eval.preflight import check_judge
from sgpo.eval.winrate import format_win_rate, win_rate
from sgpo.config.schema import GenerationConfig
from sgpo.models.loading import load_model, load_tokenizer, resolve
from sgpo.generation.rollout import Sampler
from sgpo.generation.vllm_backend import resolve_backend
from sgpo.core.files import atomic_write_json, content_hash, write_jsonl
from sgpo.core.registry import BENCHMARKS

log = logging.getLogger("sgpo")


@dataclass
class Item:
    id: str
    prompt: str
    baseline: str | None = None   # the benchmark's baseline answer
    extra: dict | None = None


def benchmark_items(name: str, limit: int | None = None, data_dir: str | None = None) -> list[Item]:
    """The items of a benchmark (``BENCHMARKS``), the first ``limit`` of them when given."""
    items = BENCHMARKS.get(name)(data_dir)
    return items[:limit] if limit else items


def alpaca_eval_items(data_dir: str | None = None) -> list[Item]:
    from sgpo.eval.alpaca_eval import load_alpaca_eval

    return [Item(str(i), r["instruction"], r["output"]) for i, r in enumerate(load_alpaca_eval())]


def _arena_hard_items(rows: list[dict]) -> list[Item]:
    return [Item(r["uid"], r["prompt"], r.get("baseline_answer") or r.get("answer"), r) for r in rows]


def arena_hard_v01_items(data_dir: str | None = None) -> list[Item]:
    from sgpo.eval import arena_hard

    if not data_dir:
        raise ValueError("arena_hard_v0.1 needs --data-dir: a folder with question.jsonl and "
                         "model_answer/gpt-4-0314.jsonl")
    return _arena_hard_items(arena_hard.load_arena_hard_v01(data_dir))


def arena_hard_v20_items(data_dir: str | None = None) -> list[Item]:
    from sgpo.eval import arena_hard

    return _arena_hard_items(arena_hard.load_arena_hard_v20(data_dir))


def ifeval_items(data_dir: str | None = None) -> list[Item]:
    from sgpo.eval.ifeval import load_ifeval_prompts

    return [Item(str(r.get("key", i)), r["prompt"], None, r) for i, r in enumerate(load_ifeval_prompts())]


@dataclass
class EvalSpec:
    """How an evaluation runs (``sgpo eval``): judge, output directory, size, generation settings, seed."""
    judge: str = "reference"
    output: str | Path = "eval"
    limit: int | None = None
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=256,
                                                                                  temperature=0.0))
    data_dir: str | None = None
    """AlpacaEval's length-control inputs (see ``eval/alpaca_eval.py``)."""
    seed: int = 0
    name: str | None = None
    split: str = "train"


def generate_answers(model_name: str, prompts: list[tuple[str, str]], gen: GenerationConfig, out_dir: Path,
                     seed: int = 0) -> dict[str, str]:
    """Answers of ``model_name`` to (id, prompt text) items, cached in ``out_dir`` by model and settings."""
    tok = load_tokenizer(model_name)
    sampler = Sampler(tok, gen, seed, backend=resolve_backend(gen.backend, "auto"), vllm_options={"seed": seed})
    key = content_hash([str(model_name), *sampler.identity()])
    shard = out_dir / f"generations-{key}.jsonl"
    records = [Record(i, (("user", p),)) for i, p in prompts]
    have = set()
    if shard.exists():
        from sgpo.core.files import read_jsonl

        have = {r["id"] for r in read_jsonl(shard)}
    if all(r.id in have for r in records):
        from sgpo.core.files import read_jsonl

        return {r["id"]: r["text"] for r in read_jsonl(shard)}
    model = resolve(model_name) if sampler.backend == "vllm" else load_model(model_name)
    gens = sampler.rollout(model, records, "eval", 0, shard=shard)
    return {i: g.text for i, g in gens.items()}


def warn_if_trained_on(model: str, prompts: list[str]) -> int:
    """Warn loudly when evaluation prompts overlap the training prompts of a run's model (``RUN/final``)."""
    cfg_path = Path(str(model)).parent / "config.yaml"
    if not cfg_path.exists():
        return 0
    try:
        import yaml

        data = (yaml.safe_load(cfg_path.read_text()) or {}).get("data", {})
        trained = {r.prompt_text for src in (data.get("sft"), data.get("prompts")) if src
                   for r in load_records(src, on_error="skip")[0]}
    except Exception:  # the overlap check must never stop an evaluation
        return 0
    overlap = sum(p in trained for p in prompts)
    if overlap:
        log.warning("WARNING: %d of %d evaluation prompts are in the training data of %s — these figures are not "
                    "held-out", overlap, len(prompts), model)
    return overlap


def _prob_to_verdict(p: float) -> str | None:
    """A preference probability for A as an Arena-Hard label (for judges that give no labels)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return None
    return "A>>B" if p >= 0.85 else "A>B" if p >= 0.6 else "A=B" if p > 0.4 else "B>A" if p > 0.15 else "B>>A"


PAPER_JUDGES = {"alpaca_eval": "openai:gpt-4-1106-preview", "arena_hard_v0.1": "openai:gpt-4-1106-preview",
                "arena_hard_v2.0": "openai:gpt-4.1"}
"""The judge each benchmark's own leaderboard uses (docs/eval.md)."""
UNJUDGED = ("ifeval",)
"""Benchmarks scored by programs, without a judge."""


def check_benchmark_judge(benchmark: str, judge_spec: str, data_dir: str | None = None, n: int = 0) -> None:
    """Before any model is loaded: the judge can judge ``benchmark`` — a model's answer against the benchmark's
    baseline answer, no reference text, no constraints (not ``reference``, not a scorer) — and it answers
    (``eval.preflight.check_judge``: an API judge's key and one request); AlpacaEval's LC inputs can be read when
    all ``n`` of its instructions are judged. A ``ValueError`` or ``JudgeError`` in one line otherwise."""
    from sgpo.eval.alpaca_eval import N_INSTRUCTIONS, load_lc_inputs
    from sgpo.core.judge_spec import is_scorer, parse_judge_spec

    if benchmark in UNJUDGED:
        return
    paper = PAPER_JUDGES.get(benchmark, "openai:MODEL")
    if parse_judge_spec(judge_spec)[0] == "reference":
        raise ValueError(f"--judge {judge_spec}: the reference judge compares two candidates against a reference "
                         f"text; it cannot judge a model against the {benchmark} baseline itself. Use an API or local "
                         f"LM judge ({paper} as the leaderboard does; openai:MODEL@URL, hf:PATH, reward:PATH, lm:PATH), "
                         "or a head-to-head: --versus MODEL_B")
    if is_scorer(judge_spec):
        raise ValueError(f"--judge {judge_spec}: a scorer scores each answer by its row's constraints or a program of "
                         f"its own, and {benchmark} compares an answer with the baseline's; use a pairwise judge "
                         f"({paper} as the leaderboard does; hf:PATH, reward:PATH, lm:PATH)")
    check_judge(judge_spec, "--judge")
    if benchmark == "alpaca_eval" and n == N_INSTRUCTIONS:
        load_lc_inputs(data_dir)  # the LC fit's inputs, read (or downloaded) now rather than after the judging


def evaluate(model: str, benchmark: str, spec: EvalSpec) -> dict:
    """``model`` on a benchmark (``BENCHMARKS``): its leaderboard row, written to ``leaderboard_row.json``."""
    out, judge_spec = Path(spec.output), spec.judge
    items = benchmark_items(benchmark, spec.limit, spec.data_dir)
    check_benchmark_judge(benchmark, judge_spec, spec.data_dir, len(items))
    out.mkdir(parents=True, exist_ok=True)
    name = spec.name or Path(str(model)).name
    warn_if_trained_on(model, [it.prompt for it in items])
    answers = generate_answers(model, [(it.id, it.prompt) for it in items], spec.generation, out, spec.seed)
    write_jsonl(out / "model_outputs.jsonl", [{"id": it.id, "instruction": it.prompt, "output": answers[it.id],
                                               "generator": name} for it in items])
    row: dict = {"model": name, "benchmark": benchmark, "n": len(items), "limit": spec.limit,
                 "avg_length": sum(len(answers[it.id]) for it in items) / max(1, len(items))}
    if benchmark == "ifeval":
        from sgpo.eval.ifeval import score_ifeval

        row.update(score_ifeval([it.extra for it in items], {it.prompt: answers[it.id] for it in items}))
        row["judge"] = "official checkers"
    else:
        judge = make_judge(judge_spec, cache=str(out / "annotations-cache.jsonl"))
        row["judge"] = judge_spec
        row["judge_template"] = judge.template_name or "sgpo"
        if benchmark == "alpaca_eval":
            row.update(_alpaca_eval(judge, items, answers, name, out, spec.data_dir))
        else:
            row.update(_arena_hard(judge, items, answers, name, out, benchmark.rsplit("_", 1)[-1]))
    atomic_write_json(out / "leaderboard_row.json", row)
    return row


def _alpaca_eval(judge, items, answers, name, out, data_dir) -> dict:
    from sgpo.eval.alpaca_eval import metrics_from_annotations

    prompts = [it.prompt for it in items]
    prefs = judge.prefer(prompts, [answers[it.id] for it in items], [it.baseline for it in items], None)
    annotations = [{"instruction": it.prompt, "output_1": it.baseline, "output_2": answers[it.id],
                    "generator_1": "gpt4_1106_preview", "generator_2": name,
                    "preference": None if p is None or math.isnan(p) else 1.0 + p}
                   for it, p in zip(items, prefs)]
    atomic_write_json(out / "annotations.json", annotations)
    m = metrics_from_annotations(annotations, data_dir)
    m["failed_annotations"] = sum(a["preference"] is None for a in annotations)
    return m


def _arena_hard(judge, items, answers, name, out, version) -> dict:
    from sgpo.eval.arena_hard import DEFAULT_BASELINE, scores_from_judgments

    qs = [it.prompt for it in items]
    model_ans = [answers[it.id] for it in items]
    base_ans = [it.baseline for it in items]
    if judge.gives_verdicts:
        g1 = judge.verdicts(qs, base_ans, model_ans)
        g2 = judge.verdicts(qs, model_ans, base_ans)
    else:
        g1 = [_prob_to_verdict(p) for p in judge.prefer(qs, base_ans, model_ans, None)]
        g2 = [_prob_to_verdict(p) for p in judge.prefer(qs, model_ans, base_ans, None)]
    rows = [{"uid": it.id, "model": name, "baseline": DEFAULT_BASELINE[version],
             "games": [{"verdict": a}, {"verdict": b}]} for it, a, b in zip(items, g1, g2)]
    write_jsonl(out / "judgments.jsonl", rows)
    return scores_from_judgments(rows, version=version)


def ifeval_versus(model_a: str, model_b: str, spec: EvalSpec) -> dict:
    """IFEval of two models on the same prompts (all 541 unless ``limit``), strict and loose, and the paired bootstrap
    CI of each difference (a − b): prompt-level and instruction-level accuracy (the share of all instructions
    followed, each instruction counted once, as IFEval's own figure)."""
    from sgpo.eval.ifeval import aggregate_ifeval, evaluate_ifeval
    from sgpo.eval.winrate import paired_difference

    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    items = benchmark_items("ifeval", spec.limit)
    rows = [it.extra for it in items]
    per = {}
    res: dict = {"benchmark": "ifeval", "model_a": str(model_a), "model_b": str(model_b), "n": len(items)}
    for label, model in (("a", model_a), ("b", model_b)):
        answers = generate_answers(model, [(it.id, it.prompt) for it in items], spec.generation, out, spec.seed)
        per[label] = evaluate_ifeval(rows, {it.prompt: answers[it.id] for it in items})
        res[label] = aggregate_ifeval(per[label])
    counts = [max(1, len(r.strict)) for r in per["a"]]  # instruction level: each instruction counts once
    for mode in ("strict", "loose"):
        for level, score, weights in (("prompt", lambda r: float(all(getattr(r, mode))), None),
                                      ("instruction", lambda r: sum(getattr(r, mode)) / max(1, len(r.strict)), counts)):
            d = paired_difference([score(r) for r in per["a"]], [score(r) for r in per["b"]], weights=weights)
            res[f"{level}_{mode}_diff"] = d
    atomic_write_json(out / "ifeval_versus.json", res)
    for mode in ("strict", "loose"):
        d = res[f"prompt_{mode}_diff"]
        log.info("IFEval prompt-level %s: %s %.1f%% vs %s %.1f%%, difference %+.1f points [95%% CI %+.1f, %+.1f], "
                 "n=%d (paired bootstrap over prompts)", mode, Path(str(model_a)).name,
                 100 * res["a"][f"prompt_{mode}"], Path(str(model_b)).name, 100 * res["b"][f"prompt_{mode}"],
                 100 * d["diff"], 100 * d["ci_low"], 100 * d["ci_high"], d["n"])
    return res


def head_to_head(model_a: str, model_b: str, prompts: str, spec: EvalSpec) -> dict:
    """Win rate of ``model_a`` against ``model_b`` on a prompt set (references, when the data has them, go to the
    judge: the ``reference`` judge needs them)."""
    out, judge_spec, gen, seed = Path(spec.output), spec.judge, spec.generation, spec.seed
    out.mkdir(parents=True, exist_ok=True)
    records, _ = load_records(prompts, split=spec.split)
    records = records[:spec.limit] if spec.limit else records
    check_judge(judge_spec, "--judge")  # before either model answers
    items = [(r.id, r.prompt_text) for r in records]
    for m in (model_a, model_b):
        warn_if_trained_on(m, [p for _, p in items])
    a = generate_answers(model_a, items, gen, out, seed)
    b = generate_answers(model_b, items, gen, out, seed)
    refs = [r.reference for r in records]
    judge = make_judge(judge_spec, cache=str(out / "annotations-cache.jsonl"))
    prefs = prefer(judge, [r.prompt_text for r in records], [a[r.id] for r in records], [b[r.id] for r in records],
                   refs if all(refs) else None, [r.row() for r in records])
    w = win_rate(prefs)
    res = {"model_a": str(model_a), "model_b": str(model_b), "prompts": prompts, "judge": judge_spec,
           "win_rate": w["win_rate"], "ci_low": w["ci_low"], "ci_high": w["ci_high"], "n": w["n"],
           "failed": w["failed"],
           "length_a": sum(len(a[r.id].split()) for r in records) / max(1, len(records)),
           "length_b": sum(len(b[r.id].split()) for r in records) / max(1, len(records))}
    atomic_write_json(out / "head_to_head.json", res)
    log.info("%s vs %s on %s (judge: %s): %s", Path(model_a).name, Path(model_b).name, prompts, judge_spec,
             format_win_rate(w))
    return res
