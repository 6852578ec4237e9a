"""Every prompt the models see, and how it is rendered through the tokenizer's chat template. Change a prompt here
(or override ``improver.instruction`` in a config), nowhere else. The judges' own prompts are in ``eval/prompts/``.

policy   P(x)    = chat_template(x)
improver I(x, y) = chat_template(user: the improver instruction filled with the request x and the draft y)

An instruction is a plain string with the placeholders ``{prompt}``, ``{draft}`` and, optionally, ``{reference}``
(the SFT reference of the request: reading B, ``improver.sees_reference``).
"""
from __future__ import annotations

import re
from typing import Sequence

IMPROVER_INSTRUCTION = (
    "Below is a request and a draft response to it. Rewrite the draft into a better response: keep what is good, "
    "fix what is wrong or missing, and make it clearer. Reply with the improved response only.\n\n"
    "### Request\n{prompt}\n\n### Draft response\n{draft}"
)

# Reading B (``improver.sees_reference``): the improver sees the SFT reference in its input, in training and rounds
REFERENCED_INSTRUCTION = (
    "Below is a request, a draft response, and an expert response for reference. Revise the draft one clear step "
    "towards the quality of the expert response, keeping most of the draft. Reply with the revised draft only.\n\n"
    "### Request\n{prompt}\n\n### Draft response\n{draft}\n\n### Expert response\n{reference}"
)


def policy_messages(prompt: Sequence[tuple[str, str]]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in prompt]


_PLACEHOLDER = re.compile(r"\{(prompt|draft|reference)\}")


def fill(instruction: str, request: str, draft: str, reference: str = "") -> str:
    """The instruction with its placeholders filled in one pass (text filled in is never scanned again)."""
    values = {"prompt": request, "draft": draft.strip(), "reference": reference.strip()}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], instruction)


def improver_messages(prompt: Sequence[tuple[str, str]], draft: str, instruction: str,
                      reference: str = "") -> list[dict]:
    """Earlier turns are kept as they are; the last user turn becomes the improver instruction."""
    *history, (role, request) = list(prompt)
    body = fill(instruction, request, draft, reference)
    return [{"role": r, "content": c} for r, c in history] + [{"role": "user", "content": body}]


def render(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` with the assistant header appended (generation prompt)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def completion_ids(tokenizer, text: str, eos: bool = True) -> list[int]:
    """Token ids of a response as the model should produce it after the generation prompt (EOS appended)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


def policy_ids(tokenizer, prompt) -> list[int]:
    return render(tokenizer, policy_messages(prompt))


def improver_ids(tokenizer, prompt, draft: str, instruction: str, reference: str = "") -> list[int]:
    return render(tokenizer, improver_messages(prompt, draft, instruction, reference))


def improver_instruction(cfg) -> str:
    """The improver instruction in force for an ``ImproverConfig``: the configured one, or the built-in one of the
    reading (``sees_reference``)."""
    return cfg.instruction or (REFERENCED_INSTRUCTION if cfg.sees_reference else IMPROVER_INSTRUCTION)
