"""The judge interface every judge implements (``eval.judges`` builds them from spec strings)."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Mapping, Protocol, Sequence


class JudgeError(RuntimeError):
    """A judge cannot give its verdicts (a server refused, a scorer failed, a row lacks what the judge reads); the
    message names the judge and what to do."""


class Judge(ABC):
    """Says, per prompt, how much it prefers candidate A over B.

    ``name`` labels its figures; ``spec`` is the spec string it was built from (set by ``make_judge``); ``cache_id``,
    when set, is what distinguishes its annotations in a cache (else ``spec``, else ``name``); ``template_name`` is
    its prompt template, for judges that have one; ``gives_verdicts`` says whether ``verdicts`` works.
    """

    name: str = ""
    spec: str = ""
    cache_id: str = ""
    template_name: str | None = None
    gives_verdicts: bool = False
    reads_rows: bool = False
    gives_scores: bool = False
    reads_reference: bool = False

    @abstractmethod
    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
               references: Sequence[str] | None = None) -> list[float]:
        """One float per item in [0, 1]: 1 = A better, 0 = B better, 0.5 = tie, NaN = failed annotation.
        ``references`` may be ``None`` for judges that do not need one."""

    def verdicts(self, questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
                 references: Sequence[str] | None = None) -> list[str | None]:
        """Arena-Hard labels (``A>>B`` ... ``B>>A``, ``None`` when failed) per game, for judges that give them."""
        raise NotImplementedError(f"judge '{self.spec or self.name}' gives no Arena-Hard verdicts")

    def stats(self) -> dict:
        """Counters of the judge's work so far (requests, failures, cache hits...); none by default."""
        return {}

    def close(self) -> None:
        """Free what the judge holds (its model); it cannot judge afterwards. Nothing to free by default."""


class Scorer(Judge):
    """A judge that is a program: it gives each response a number (larger better) from the response and its row, and
    prefers the response that scores higher (equal scores tie). ``score`` may return NaN for a failed item."""

    reads_rows = True
    gives_scores = True

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[Mapping]) -> list[float]:
        """One number per response, larger better."""

    def prefer(self, prompts, a, b, references=None, rows=None) -> list[float]:
        rows = needs_rows(self, rows, len(prompts))
        return compare_scores(self.score(prompts, a, rows), self.score(prompts, b, rows))


class JudgePart(Protocol):
    """What a run asks of the judges its evaluator makes (``Evaluator.make_judge``): the real ones are wrappers,
    ``eval.cache.CachedJudge`` and, under a launcher, ``eval.judges.MainProcessJudge``; the dry run's
    ``CountingJudge`` stands in for them (``tests/run/test_protocols.py`` holds all three, and ``Scorer``, to it).

    ``Judge`` above is the base class of every judge kind, and ``CountingJudge`` subclasses it too, but it is not this
    interface: a pairwise kind's ``prefer`` takes no ``rows`` and has no ``score``. The run asks ``prefer`` through
    ``prefer`` below (``rows`` only when ``reads_rows``) and ``score`` only when ``gives_scores``; ``close`` after a
    one-use judge; the flags as ``Judge`` documents them."""

    name: str
    spec: str
    reads_rows: bool
    gives_scores: bool
    reads_reference: bool

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
               references: Sequence[str] | None = None, rows: Sequence[Mapping] | None = None) -> list[float]: ...

    def score(self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[Mapping]) -> list[float]: ...

    def close(self) -> None: ...


def compare_scores(sa: Sequence[float], sb: Sequence[float]) -> list[float]:
    """Preferences from scores: 1 when A scores higher, 0 when lower, 0.5 when equal, NaN when either failed."""
    return [math.nan if (x != x or y != y) else 1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(sa, sb)]


def needs_rows(judge: Judge, rows: Sequence[Mapping] | None, n: int) -> Sequence[Mapping]:
    """``rows`` checked for a judge that reads them: one per item."""
    if rows is None or len(rows) != n:
        raise JudgeError(f"judge '{judge.spec or judge.name}' reads each prompt's row (its fields and reference) and "
                         f"was given {'none' if rows is None else len(rows)} for {n} prompts")
    return rows


def traits(judge) -> tuple[bool, bool, bool]:
    """(``reads_rows``, ``gives_scores``, ``reads_reference``) of any judge-like object (False where not set)."""
    return tuple(bool(getattr(judge, k, False)) for k in ("reads_rows", "gives_scores", "reads_reference"))


def prefer(judge: Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
           references: Sequence[str] | None = None, rows: Sequence[Mapping] | None = None) -> list[float]:
    """``judge.prefer``, given ``rows`` only when the judge reads them (the other judges take four arguments)."""
    if getattr(judge, "reads_rows", False):
        return judge.prefer(prompts, a, b, references, rows=rows)
    return judge.prefer(prompts, a, b, references)
