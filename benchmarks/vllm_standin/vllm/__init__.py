"""A stand-in for the part of vLLM's offline API that sgpo's worker uses (``LLM``, ``SamplingParams``,
``inputs.TokensPrompt``), on transformers' ``generate``: the GPU check runs sgpo's real worker script, job protocol,
per-process device choice and process boundary on a machine without vLLM. The samples are transformers': the requests
of a call in left-padded batches of 16, each batch seeded by its first request's seed. With ``SGPO_VLLM_STANDIN_LOG``
set, every engine appends what it was built with (dtype, GPU memory share, ``max_model_len``, its GPU) to that file as
a JSON line: the GPU check reads the share sgpo gave it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list = field(default_factory=list)
    detokenize: bool = True


@dataclass
class _Completion:
    token_ids: list
    finish_reason: str


@dataclass
class _Output:
    outputs: list


class LLM:
    """The checkpoint folder's weights (no tokenizer read: sgpo sends token ids) on this process's one GPU."""

    def __init__(self, model: str, dtype: str = "auto", seed: int = 0, skip_tokenizer_init: bool = False,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, **_):
        from transformers import AutoModelForCausalLM

        if not skip_tokenizer_init:
            raise ValueError("sgpo's worker sends token ids: skip_tokenizer_init must be set")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if os.environ.get("SGPO_VLLM_STANDIN_LOG"):
            with open(os.environ["SGPO_VLLM_STANDIN_LOG"], "a") as f:
                f.write(json.dumps({"dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization,
                                    "max_model_len": max_model_len, "cuda_visible_devices": self.visible}) + "\n")
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype, "auto")).to(self.device)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list:
        """sgpo's weight swap (``sgpo_load_weights``, its worker extension's method): the folder's weights, loaded in
        place of the current ones."""
        if method != "sgpo_load_weights":
            raise NotImplementedError(f"the stand-in knows only sgpo_load_weights, not {method}")
        from transformers import AutoModelForCausalLM

        dtype = next(self.model.parameters()).dtype
        self.model = AutoModelForCausalLM.from_pretrained(args[0], dtype=dtype).to(self.device)
        return [[]]

    def reset_prefix_cache(self) -> bool:
        return True  # no prefix cache here

    def generate(self, prompts: list, params: list, use_tqdm: bool = False) -> list:
        out = []
        for i in range(0, len(prompts), 16):
            out += self._batch([p["prompt_token_ids"] for p in prompts[i:i + 16]], params[i:i + 16])
        return out

    def _batch(self, prompts: list, params: list) -> list:
        p, width = params[0], max(len(x) for x in prompts)
        stops = list(p.stop_token_ids)
        pad = stops[0] if stops else 0
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=self.device)
        torch.manual_seed(p.seed or 0)
        sample = p.temperature > 0
        gen = self.model.generate(ids, attention_mask=mask, do_sample=sample, top_k=None,
                                  temperature=p.temperature if sample else None, top_p=p.top_p if sample else None,
                                  max_new_tokens=p.max_tokens, eos_token_id=stops or None, pad_token_id=pad)
        out = []
        for row in gen[:, width:].tolist():
            stop = next((k for k, t in enumerate(row) if t in stops), None)
            out.append(_Output([_Completion(row if stop is None else row[:stop + 1],
                                            "stop" if stop is not None else "length")]))
        return out
