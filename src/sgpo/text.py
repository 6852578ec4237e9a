"""Text measures shared by the pair gates, the improver targets and the figures (word level, whitespace-blind)."""
from __future__ import annotations

import re


def normalise(text: str) -> str:
    """Whitespace runs folded to one space, ends stripped: two texts equal after this are the same answer."""
    return re.sub(r"\s+", " ", text).strip()


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the word sequences of two texts."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a.split(), b.split())
