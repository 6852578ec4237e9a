"""``sgpo improver-eval``: how good is a model's improver role on held-out prompts?

For every prompt the model drafts an answer in the policy role, then rewrites that draft in the improver role; the
figures of ``sgpo.eval.improver`` compare rewrite and draft (changed rate, edit distance, judge win rate with CI,
length change, length-controlled win rate). The same figures for a baseline model (by default the zero-shot start
model, before any improver training) are computed on the same prompts with the same sampling seeds, side by side.

Generations are cached under the output directory, keyed by everything that decides them (model, prompts, settings,
instruction, seed), so re-running, or evaluating another model against the same baseline, regenerates nothing that
is already there.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import config as config_mod
from .config import Config
from .data import Record, cut_reference, load_records, split_dev
from .eval.improver import improver_figures
from .generation import Generation, Settings
from .pairs import normalise
from .rollout import rollout
from .runs import atomic_write_json, content_hash, read_jsonl, write_jsonl

log = logging.getLogger("sgpo")

FIGURES = [  # (key suffix, label, format)
    ("changed_rate", "rewrites that differ from the draft", "{:.0%}"),
    ("edit_distance", "mean edit distance (words)", "{:.1f}"),
    ("win_rate", "win rate of rewrite over draft", None),
    ("length_change", "mean length change", "{:+.0%}"),
    ("win_rate_len20", "win rate, rewrites within ±20% length", None),
]


@dataclass
class ImproverOutputs:
    drafts: dict[str, Generation]
    rewrites: dict[str, Generation]


def improve(model, tokenizer, records: Sequence[Record], settings: Settings, *, instruction: str, seed: int,
            rewrite_samples: int = 1, cache_dir: Path | None = None, round_: int = 0,
            max_prompt_tokens: int | None = None) -> ImproverOutputs:
    """Draft (policy role), then rewrite each draft (improver role).

    With ``rewrite_samples`` > 1, a rewrite equal to its draft (after whitespace normalisation) is sampled again, up
    to that many times in all, and the first that differs is kept. No judge is involved in the choice.
    """
    def shard(name):
        return None if cache_dir is None else Path(cache_dir) / f"{name}.jsonl"

    drafts = rollout(model, tokenizer, records, "eval-policy", settings, run_seed=seed, round_=round_,
                     shard=shard("drafts"), max_prompt_tokens=max_prompt_tokens, desc="drafts")
    texts = {i: g.text for i, g in drafts.items()}
    rewrites = rollout(model, tokenizer, records, "eval-improver", settings, run_seed=seed, round_=round_,
                       drafts=texts, instruction=instruction, shard=shard("rewrites"),
                       max_prompt_tokens=max_prompt_tokens, desc="rewrites")
    rewrites = resample_copies(model, tokenizer, records, texts, rewrites, settings, instruction=instruction,
                               seed=seed, samples=rewrite_samples, round_=round_, shard=shard,
                               max_prompt_tokens=max_prompt_tokens)
    return ImproverOutputs(drafts, rewrites)


def resample_copies(model, tokenizer, records, drafts: dict[str, str], rewrites: dict[str, Generation],
                    settings: Settings, *, instruction, seed: int, samples: int, round_: int, shard=None,
                    max_prompt_tokens=None, role: str = "eval-improver") -> dict[str, Generation]:
    """Sample again the rewrites that copy their draft (``samples`` tries in all); keep the first that differs."""
    rewrites = dict(rewrites)
    for k in range(1, samples):
        same = [r for r in records if normalise(rewrites[r.id].text) == normalise(drafts[r.id])]
        if not same:
            break
        more = rollout(model, tokenizer, same, f"{role}{k}", settings, run_seed=seed, round_=round_,
                       drafts=drafts, instruction=instruction,
                       shard=shard(f"rewrites{k}") if shard else None, max_prompt_tokens=max_prompt_tokens,
                       desc=f"rewrites, try {k + 1}")
        for r in same:
            if normalise(more[r.id].text) != normalise(drafts[r.id]):
                rewrites[r.id] = more[r.id]
    return rewrites


def figures(judge, records: Sequence[Record], out: ImproverOutputs) -> dict:
    """The improver figures (``sgpo.eval.improver``) of drafts and rewrites; judge-free ones when ``judge`` is None."""
    prompts = [r.prompt_text for r in records]
    drafts = [out.drafts[r.id].text for r in records]
    rewrites = [out.rewrites[r.id].text for r in records]
    refs = [r.reference for r in records]
    return improver_figures(judge, prompts, drafts, rewrites, refs)


def load_prompts(source: str, cfg: Config, tokenizer, *, dev_slice: bool = False, limit: int | None = None,
                 split: str = "train") -> list[Record]:
    """Prompts with references, cut like the run's references (``data.max_reference_tokens``).

    ``dev_slice``: only the fixed development slice of ``source`` (the prompts a run holds out: ``data.dev_size``,
    ``data.split_seed``), in the run's order.
    """
    records, report = load_records(source, split=split, on_error=cfg.data.on_error, need="reference")
    log.info("prompts: %s", report.summary())
    if dev_slice:
        _, records = split_dev(records, cfg.data.dev_size, cfg.data.split_seed)
    if limit:
        records = records[:limit]
    return [Record(r.id, r.prompt, cut_reference(r.reference, tokenizer, cfg.data.max_reference_tokens))
            for r in records]


def config_for(model: str, config_path: str | None, overrides: Sequence[str] = ()) -> Config:
    """The config whose improver instruction and generation settings apply: ``config_path``, else the config of the
    run a checkpoint ``RUN/<stage>/model`` belongs to, else the defaults."""
    if config_path is None:
        candidate = Path(model).parent.parent / "config.yaml"
        if Path(model).is_dir() and candidate.exists():
            log.info("using the config of the run the model belongs to: %s", candidate)
            config_path = str(candidate)
    cfg = config_mod.load(config_path, list(overrides))
    return cfg


def evaluate_model(model_name: str, records: list[Record], cfg: Config, judge, out_dir: Path, *,
                   rewrite_samples: int = 1, label: str = "model") -> dict:
    """Generate (or reuse cached) drafts and rewrites of ``model_name`` on ``records``; return its figures."""
    from .models import load_model, load_tokenizer, resolve

    g = cfg.generation
    settings = Settings(g.max_new_tokens, g.temperature, g.top_p, g.batch_size)
    path = resolve(model_name)
    key = content_hash({"model": str(Path(path).resolve()) if Path(path).exists() else path,
                        "prompts": [r.id for r in records], "settings": list(settings.__dict__.items()),
                        "instruction": cfg.improver.instruction, "seed": cfg.seed,
                        "max_prompt_tokens": cfg.data.max_prompt_tokens})
    cache = Path(out_dir) / f"{label}-{key[:12]}"
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, device=cfg.model.device, dtype=cfg.model.dtype)
    outs = improve(model, tokenizer, records, settings, instruction=cfg.improver.instruction, seed=cfg.seed,
                   rewrite_samples=rewrite_samples, cache_dir=cache, max_prompt_tokens=cfg.data.max_prompt_tokens)
    del model
    rows = [{"id": r.id, "prompt": r.prompt_text, "draft": outs.drafts[r.id].text,
             "rewrite": outs.rewrites[r.id].text, "reference": r.reference} for r in records]
    write_jsonl(cache / f"samples-r{rewrite_samples}.jsonl", rows)
    f = figures(judge, records, outs)
    f["model"] = model_name
    f["samples"] = str(cache / f"samples-r{rewrite_samples}.jsonl")
    atomic_write_json(cache / f"figures-r{rewrite_samples}.json", f)
    return f


def run_improver_eval(model: str, prompts: str, *, judge_spec: str = "reference", limit: int | None = None,
                      baseline: str | None = "start", config_path: str | None = None, overrides: Sequence[str] = (),
                      output: str | Path = "improver_eval", dev_slice: bool = False,
                      rewrite_samples: int | None = None) -> dict:
    """Figures of ``model``'s improver role on ``prompts`` and, beside them, of ``baseline``.

    ``baseline``: ``start`` (the config's start model, ``model.name``: the zero-shot improver), a model name or
    path, or ``none``. Returns {"model": figures, "baseline": figures or None, "prompts": ..., "judge": ...}.
    """
    from .eval.judges import make_judge
    from .models import load_tokenizer

    cfg = config_for(model, config_path, overrides)
    samples = cfg.improver.rewrite_samples if rewrite_samples is None else rewrite_samples
    tokenizer = load_tokenizer(model)
    records = load_prompts(prompts, cfg, tokenizer, dev_slice=dev_slice, limit=limit)
    judge = None if judge_spec in ("", "none") else make_judge(judge_spec)
    out_dir = Path(output)
    res = {"prompts": prompts + (" (development slice)" if dev_slice else ""), "n": len(records),
           "judge": judge_spec or "none", "rewrite_samples": samples,
           "model": evaluate_model(model, records, cfg, judge, out_dir, rewrite_samples=samples, label="model")}
    base = cfg.model.name if baseline == "start" else baseline
    res["baseline"] = None
    if base and base != "none":
        res["baseline"] = evaluate_model(base, records, cfg, judge, out_dir, rewrite_samples=samples,
                                         label="baseline")
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
