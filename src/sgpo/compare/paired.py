"""The comparison's paired figures: per seed, SGPO's per-prompt test verdicts against the start model minus each other
method's, over the same test prompts and the same start answers.

Two methods' win rates vs start each carry a CI of about ±7 points at n=200, and two overlapping CIs say little about
the difference between them. Because every run of one seed answers the same prompts against the same start answers,
the difference can be bootstrapped over prompts with both methods' verdicts moving together, which is narrower and is
the figure that says whether one method beats another. The verdicts come from the judgement cache the runs filled (the
same judge on the same texts), so nothing is generated and, normally, nothing is judged again.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from sgpo.eval.base import prefer

log = logging.getLogger("sgpo")


def run_dir_of(out: Path, method: str, seed: int) -> Path:
    """The run directory of (method, seed) in a comparison's output directory."""
    return Path(out) / method / f"seed_{seed}"


def verdicts(judge, test, texts: dict[str, dict[str, str]]) -> list[float]:
    """The judge's per-prompt preference for the run's final answer over the start model's (1 win, 0.5 tie)."""
    return prefer(judge, [r.prompt_text for r in test], [texts["final"][r.id] for r in test],
                  [texts["start"][r.id] for r in test], [r.reference for r in test], [r.row() for r in test])


def paired_rows(target: str, runs: list[tuple[str, int]]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """(target run, other run) for every other finished run that has a target run of the same seed."""
    return [((target, s), (m, s)) for m, s in runs if m != target and (target, s) in runs]


def paired_figures(out, runs: list[tuple[str, int]], cfg, test_judges: list[str] = (), target: str = "sgpo") -> dict:
    """``{"<method>@<seed>": {judge name: {diff, ci_low, ci_high, n}}}``: ``target``'s win rate vs start minus the
    method's, paired over the test prompts (``runs``: the finished runs), under the run's judges and ``test_judges``;
    for a scorer judge also ``"<name> score"``: ``target``'s final score minus the method's final score, paired over
    the same prompts, and ``"<name> all met"`` (the share scored 1: prompt-level for ``ifeval``) and, on rows with
    verifiable constraints, ``"<name> constraints"`` (weighted by each row's number: constraint-level)."""
    from sgpo.eval.judges import judge_for_one_use
    from sgpo.eval.held_out import constraint_counts, judge_name, saved_answers
    from sgpo.core.judge_spec import is_scorer

    rows = paired_rows(target, runs)
    if not rows:
        return {}
    test = test_records(cfg)
    texts = {r: saved_answers(run_dir_of(out, *r) / "test") for row in rows for r in row}
    rows = [(a, b) for a, b in rows if _same_start(texts[a], texts[b], a, b)]
    figures: dict = {}
    weights = constraint_counts([r.row() for r in test])
    for spec in dict.fromkeys(s for s in (cfg.eval.judge, cfg.eval.second_judge, *test_judges) if s):
        with judge_for_one_use(spec) as judge:
            seen = {r: verdicts(judge, test, texts[r]) for row in rows for r in row}  # each run judged once
            stats = judge.stats()
            log.info("compare: paired figures under %s (%d verdicts from the cache, %d judged now)", spec,
                     stats.get("hits", 0), stats.get("misses", 0))
            scores = {r: final_scores(judge, test, texts[r]) for row in rows for r in row} if is_scorer(spec) else {}
        for a, b in rows:
            row = figures.setdefault(f"{b[0]}@{b[1]}", {})
            row[judge_name(spec)] = _paired(seen[a], seen[b])
            if scores:  # the final models' own scores, paired: the direct comparison a program can make
                row.update(score_differences(judge_name(spec), scores[a], scores[b], weights))
    return figures


def score_differences(name: str, a: list[float], b: list[float], weights: list[int] | None) -> dict:
    """A scorer's paired differences of two runs' final scores: mean score, share scored 1 and, with ``weights``
    (each row's constraints), the weighted mean."""
    out = {name + " score": _paired(a, b),
           name + " all met": _paired([float(x >= 1.0) for x in a], [float(x >= 1.0) for x in b])}
    if weights:
        out[name + " constraints"] = _paired(a, b, weights)
    return out


def test_records(cfg) -> list:
    """The test split of ``cfg`` (the same for every run of a comparison)."""
    from sgpo.data.splits import prepare_splits
    from sgpo.models.loading import load_tokenizer, resolve

    return prepare_splits(cfg, load_tokenizer(resolve(cfg.model.name), cfg.model.chat_template)).test


def final_scores(judge, test, texts: dict[str, dict[str, str]]) -> list[float]:
    """A scorer judge's per-prompt score of the run's final answers."""
    return judge.score([r.prompt_text for r in test], [texts["final"][r.id] for r in test], [r.row() for r in test])


def _paired(a: list[float], b: list[float], weights: list[int] | None = None) -> dict:
    """``paired_difference`` over the prompts where both values are known (weighted by ``weights`` when given)."""
    from sgpo.eval.winrate import paired_difference

    keep = [i for i, (x, y) in enumerate(zip(a, b)) if not (math.isnan(x) or math.isnan(y))]
    return paired_difference([a[i] for i in keep], [b[i] for i in keep],
                             weights=[weights[i] for i in keep] if weights else None)


def _same_start(x: dict, y: dict, a, b) -> bool:
    if x.get("start") == y.get("start") and "final" in x and "final" in y:
        return True
    log.warning("compare: %s@%d and %s@%d do not share their start answers (or lack final ones): not paired",
                *a, *b)
    return False


SCORER_KEYS = (" score", " all met", " constraints")


def paired_lines(paired: dict, target: str, judges: list[str]) -> list[str]:
    """comparison.md's lines: per other run, the difference under each judge in points with its CI."""
    from sgpo.eval.winrate import format_difference

    lines = []
    for key, by_judge in paired.items():
        found = [(j, by_judge[j]) for j in (x for name in judges for x in (name, *(name + k for k in SCORER_KEYS)))
                 if by_judge.get(j, {}).get("n")]
        if found:
            m, s = key.split("@")
            cells = [f"{j} {format_difference(d)}" for j, d in found]
            lines.append(f"- {target} − {m}, seed {s}: " + "; ".join(cells) + f" (n={found[0][1]['n']})")
    return lines
