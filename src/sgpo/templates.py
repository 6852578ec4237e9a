"""The two roles' inputs, rendered through the tokenizer's chat template. Change prompts here (and the
``improver.instruction`` config string), nowhere else.

policy   P(x)    = chat_template(x)
improver I(x, y) = chat_template(user: improver instruction filled with the request x and the draft y)
"""
from __future__ import annotations

from typing import Sequence


def policy_messages(prompt: Sequence[tuple[str, str]]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in prompt]


def improver_messages(prompt: Sequence[tuple[str, str]], draft: str, instruction: str) -> list[dict]:
    """Earlier turns are kept as they are; the last user turn becomes the improver instruction."""
    *history, (role, request) = list(prompt)
    body = instruction.replace("{prompt}", request).replace("{draft}", draft.strip())
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


def improver_ids(tokenizer, prompt, draft: str, instruction: str) -> list[int]:
    return render(tokenizer, improver_messages(prompt, draft, instruction))
