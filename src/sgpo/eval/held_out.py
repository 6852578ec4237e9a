"""The reported figures: the start, pre-rounds and final models answer the test prompts, and each judge compares them.

``eval/test/<judge>/win_rate_vs_start``       final against the start model
``eval/test/<judge>/win_rate_vs_pre_rounds``  final against the pre-rounds model, the one entering round 1 (after
                                              SFT and, for SGPO, improver training): what the rounds taught
each with ``_ci_low``, ``_ci_high``, ``_n`` (ties half, bootstrap over prompts) and a length-controlled variant
``..._length_matched`` (only answer pairs within ±20% of each other's length in words), plus every model's mean
length and finished rate (``eval/test/length_<model>``, ``eval/test/finished_<model>``).

All three models sample with the same per-prompt seeds (role ``test``), so their answers differ by the model only.
The start and pre-rounds models' answers are cached by the hash of their weights and the sampling settings
(``<cache>/answers``), so a rerun or another method reuses them; a judge's verdicts are cached by content
(``<cache>/judgements``).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from sgpo.data.records import Record
from sgpo.eval.base import prefer
from sgpo.core.files import content_hash, read_jsonl
from sgpo.generation.engine import Generation
from sgpo.eval.improver import win_rate_metrics

LENGTH_MATCH = 0.2   # answers within ±20% of each other's length (words) count as length-matched


def model_hash(path: str | Path) -> str:
    """sha256 of a model directory's weights and config (what decides its outputs); a hub name that is not a local
    directory is keyed by the name itself."""
    h = hashlib.sha256()
    if not Path(path).is_dir():
        h.update(str(path).encode())
        return h.hexdigest()
    files = sorted(p for p in Path(path).iterdir()
                   if p.suffix in (".safetensors", ".bin") or p.name in ("config.json", "generation_config.json"))
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def answer_key(model_path: str, sampler, max_prompt_tokens: int, records: list[Record]) -> str:
    """The answer cache's key: the model's hash and everything that shapes its samples (``Sampler.identity``)."""
    return content_hash([model_hash(model_path), *sampler.identity(), max_prompt_tokens, [r.id for r in records]])


def saved_answers(folder: Path) -> dict[str, dict[str, str]]:
    """The answers a ``test`` stage saved: {model label: {record id: text}}."""
    out = {}
    for path in sorted(folder.glob("answers_*.jsonl")):
        out[path.stem[len("answers_"):]] = {r["id"]: r["text"] for r in read_jsonl(path)}
    return out


def length_matched(a: str, b: str) -> bool:
    la, lb = len(a.split()), len(b.split())
    return abs(la - lb) <= LENGTH_MATCH * max(la, lb, 1)


def judge_name(spec: str) -> str:
    """The ``<judge>`` part of a metric name: the spec's kind, or kind and model (``lm:gemma-3-270m``)."""
    kind, _, arg = spec.partition(":")
    arg = arg.rsplit("/", 1)[-1].replace("sgpo:", "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{kind}_{arg}" if arg else kind)


def versus(judge, name: str, records: list[Record], texts: dict[str, dict[str, str]]) -> dict:
    """The final model against the start and pre-rounds models under one judge (``texts``: label → id → text)."""
    m = {}
    prompts, refs, rows = [r.prompt_text for r in records], [r.reference for r in records], [r.row() for r in records]
    final = [texts["final"][r.id] for r in records]
    for other in ("start", "pre_rounds"):
        if other not in texts:
            continue
        b = [texts[other][r.id] for r in records]
        prefs = prefer(judge, prompts, final, b, refs, rows)
        key = f"eval/test/{name}/win_rate_vs_{other}"
        m.update(win_rate_metrics(key, [p for p in prefs if p == p]))
        m.update(win_rate_metrics(key + "_length_matched",
                                  [p for p, x, y in zip(prefs, final, b) if p == p and length_matched(x, y)]))
    if getattr(judge, "gives_scores", False):
        m.update(scores(judge, name, records, texts))
    return m


def scores(judge, name: str, records: list[Record], texts: dict[str, dict[str, str]]) -> dict:
    """A scorer's mean score of every model's test answers, ``eval/test/<judge>/score_<model>``, and the share that
    scores full marks (1: every constraint met, for ``ifeval``: prompt-level accuracy), ``.../perfect_<model>``; on
    rows with verifiable constraints also the score weighted by each row's number of them (for ``ifeval``: the share
    of all constraints met, constraint-level accuracy), ``.../constraints_<model>``; each with its 95% bootstrap CI
    and n."""
    prompts, rows = [r.prompt_text for r in records], [r.row() for r in records]
    weights = constraint_counts(rows)
    m = {}
    for label, answers in texts.items():
        got = judge.score(prompts, [answers[r.id] for r in records], rows)
        m.update(win_rate_metrics(f"eval/test/{name}/score_{label}", [x for x in got if x == x]))
        m.update(win_rate_metrics(f"eval/test/{name}/perfect_{label}", [float(x >= 1.0) for x in got if x == x]))
        if weights:
            m.update(win_rate_metrics(f"eval/test/{name}/constraints_{label}", got, weights))
    return m


def constraint_counts(rows: list[dict]) -> list[int] | None:
    """Each row's number of verifiable constraints (``instruction_id_list``), or None when a row has none."""
    counts = [len(r.get("instruction_id_list") or []) for r in rows]
    return counts if counts and all(counts) else None


def summary_line(m: dict, name: str) -> str:
    """One log line: final against start and pre-rounds under one judge, with and without length matching."""
    from sgpo.eval.winrate import format_metric

    parts = []
    for other in ("start", "pre_rounds"):
        for suffix, label in (("", ""), ("_length_matched", " (length-matched)")):
            key = f"eval/test/{name}/win_rate_vs_{other}{suffix}"
            if key in m:
                parts.append(f"final vs {other.replace('_', '-')}{label} {format_metric(m, key)}")
    for label in ("start", "pre_rounds", "final"):
        key = f"eval/test/{name}/score_{label}"
        if key in m:
            parts.append(f"mean score of {label.replace('_', '-')} {m[key]:.3f} "
                         f"[{m[key + '_ci_low']:.3f}–{m[key + '_ci_high']:.3f}, n={m[key + '_n']}]")
    return f"judge {name}: " + "; ".join(parts)


def answer_figures(gens: dict[str, dict[str, Generation]]) -> dict:
    """Mean length (words) and finished rate of every model's test answers."""
    m = {}
    for label, g in gens.items():
        n = max(1, len(g))
        m[f"eval/test/length_{label}"] = sum(len(x.text.split()) for x in g.values()) / n
        m[f"eval/test/finished_{label}"] = sum(x.finished for x in g.values()) / n
    return m
