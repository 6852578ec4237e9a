"""``sgpo:verifiable-instructions``: AlpacaEval's 805 instructions, each with one or two verifiable constraints appended
in IFEval's own wording, and GPT-4 Turbo's answer made by a program to satisfy them.

Only constraints a transformation can satisfy honestly are drawn: a case change (not where the answer holds code),
double quotes around the whole answer, an end phrase, the request repeated first, the whole answer as JSON, a title in
double angular brackets, highlighted sections (the first sentences of the first paragraphs, where the answer has no
``*`` and no code of its own), a postscript, and word or sentence counts with bounds the answer meets. Never a response language,
two responses, placeholders or anything that would have to be faked. Constraints are drawn per instruction with a
fixed data seed (the same data for every run seed), compatible by IFEval's conflict table read both ways.

The reference is made after the run's cut (``fit_reference``): the run cuts references to ``data.max_reference_tokens``
at a sentence boundary, which would cut off an end phrase or a closing brace, so the base answer is cut to leave room,
transformed, and checked by IFEval's strict checkers; a row whose trained reference fails one is dropped, and the
counts per constraint type are logged (``summary_line``).
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from sgpo.core.text import cut_reference

DATA_SEED = 20250727
"""The seed constraints are drawn with: the data is the same for every run."""
SOURCE = "sgpo:verifiable-instructions"
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional questions.",
               "Any other questions?")
POSTSCRIPT = "I hope this helps."
LOWER = "change_case:english_lowercase"
UPPER = "change_case:english_capital"
QUOTE = "startend:quotation"
END = "startend:end_checker"
REPEAT = "combination:repeat_prompt"
JSON = "detectable_format:json_format"
TITLE = "detectable_format:title"
HIGHLIGHT = "detectable_format:number_highlighted_sections"
PS = "detectable_content:postscript"
WORDS = "length_constraints:number_words"
SENTENCES = "length_constraints:number_sentences"
TYPES = (LOWER, UPPER, QUOTE, END, REPEAT, JSON, TITLE, HIGHLIGHT, PS, WORDS, SENTENCES)
"""Every type this source draws, in the order their transformations apply (JSON, the outermost, last)."""


def _applicable(instruction: str, answer: str) -> list[str]:
    """The types a transformation of ``answer`` can satisfy honestly."""
    code = "```" in answer or "`" in answer or "\t" in answer
    out = [QUOTE, END, JSON, TITLE, PS, WORDS, SENTENCES]
    if not code:
        out += [LOWER, UPPER]
    if "*" not in answer and not code:  # a highlight must not wrap a code fence or a line of code
        out.append(HIGHLIGHT)
    if len(instruction) <= 240:
        out.append(REPEAT)
    return [t for t in TYPES if t in out]


def _conflict(a: str, b: str, table: Mapping) -> bool:
    return a == b or b in table.get(a, ()) or a in table.get(b, ())


def _kwargs(kind: str, instruction: str, rng: random.Random) -> dict:
    """The arguments of a constraint, chosen so that an answer cut to ~96 tokens most likely meets them."""
    if kind == END:
        return {"end_phrase": rng.choice(END_PHRASES)}
    if kind == REPEAT:
        return {"prompt_to_repeat": instruction}
    if kind == HIGHLIGHT:
        return {"num_highlights": rng.choice((1, 2))}
    if kind == PS:
        return {"postscript_marker": "P.S."}
    if kind == WORDS:
        if rng.random() < 0.5:
            return {"relation": "at least", "num_words": rng.choice((20, 30, 40))}
        return {"relation": "less than", "num_words": rng.choice((100, 120, 150))}
    if kind == SENTENCES:
        if rng.random() < 0.5:
            return {"relation": "at least", "num_sentences": rng.choice((2, 3))}
        return {"relation": "less than", "num_sentences": rng.choice((10, 12))}
    return {}


def draw(index: int, instruction: str, answer: str, table: Mapping) -> tuple[list[str], list[dict]]:
    """One or two compatible constraints for instruction ``index`` (seeded by ``DATA_SEED`` and the index alone)."""
    rng = random.Random(f"{DATA_SEED}:{index}")
    pool = _applicable(instruction, answer)
    rng.shuffle(pool)
    chosen: list[str] = []
    want = 1 if rng.random() < 0.4 else 2
    for kind in pool:
        if len(chosen) == want:
            break
        if not any(_conflict(kind, c, table) for c in chosen):
            chosen.append(kind)
    chosen.sort(key=TYPES.index)
    return chosen, [_kwargs(k, instruction, rng) for k in chosen]


def iter_rows(path: Path) -> Iterator[tuple[dict, str]]:
    """``(row, where)`` per instruction of AlpacaEval's file ``path`` (instruction, GPT-4 Turbo's output), in its
    order: ``prompt`` (the instruction with the
    constraints' IFEval descriptions), ``response`` (the whole answer transformed), ``instruction_id_list``,
    ``kwargs``, ``base_prompt`` and ``base_response`` (GPT-4 Turbo's answer as it is)."""
    from sgpo.eval.ifeval import ifeval_module

    ifeval = ifeval_module()
    table = ifeval.instructions_registry.INSTRUCTION_CONFLICTS
    for i, row in enumerate(json.loads(Path(path).read_text(encoding="utf-8"))):
        instruction, answer = row["instruction"].strip(), row["output"].strip()
        ids, kwargs = draw(i, instruction, answer, table)
        descriptions = [_describe(ifeval, k, kw) for k, kw in zip(ids, kwargs)]
        fields = {"instruction_id_list": ids, "kwargs": kwargs, "base_prompt": instruction, "base_response": answer}
        yield {"prompt": f"{instruction}\n\n{' '.join(descriptions)}",
               "response": transform(answer, fields), **fields}, f"{path}[{i}]"


def _describe(ifeval, kind: str, kwargs: dict) -> str:
    checker = ifeval.instructions_registry.INSTRUCTION_DICT[kind](kind)
    return checker.build_description(**kwargs).strip()


def _title(instruction: str) -> str:
    words = re.findall(r"[A-Za-z0-9']+", instruction)[:6]
    return " ".join(words) or "Answer"


def _highlight(text: str, n: int) -> str:
    """The first sentence of each of the first ``n`` non-empty lines, wrapped in ``*``."""
    lines, done = text.split("\n"), 0
    for i, line in enumerate(lines):
        if done == n or not line.strip():
            continue
        lead = len(line) - len(line.lstrip(" -•0123456789.)"))
        body = line[lead:]
        m = re.match(r"(.+?[.!?:])(\s|$)", body)
        head = m.group(1) if m else body.rstrip()
        if not head.strip():
            continue
        lines[i] = line[:lead] + f"*{head}*" + body[len(head):]
        done += 1
    return "\n".join(lines)


def transform(answer: str, fields: Mapping) -> str:
    """``answer`` made to satisfy the row's constraints (the order of ``TYPES``)."""
    ids = list(fields["instruction_id_list"])
    kw = dict(zip(ids, fields["kwargs"]))
    text = answer.strip()
    if HIGHLIGHT in kw:
        text = _highlight(text, int(kw[HIGHLIGHT]["num_highlights"]))
    if PS in kw:
        text += f"\n\n{kw[PS]['postscript_marker']} {POSTSCRIPT}"
    if END in kw:
        text += f"\n\n{kw[END]['end_phrase']}"
    if TITLE in kw:
        text = f"<<{_title(fields['base_prompt'])}>>\n\n{text}"
    if REPEAT in kw:
        text = f"{kw[REPEAT]['prompt_to_repeat']}\n\n{text}"
    if LOWER in kw:
        text = text.lower()
    if UPPER in kw:
        text = text.upper()
    if QUOTE in kw:
        text = f'"{text}"'
    if JSON in kw:
        text = json.dumps({"response": text}, ensure_ascii=False)
    return text


def fit_reference(fields: Mapping, tokenizer, max_tokens: int) -> tuple[str | None, str]:
    """The trained reference of a row: its base answer cut (at a sentence boundary) so that the transformed text fits
    in ``max_tokens`` tokens, transformed, and checked by IFEval's strict checkers. ``(text, "")``, or ``(None,
    reason)`` naming what failed."""
    base, budget = fields["base_response"], max_tokens
    while True:
        text = transform(cut_reference(base, tokenizer, budget), fields)
        over = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - max_tokens
        if over <= 0:
            break
        budget -= max(over, 4)
        if budget < 8:
            return None, "does not fit"
    failed = failing(fields, text)
    return (None, f"fails {failed[0]} after the cut") if failed else (text, "")


def failing(fields: Mapping, text: str) -> list[str]:
    """The row's constraints ``text`` does not meet, by IFEval's strict checkers."""
    from sgpo.eval.ifeval import followed, ifeval_module

    row = {"prompt": "", "instruction_id_list": fields["instruction_id_list"], "kwargs": fields["kwargs"]}
    strict = followed(ifeval_module(), row, text).strict
    return [k for k, ok in zip(fields["instruction_id_list"], strict) if not ok]


def summary_line(outcomes: Sequence[tuple[Mapping, str]]) -> str:
    """One log line from ``(fields, reason)`` outcomes (reason empty when kept): kept of made, per type, and why rows
    were dropped."""
    made, kept, why = Counter(), Counter(), Counter()
    for fields, reason in outcomes:
        for k in fields["instruction_id_list"]:
            made[k] += 1
            kept[k] += not reason
        if reason:
            why[reason] += 1
    total = sum(1 for _, r in outcomes if not r)
    per_type = ", ".join(f"{k.split(':')[1]} {kept[k]}/{made[k]}" for k in TYPES if made[k])
    dropped = "; ".join(f"{n} {r}" for r, n in why.most_common())
    return f"{total} of {len(outcomes)} rows kept ({per_type})" + (f"; dropped: {dropped}" if dropped else "")
