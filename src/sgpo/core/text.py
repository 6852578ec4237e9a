"""Text measures shared by the pair gates, the improver targets and the figures (word level, whitespace-blind), and
the cut of a reference under a token budget."""
from __future__ import annotations

import re


def normalise(text: str) -> str:
    """Whitespace runs folded to one space, ends stripped: two texts equal after this are the same answer."""
    return re.sub(r"\s+", " ", text).strip()


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the word sequences of two texts."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a.split(), b.split())


_SENTENCE_END = (".", "!", "?", "。", ":", "\n")


def cut_reference(text: str, tokenizer, max_tokens: int) -> str:
    """Cut ``text`` at the last sentence boundary that fits in ``max_tokens`` tokens (whole text if it fits).

    Falls back to the last whole word under the limit when no sentence boundary fits.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text.strip()
    head = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    best = -1
    for i, ch in enumerate(head):
        if ch in _SENTENCE_END and (i + 1 == len(head) or head[i + 1].isspace()) and i > len(head) // 4:
            best = i
    if best >= 0:
        return head[:best + 1].strip()
    return head.rsplit(" ", 1)[0].strip() if " " in head else head.strip()
