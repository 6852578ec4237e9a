"""Judge specs, ``KIND[:ARG]`` (``eval.judge``, ``--judge``): read and checked from the text alone, without building
the judge or importing it. The kinds are ``registry.JUDGES``."""
from __future__ import annotations

from sgpo.core.registry import JUDGES

NO_ARGUMENT = ("reference", "ifeval", "ifeval-loose")
"""Judge kinds that need no model or argument."""
SCORERS = ("ifeval", "ifeval-loose", "python")
"""Judge kinds that are programs scoring each response (``eval.base.Scorer``)."""


def is_scorer(spec: str) -> bool:
    """Whether the judge of ``spec`` is a scorer (known from the spec, without building the judge)."""
    return bool(spec) and parse_judge_spec(spec)[0] in SCORERS


def parse_judge_spec(spec: str) -> tuple[str, str, dict]:
    """``KIND[:ARG]`` → (kind, arg, options): ``lm-SCORE:PATH`` is kind ``lm`` with ``score=SCORE``. An unknown kind,
    or a kind other than ``reference`` without its model, is a ``ValueError`` naming the spec."""
    kind, _, arg = spec.partition(":")
    options = {}
    if kind.startswith("lm-"):
        kind, options = "lm", {"score": kind[3:]}
    if kind not in JUDGES:
        raise ValueError(f"unknown judge '{kind}' (known: {', '.join(JUDGES.names())}) in '{spec}'; a judge is "
                         "reference, openai:MODEL[@BASE_URL], hf:PATH, reward:PATH, lm[-SCORE]:PATH, "
                         "ifeval[-loose] or python:MODULE:FUNCTION")
    if not arg and kind not in NO_ARGUMENT:
        raise ValueError(f"judge '{spec}' needs " + ("a module and a function: python:MODULE:FUNCTION"
                                                      if kind == "python" else f"a model: {kind}:MODEL"))
    return kind, arg, options
