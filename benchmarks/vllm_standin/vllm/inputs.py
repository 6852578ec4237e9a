"""``vllm.inputs.TokensPrompt``: a prompt given as token ids (a plain dict, as vLLM's TypedDict is)."""


def TokensPrompt(**fields) -> dict:  # noqa: N802 - vLLM's name
    return dict(fields)
