"""The judge interface every judge implements (``eval.judges`` builds them from spec strings)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence


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
