"""Pair gates: the checks a (chosen, rejected) pair must pass before DPO trains on it.

Each gate has a name, counted as ``pairs/dropped/<name>``; a pair is dropped for the first gate it fails, in this order:

``empty_chosen`` / ``empty_rejected``  a side with no text
``equal``                    the two sides are the same answer (after whitespace normalisation)
``template_leak``            a side repeats the improver instruction's own text: one of its headings or labels at the
                             start of a line ("### Draft response", "Request:"), or one of its sentences. The markers
                             are derived from the configured ``improver.instruction``, so a new template is covered.
``chosen_unfinished``        the chosen side was cut off by the length limit (``pairs.require_finished``: always, or
                             only where the rejected side finished — else DPO learns "stop mid-sentence is better")
``rejected_unfinished``      the rejected side was cut off (``pairs.require_finished: both``)
``repetition``               the chosen side loops (a large share of repeated word 4-grams, or a line said 3+ times)
``prompt_echo``              the chosen side mostly repeats the request where neither the rejected side nor the SFT
                             reference does (an embedding judge rewards that; it teaches nothing). A reference that
                             restates the request is the target's style, so a chosen side that copies it is kept
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher

from sgpo.core.text import normalise

_PLACEHOLDER = re.compile(r"\{(prompt|draft|reference)\}")
_WORD = re.compile(r"\w+", re.UNICODE)
LABEL_WORDS = 4          # an instruction line of at most this many words (or a '#' heading) is a label
SENTENCE_WORDS = 5       # an instruction sentence of at least this many words is a marker phrase
REPEAT_SHARE = 0.3       # repetition: more than this share of the word 4-grams are repeats ...
REPEAT_MIN_WORDS = 12    # ... in a text of at least this many words
ECHO_SHARE = 0.8         # prompt_echo: a run of at least this share of the request's words, copied in order
ECHO_MIN_WORDS = 6       # ... and at least this many words (short requests are restated naturally)
FINISHED = ("none", "chosen_if_rejected", "chosen", "both")


@dataclass(frozen=True)
class TemplateMarkers:
    """What of an improver instruction a response must not repeat."""
    labels: tuple[str, ...]      # lowercase label texts ("request", "draft response")
    phrases: tuple[str, ...]     # lowercase normalised sentences of the instruction's prose

    @classmethod
    def of(cls, instruction: str) -> "TemplateMarkers":
        labels, phrases = [], []
        for line in _PLACEHOLDER.sub("\n", instruction).splitlines():
            text = line.strip()
            bare = text.strip("#*: \t").lower()
            if not bare:
                continue
            if text.startswith("#") or len(bare.split()) <= LABEL_WORDS:
                labels.append(bare)
                continue
            for sentence in re.split(r"(?<=[.!?:])\s+", text):
                s = normalise(sentence).lower().rstrip(".!?:")
                if len(s.split()) >= SENTENCE_WORDS:
                    phrases.append(s)
        return cls(tuple(dict.fromkeys(labels)), tuple(dict.fromkeys(phrases)))

    def leaks(self, text: str) -> bool:
        low = text.lower()
        for label in self.labels:
            if re.search(rf"(?m)^[\s#*>]*{re.escape(label)}[\s*]*(:|$)", low):
                return True
        flat = normalise(low)
        return any(p in flat for p in self.phrases)


def repetitive(text: str) -> bool:
    """Degenerate repetition: many repeated word 4-grams, or one line (of 3+ words) said three times or more."""
    words = text.lower().split()
    if len(words) >= REPEAT_MIN_WORDS:
        grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
        if 1 - len(set(grams)) / len(grams) > REPEAT_SHARE:
            return True
    lines = Counter(normalise(x).lower() for x in text.splitlines() if len(x.split()) >= 3)
    return any(n >= 3 for n in lines.values())


def echo_run(text: str, request: str) -> int:
    """The longest run of the request's words that ``text`` repeats in order (case and punctuation ignored)."""
    req, out = _WORD.findall(request.lower()), _WORD.findall(text.lower())
    if not req or not out:
        return 0
    return SequenceMatcher(None, req, out, autojunk=False).find_longest_match(0, len(req), 0, len(out)).size


def echoes(text: str, request: str) -> bool:
    """``text`` repeats most of the request word for word."""
    n = len(_WORD.findall(request))
    run = echo_run(text, request)
    return run >= ECHO_MIN_WORDS and run >= ECHO_SHARE * n


def echo_added(request: str, chosen: str, rejected: str, reference: str = "") -> bool:
    """The chosen side echoes the request where neither the rejected side nor the reference (when given) does."""
    return echoes(chosen, request) and not echoes(rejected, request) and not (reference and echoes(reference, request))


@dataclass(frozen=True)
class Gates:
    markers: TemplateMarkers
    require_finished: str = "chosen_if_rejected"

    def drop_reason(self, request: str, chosen: str, rejected: str, chosen_finished: bool,
                    rejected_finished: bool, reference: str = "") -> str | None:
        """Why the pair is dropped (the first gate it fails), or None when it is kept."""
        c, r = normalise(chosen), normalise(rejected)
        if not c:
            return "empty_chosen"
        if not r:
            return "empty_rejected"
        if c == r:
            return "equal"
        if self.markers.leaks(chosen) or self.markers.leaks(rejected):
            return "template_leak"
        need = self.require_finished
        if not chosen_finished and (need in ("chosen", "both") or (need == "chosen_if_rejected" and rejected_finished)):
            return "chosen_unfinished"
        if not rejected_finished and need == "both":
            return "rejected_unfinished"
        if repetitive(chosen):
            return "repetition"
        if echo_added(request, chosen, rejected, reference):
            return "prompt_echo"
        return None


REASONS = ("empty_chosen", "empty_rejected", "equal", "template_leak", "chosen_unfinished", "rejected_unfinished",
           "repetition", "prompt_echo")
