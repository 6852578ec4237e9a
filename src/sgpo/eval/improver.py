"""Improver figures: does the improver role turn drafts into better answers? And ``sgpo improver-eval``.

Given drafts and their rewrites on held-out prompts (with references for the judge), report:
``improver/changed_rate``   rewrites that differ from the draft after whitespace normalisation
``improver/edit_distance``  mean word-level edit distance rewrite ↔ draft
``improver/win_rate``       the judge's preference for rewrite over draft (ties half; an unchanged rewrite is a tie)
                            + ``_ci_low/_ci_high/_n``
``improver/length_change``  mean (rewrite words - draft words) / draft words
``improver/win_rate_changed`` the win rate among rewrites that differ from their draft (+ CI, n)
``improver/win_rate_len20`` the win rate restricted to rewrites within ±20% of the draft's length (+ CI, n)

With ``judge=None`` only the judge-free figures are computed (changed rate, edit distance, length change).
A run measures them on its development prompts after every stage; ``sgpo improver-eval`` for any checkpoint, beside
a baseline (by default the zero-shot start model) on the same prompts with the same sampling seeds. Its generations
are cached under the output directory, keyed by everything that decides them, so a re-run regenerates nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sgpo.config import schema as config_mod
from sgpo.config.schema import Config
from sgpo.data.records import Record, load_records, split_dev
from sgpo.eval.base import prefer
from sgpo.eval.winrate import score_shares, win_rate
from sgpo.generation.engine import Generation
from sgpo.generation.rollout import Sampler, SamplerPart
from sgpo.core.files import atomic_write_json, content_hash, write_jsonl
from sgpo.core.text import normalise, word_edit_distance
from sgpo.models.templates import improver_instruction

log = logging.getLogger("sgpo")

FIGURES = [  # (key suffix, label, format)
    ("changed_rate", "rewrites that differ from the draft", "{:.0%}"),
    ("edit_distance", "mean edit distance (words)", "{:.1f}"),
    ("win_rate", "win rate of rewrite over draft", None),
    ("length_change", "mean length change", "{:+.0%}"),
    ("win_rate_len20", "win rate, rewrites within ±20% length", None),
]


def improver_figures(judge, prompts: Sequence[str], drafts: Sequence[str], rewrites: Sequence[str],
                     references: Sequence[str] | None, prefix: str = "improver/", rows: Sequence | None = None) -> dict:
    n = len(drafts)
    if n == 0:
        return {}
    changed = [normalise(a) != normalise(b) for a, b in zip(drafts, rewrites)]
    rel = [(len(w.split()) - len(d.split())) / max(1, len(d.split())) for d, w in zip(drafts, rewrites)]
    out = {
        f"{prefix}changed_rate": sum(changed) / n,
        f"{prefix}edit_distance": sum(word_edit_distance(d, w) for d, w in zip(drafts, rewrites)) / n,
        f"{prefix}length_change": sum(rel) / n,
    }
    if judge is None:
        return out
    if getattr(judge, "gives_scores", False):  # a program: how often the rewrite scores above its draft
        out.update(rewrite_scores(judge, prompts, drafts, rewrites, rows, prefix))
    # a rewrite that only changes whitespace is the draft: a tie, whatever the judge makes of it
    prefs = [0.5 if not c else p for c, p in zip(changed, prefer(judge, prompts, rewrites, drafts, references, rows))]
    out.update(win_rate_metrics(prefix + "win_rate", prefs))
    out.update(win_rate_metrics(prefix + "win_rate_changed", [p for p, c in zip(prefs, changed) if c]))
    out.update(win_rate_metrics(prefix + "win_rate_len20", [p for p, r in zip(prefs, rel) if abs(r) <= 0.2]))
    return out


def rewrite_scores(judge, prompts, drafts, rewrites, rows, prefix: str) -> dict:
    """``<prefix>score/rewrites/better``, ``_tie``, ``_worse``, ``_margin``, ``_n``: a scorer's rewrite against draft."""
    return score_shares(f"{prefix}score/rewrites/", judge.score(prompts, rewrites, rows),
                        judge.score(prompts, drafts, rows), ("better", "tie", "worse"))


def win_rate_metrics(name: str, prefs: list[float], weights: list[float] | None = None) -> dict:
    """``name`` and its ``_ci_low``, ``_ci_high``, ``_n`` (ties half, bootstrap CI over prompts; a weighted mean when
    ``weights`` are given, failed items left out of both)."""
    w = win_rate(prefs, weights=weights)
    return {name: w["win_rate"], f"{name}_ci_low": w["ci_low"], f"{name}_ci_high": w["ci_high"], f"{name}_n": w["n"]}


@dataclass
class Outputs:
    drafts: dict[str, Generation]
    rewrites: dict[str, Generation]


def draft_and_rewrite(sampler: SamplerPart, model, records: Sequence[Record], shard_dir: Path, *,
                      rewrite: int | None = None, samples: int = 1, prefix: str = "dev") -> Outputs:
    """Drafts (policy role, ``<prefix>-policy``) for ``records``, then the improver's rewrites (``<prefix>-improver``)
    of the first ``rewrite`` of them (all when None), seeded as round 0; shards ``<prefix>_policy.jsonl`` and
    ``<prefix>_improver.jsonl`` in ``shard_dir``. The one draft → rewrite path of the figures."""
    drafts = sampler.rollout(model, records, f"{prefix}-policy", 0, shard=Path(shard_dir) / f"{prefix}_policy.jsonl")
    imp = list(records[:rewrite] if rewrite is not None else records)
    texts = {r.id: drafts[r.id].text for r in imp}
    rewrites = sampler.rewrite(model, imp, texts, 0, role=f"{prefix}-improver", shard_dir=shard_dir,
                               samples=samples) if imp else {}
    return Outputs(drafts, rewrites)


def figures(judge, records: Sequence[Record], out: Outputs) -> dict:
    """The improver figures of ``out`` on ``records`` (which must all have been rewritten)."""
    return improver_figures(judge, [r.prompt_text for r in records], [out.drafts[r.id].text for r in records],
                            [out.rewrites[r.id].text for r in records], [r.reference for r in records],
                            rows=[r.row() for r in records])


# -- sgpo improver-eval ------------------------------------------------------------------------------------------
@dataclass
class ImproverEval:
    """What ``sgpo improver-eval`` was asked (its command-line options)."""
    model: str
    prompts: str
    judge: str = "reference"
    limit: int | None = None
    baseline: str | None = "start"
    """start (the config's start model: the zero-shot improver), a model name or path, or none."""
    config: str | None = None
    overrides: Sequence[str] = field(default_factory=list)
    output: str | Path = "improver_eval"
    dev_slice: bool = False
    rewrite_samples: int | None = None


def load_prompts(source: str, cfg: Config, tokenizer, *, dev_slice: bool = False,
                 limit: int | None = None) -> list[Record]:
    """Prompts with references, cut like the run's references (``data.max_reference_tokens``).
    ``dev_slice``: only the development slice a run holds out of ``source`` (``data.dev_size``, ``data.split_seed``)."""
    records, report = load_records(source, need="reference", **cfg.data.read_options())
    log.info("prompts: %s", report.summary())
    if dev_slice:
        _, records, *_ = split_dev(records, cfg.data.dev_size, cfg.data.split_seed, cfg.data.test_size)
    if limit:
        records = records[:limit]
    from sgpo.data.splits import cut_references

    return cut_references(records, tokenizer, cfg.data.max_reference_tokens)


def config_for(model: str, config_path: str | None, overrides: Sequence[str] = ()) -> Config:
    """The config whose improver instruction and generation settings apply: ``config_path``, else the config of the
    run a checkpoint ``RUN/<stage>/model`` belongs to, else the defaults."""
    if config_path is None:
        candidate = Path(model).parent.parent / "config.yaml"
        if Path(model).is_dir() and candidate.exists():
            log.info("using the config of the run the model belongs to: %s", candidate)
            config_path = str(candidate)
    return config_mod.load(config_path, list(overrides))


def evaluate_model(model_name: str, records: list[Record], cfg: Config, judge, out_dir: Path, *,
                   samples: int = 1, label: str = "model") -> dict:
    """Generate (or reuse cached) drafts and rewrites of ``model_name`` on ``records``; return its figures."""
    from sgpo.models.loading import load_model, load_tokenizer, resolve

    path = resolve(model_name)
    tokenizer = load_tokenizer(model_name, cfg.model.chat_template)
    sampler = Sampler(tokenizer, cfg.generation, cfg.seed, cfg.data.max_prompt_tokens,
                      improver_instruction(cfg.improver))
    key = content_hash({"model": str(Path(path).resolve()) if Path(path).exists() else path,
                        "prompts": [r.id for r in records], "settings": list(sampler.settings().__dict__.items()),
                        "instruction": sampler.instruction, "seed": cfg.seed,
                        "max_prompt_tokens": cfg.data.max_prompt_tokens})
    cache = Path(out_dir) / f"{label}-{key[:12]}"
    cache.mkdir(parents=True, exist_ok=True)
    model = load_model(model_name, device=cfg.model.device, dtype=cfg.model.dtype)
    outs = draft_and_rewrite(sampler, model, records, cache, samples=samples, prefix="eval")
    del model
    rows = [{"id": r.id, "prompt": r.prompt_text, "draft": outs.drafts[r.id].text,
             "rewrite": outs.rewrites[r.id].text, "reference": r.reference} for r in records]
    write_jsonl(cache / f"samples-r{samples}.jsonl", rows)
    f = figures(judge, records, outs)
    f["model"] = model_name
    f["samples"] = str(cache / f"samples-r{samples}.jsonl")
    atomic_write_json(cache / f"figures-r{samples}.json", f)
    return f


def run_improver_eval(spec: ImproverEval) -> dict:
    """Figures of ``spec.model``'s improver role on ``spec.prompts`` and, beside them, of ``spec.baseline``.
    Returns {"model": figures, "baseline": figures or None, "prompts": ..., "judge": ...}; writes figures.json/.md."""
    from sgpo.eval.judges import make_judge
    from sgpo.models.loading import load_tokenizer

    cfg = config_for(spec.model, spec.config, spec.overrides)
    samples = cfg.improver.experimental.rewrite_samples if spec.rewrite_samples is None else spec.rewrite_samples
    tokenizer = load_tokenizer(spec.model, cfg.model.chat_template)
    records = load_prompts(spec.prompts, cfg, tokenizer, dev_slice=spec.dev_slice, limit=spec.limit)
    judge = None if spec.judge in ("", "none") else make_judge(spec.judge)
    out_dir = Path(spec.output)
    res = {"prompts": spec.prompts + (" (development slice)" if spec.dev_slice else ""), "n": len(records),
           "judge": spec.judge or "none", "rewrite_samples": samples,
           "model": evaluate_model(spec.model, records, cfg, judge, out_dir, samples=samples, label="model")}
    base = cfg.model.name if spec.baseline == "start" else spec.baseline
    res["baseline"] = None
    if base and base != "none":
        res["baseline"] = evaluate_model(base, records, cfg, judge, out_dir, samples=samples, label="baseline")
    atomic_write_json(out_dir / "figures.json", res)
    (out_dir / "figures.md").write_text(format_table(res))
    return res


def _fmt_value(figs: dict | None, key: str, fmt: str | None) -> str:
    if not figs or f"improver/{key}" not in figs:
        return "–"
    v = figs[f"improver/{key}"]
    if fmt is not None:
        return fmt.format(v)
    n = figs.get(f"improver/{key}_n", 0)
    if not n:
        return "– (n=0)"
    return (f"{100 * v:.1f}% [{100 * figs[f'improver/{key}_ci_low']:.1f}–"
            f"{100 * figs[f'improver/{key}_ci_high']:.1f}], n={n}")


def format_table(res: dict) -> str:
    base = res.get("baseline")
    head = f"| figure | {res['model'].get('model', 'model')} |" + (f" {base.get('model')} (baseline) |" if base else "")
    lines = [f"Improver figures on {res['n']} prompts of {res['prompts']}, judge: {res['judge']}, "
             f"rewrite samples: {res['rewrite_samples']} (win rates: ties half, 95% bootstrap CI, n prompts)", "",
             head, "|---|---|" + ("---|" if base else "")]
    for key, label, fmt in FIGURES:
        row = f"| {label} | {_fmt_value(res['model'], key, fmt)} |"
        if base:
            row += f" {_fmt_value(base, key, fmt)} |"
        lines.append(row)
    return "\n".join(lines) + "\n"
