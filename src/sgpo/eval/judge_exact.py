"""Judges that are programs (``Scorer``s): a response gets a number from the response and its row, larger better.

``ifeval`` / ``ifeval-loose``  the share of the row's verifiable instructions (``instruction_id_list``, ``kwargs``:
                               IFEval's format) that IFEval's official checkers accept, strictly or loosely
                               (``eval/ifeval.py``); a row without instructions is an error that says so.
``python:MODULE:FUNCTION``     a user's function ``FUNCTION(prompt, response, row) -> number``, imported from the
                               current directory or ``PYTHONPATH``; its verdicts are cached under a key that changes
                               when the function's source does.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import numbers
import os
import sys
from typing import Mapping, Sequence

from sgpo.eval.base import JudgeError, Scorer


class IFEvalJudge(Scorer):
    """The share of a row's verifiable instructions its response follows, by IFEval's own checkers."""

    def __init__(self, arg: str = "", loose: bool = False):
        if arg:
            raise ValueError(f"judge 'ifeval' takes no argument (got 'ifeval:{arg}'); use ifeval or ifeval-loose")
        from sgpo.eval.ifeval import ifeval_module

        self.loose = loose
        self.name = "ifeval-loose" if loose else "ifeval"
        self.ifeval = ifeval_module()

    def score(self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[Mapping]) -> list[float]:
        return [sum(f) / len(f) for f in self.followed(prompts, responses, rows)]

    def followed(self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[Mapping]
                 ) -> list[list[bool]]:
        """Per response, which of its row's instructions it follows."""
        from sgpo.eval.ifeval import followed

        out = []
        for i, (prompt, response, row) in enumerate(zip(prompts, responses, rows)):
            ids = row.get("instruction_id_list") if isinstance(row, Mapping) else None
            if not ids or len(row.get("kwargs") or []) != len(ids):
                raise JudgeError(f"judge '{self.name}': the row of prompt {i + 1} ({prompt[:60]!r}) has no verifiable "
                                 "instructions (fields instruction_id_list and kwargs, IFEval's format): use it on "
                                 "data that has them, such as sgpo:verifiable-instructions or IFEval's prompts")
            result = followed(self.ifeval, {**row, "prompt": row.get("prompt") or prompt}, response)
            out.append(result.loose if self.loose else result.strict)
        return out


def ifeval_loose(arg: str = "") -> IFEvalJudge:
    """``ifeval-loose``: IFEval's loose rule (a response also counts after dropping its first/last line or markup)."""
    return IFEvalJudge(arg, loose=True)


class PythonScorer(Scorer):
    """``python:MODULE:FUNCTION``: ``FUNCTION(prompt, response, row)`` returns a number, larger better. ``row`` holds
    the record's fields, its request (``prompt``) and its ``reference``."""

    def __init__(self, arg: str):
        module, _, function = arg.rpartition(":")
        if not module or not function:
            raise ValueError(f"judge 'python:{arg}' needs a module and a function: python:MODULE:FUNCTION")
        self.fn = _import(module, function, arg)
        self.name = f"python:{arg}"
        self.cache_id = f"python:{arg}@{_source_hash(self.fn)}"

    def score(self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[Mapping]) -> list[float]:
        out = []
        for i, (prompt, response, row) in enumerate(zip(prompts, responses, rows)):
            try:
                v = self.fn(prompt, response, dict(row))
            except Exception as e:
                raise JudgeError(f"judge '{self.name}' failed on row {i + 1} ({prompt[:60]!r}): "
                                 f"{type(e).__name__}: {e}") from e
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(float(v)):
                raise JudgeError(f"judge '{self.name}' returned {v!r} ({type(v).__name__}) for row {i + 1} "
                                 f"({prompt[:60]!r}); a scorer returns a number, larger better")
            out.append(float(v))
        return out


def _import(module: str, function: str, arg: str):
    """``module.function``, looked for in the current directory first, then on ``PYTHONPATH``/``sys.path``."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise ValueError(f"judge 'python:{arg}': module '{module}' not found (looked in the current directory "
                             "and on PYTHONPATH)") from None
        raise ValueError(f"judge 'python:{arg}': importing module '{module}' failed: {e}") from None
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise ValueError(f"judge 'python:{arg}': module '{module}' ({getattr(mod, '__file__', '?')}) has no function "
                         f"'{function}'")
    return fn


def _source_hash(fn) -> str:
    """A hash of the function's source (its module's whole file when the source cannot be read alone): cached
    verdicts of an edited scorer are not reused."""
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        path = inspect.getsourcefile(fn) if inspect.isfunction(fn) else None
        text = open(path, encoding="utf-8").read() if path and os.path.exists(path) else repr(fn)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
