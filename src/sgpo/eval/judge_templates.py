"""Judge prompt templates: this project's own (``src/sgpo/eval/prompts/*.txt``) and, when the optional ``alpaca-eval``
package is installed, AlpacaEval's official weighted template read from that package at run time.

A template file is a conversation written with ChatML role markers::

    <|im_start|>system
    ...
    <|im_end|>
    <|im_start|>user
    ... {placeholder} ...
    <|im_end|>

Placeholders are ``{name}`` and are filled in one pass (text inserted for one placeholder is never scanned for
another), so answers that happen to contain braces are safe.
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"

# AlpacaEval's weighted GPT-4 Turbo annotator: the config that names its prompt file and label tokens.
ALPACA_EVAL_WEIGHTED = "weighted_alpaca_eval_gpt4_turbo"

_ROLE_BLOCK = re.compile(r"<\|im_start\|>([^\n]*)\n(.*?)<\|im_end\|>", re.S)


def read_prompt(name: str) -> str:
    """The text of ``prompts/<name>`` (a file shipped with the package)."""
    return (PROMPTS_DIR / name).read_text(encoding="utf-8")


def parse_chatml(text: str) -> list[dict]:
    """Split a ChatML-marked template into ``[{"role", "content"}]`` (content stripped)."""
    messages = []
    for role, content in _ROLE_BLOCK.findall(text):
        role = role.strip().split(" ", 1)[0] or "user"
        messages.append({"role": role, "content": content.strip()})
    if not messages:
        raise ValueError("template has no <|im_start|>role ... <|im_end|> blocks")
    return messages


def fill(text: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` for every name in ``values`` in a single pass; other braces are left alone."""
    if not values:
        return text
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
    return pattern.sub(lambda m: str(values[m.group(1)]), text)


@dataclass(frozen=True)
class PairwiseTemplate:
    """A prompt that shows an instruction and two outputs and asks for the label of the better one.

    ``labels[0]`` names the first output shown (``{output_1}``), ``labels[1]`` the second (``{output_2}``).
    """

    name: str
    text: str
    labels: tuple[str, str]
    source: str

    @property
    def digest(self) -> str:
        return hashlib.sha256((self.text + "\0" + "\0".join(self.labels)).encode()).hexdigest()[:16]

    def messages(self, instruction: str, output_1: str, output_2: str) -> list[dict]:
        values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
        return [{"role": m["role"], "content": fill(m["content"], values)} for m in parse_chatml(self.text)]


def sgpo_pairwise_template() -> PairwiseTemplate:
    return PairwiseTemplate("sgpo:pairwise_label", read_prompt("pairwise_label.txt"), ("A", "B"),
                            str(PROMPTS_DIR / "pairwise_label.txt"))


def alpaca_eval_weighted_template() -> PairwiseTemplate | None:
    """AlpacaEval's official weighted template and its label tokens, read from the installed ``alpaca_eval`` package
    (its files only; the package is not imported). ``None`` when the package or the files are absent."""
    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "evaluators_configs"
    config_path = root / ALPACA_EVAL_WEIGHTED / "configs.yaml"
    try:
        import yaml

        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))[ALPACA_EVAL_WEIGHTED]
        template_path = root / config["prompt_template"]
        text = template_path.read_text(encoding="utf-8")
        parser = config.get("completion_parser_kwargs", {})
        first = parser["numerator_token"]
        second = [t for t in parser["denominator_tokens"] if t != first][0]
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return None
    return PairwiseTemplate(f"alpaca_eval:{ALPACA_EVAL_WEIGHTED}", text, (first, second), str(template_path))


def pairwise_template(name: str = "auto") -> PairwiseTemplate:
    """``auto``: AlpacaEval's official weighted template when ``alpaca-eval`` is installed, else this project's own;
    ``alpaca_eval``: the official one (an error when absent); ``sgpo``: this project's own; or a path to a template
    file whose labels are ``A`` and ``B``."""
    if name in ("auto", "alpaca_eval"):
        official = alpaca_eval_weighted_template()
        if official is not None:
            return official
        if name == "alpaca_eval":
            raise ValueError("template 'alpaca_eval' needs the alpaca-eval package installed")
        return sgpo_pairwise_template()
    if name == "sgpo":
        return sgpo_pairwise_template()
    path = Path(name)
    if path.is_file():
        return PairwiseTemplate(f"file:{path.name}", path.read_text(encoding="utf-8"), ("A", "B"), str(path))
    raise ValueError(f"unknown judge template '{name}' (known: auto, alpaca_eval, sgpo, or a file path)")


def arena_verdict_messages(question: str, answer_a: str, answer_b: str, reference: str | None = None) -> list[dict]:
    """The Arena-Hard style verdict prompt (this project's wording) for one game."""
    section = fill(read_prompt("arena_reference.txt"), {"reference": reference}) if reference else ""
    values = {"question": question, "answer_a": answer_a, "answer_b": answer_b, "reference_section": section}
    return [{"role": m["role"], "content": fill(m["content"], values)}
            for m in parse_chatml(read_prompt("arena_verdict.txt"))]


ARENA_TEMPLATE_NAME = "sgpo:arena_verdict"
VERDICT_LABELS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
_VERDICT = re.compile(r"\[\[\s*([AB])\s*(>>|>|=|<<|<)\s*([AB])\s*\]\]")
_FLIP = {">>": "<<", ">": "<", "=": "=", "<": ">", "<<": ">>"}


def parse_verdict(text: str | None) -> str | None:
    """The verdict label (one of ``VERDICT_LABELS``) in a judge's reply, or ``None`` when there is none or the reply
    gives conflicting ones. ``[[B<A]]`` is read as ``A>B`` and so on."""
    if not text:
        return None
    found = set()
    for left, op, right in _VERDICT.findall(text):
        if left == right:
            continue
        if left == "B":  # write every verdict with A on the left
            op = _FLIP[op]
        found.add({">>": "A>>B", ">": "A>B", "=": "A=B", "<": "B>A", "<<": "B>>A"}[op])
    return found.pop() if len(found) == 1 else None
