"""Local judges: a causal LM read through its label-token log-probabilities, and a sequence-classification reward model.

``hf:PATH`` (``HFJudge``): the pairwise prompt (this project's template by default) is rendered with the model's chat
template and the next-token distribution is read at the answer position. p(first better) is the mass of the first
label's token(s) over the mass of both labels' tokens (a label's token is the first token of ``"A"`` and of ``" A"``).
Every item is judged in both orders and the two readings are averaged:

    prefer(a, b) = ( p(first better | a, b) + 1 - p(first better | b, a) ) / 2

so a constant position bias cancels and prefer(a, b) + prefer(b, a) = 1 exactly.

``reward:PATH`` (``RewardJudge``): each (prompt, response) is scored by the reward model (its single logit; for a
two-class head, the logit difference of class 1 over class 0) and

    prefer(a, b) = sigmoid(r(a) - r(b))

i.e. the Bradley-Terry probability that reward models are trained to express; identical texts give exactly 0.5.
``mode="hard"`` gives 1 / 0 / 0.5 (a tie when the rewards differ by less than 1e-6) instead.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sgpo.eval.base import Judge
from sgpo.eval.judge_templates import PairwiseTemplate, pairwise_template

TIE_EPS = 1e-6


def _load_tokenizer(path: str, padding_side: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _device_dtype(device: str, dtype: str):
    from sgpo.models.loading import pick_device, pick_dtype

    dev = pick_device(device)
    return dev, pick_dtype(dtype, dev)


def _left_padded_batch(tok, token_lists: list[list[int]], device) -> dict:
    """Left-pad token id lists; position ids count real tokens only, so a text's result does not depend on its
    batch."""
    width = max(len(t) for t in token_lists)
    pad = tok.pad_token_id
    ids = torch.full((len(token_lists), width), pad, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, t in enumerate(token_lists):
        if t:
            ids[i, width - len(t):] = torch.tensor(t, dtype=torch.long)
            mask[i, width - len(t):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


class HFJudge(Judge):
    def __init__(self, path: str, *, template: str | PairwiseTemplate = "sgpo", device: str = "auto",
                 dtype: str = "auto", batch_size: int = 8, max_text_tokens: int = 768):
        from transformers import AutoModelForCausalLM

        from sgpo.models.loading import resolve

        self.path = path
        resolved = resolve(path)
        self.device, dt = _device_dtype(device, dtype)
        self.tokenizer = _load_tokenizer(resolved, "left")
        self.model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dt).to(self.device).eval()
        self.template = template if isinstance(template, PairwiseTemplate) else pairwise_template(template)
        self.template_name = self.template.name
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens
        self.name = f"hf:{path}"
        self.spec = self.name
        self.cache_id = f"{self.spec}|{self.template_name}:{self.template.digest}|max_text_tokens={max_text_tokens}"
        self._keep_last = True
        self.label_ids = [self._label_token_ids(lab) for lab in self.template.labels]
        if set(self.label_ids[0]) & set(self.label_ids[1]):
            raise ValueError(f"labels {self.template.labels} share a token in this tokenizer")

    def close(self) -> None:
        self.model = None

    def _label_token_ids(self, label: str) -> list[int]:
        ids = set()
        for variant in (label, " " + label):
            toks = self.tokenizer.encode(variant, add_special_tokens=False)
            if toks:
                ids.add(toks[0])
        return sorted(ids)

    def _clip(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_text_tokens:
            return text
        return self.tokenizer.decode(ids[:self.max_text_tokens])

    def render(self, prompt: str, first: str, second: str) -> list[int]:
        """Token ids of the judge input, ending where the label is to be written."""
        messages = self.template.messages(self._clip(prompt), self._clip(first), self._clip(second))
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
        return self.tokenizer.encode(text)

    def _last_logits(self, batch: dict) -> torch.Tensor:
        if self._keep_last:
            try:  # compute the LM head at the last position only
                return self.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
            except TypeError:
                self._keep_last = False
        return self.model(**batch).logits[:, -1, :].float()

    @torch.inference_mode()
    def first_position_probability(self, prompts: Sequence[str], first: Sequence[str],
                                   second: Sequence[str]) -> list[float]:
        """p(the output shown first is better), per item, from the label tokens' next-token probabilities."""
        out: list[float] = []
        rendered = [self.render(p, x, y) for p, x, y in zip(prompts, first, second)]
        for start in range(0, len(rendered), self.batch_size):
            batch = _left_padded_batch(self.tokenizer, rendered[start:start + self.batch_size], self.device)
            logits = self._last_logits(batch)
            logp = torch.log_softmax(logits, dim=-1)
            s1 = torch.logsumexp(logp[:, self.label_ids[0]], dim=-1)
            s2 = torch.logsumexp(logp[:, self.label_ids[1]], dim=-1)
            out.extend(torch.sigmoid(s1 - s2).tolist())
        return out

    def prefer(self, prompts, a, b, references=None) -> list[float]:
        if not (len(prompts) == len(a) == len(b)):
            raise ValueError("prompts, a and b must have the same length")
        n = len(prompts)
        # both orders in one pass over the model
        p = self.first_position_probability(list(prompts) * 2, list(a) + list(b), list(b) + list(a))
        return [(p[i] + 1.0 - p[n + i]) / 2.0 for i in range(n)]


class RewardJudge(Judge):
    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 max_length: int = 2048, mode: str = "sigmoid"):
        from transformers import AutoModelForSequenceClassification

        from sgpo.models.loading import resolve

        if mode not in ("sigmoid", "hard"):
            raise ValueError("mode must be 'sigmoid' or 'hard'")
        self.path = path
        resolved = resolve(path)
        self.device, dt = _device_dtype(device, dtype)
        self.tokenizer = _load_tokenizer(resolved, "left")
        self.model = AutoModelForSequenceClassification.from_pretrained(resolved, dtype=dt).to(self.device).eval()
        if self.model.config.num_labels not in (1, 2):
            raise ValueError(f"reward model '{path}' has {self.model.config.num_labels} outputs; expected 1 (or 2)")
        self.batch_size = batch_size
        self.max_length = max_length
        self.mode = mode
        self.name = f"reward:{path}"
        self.spec = self.name
        self.cache_id = f"{self.spec}|mode={mode}|max_length={max_length}"

    def close(self) -> None:
        self.model = None

    def render(self, prompt: str, response: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = self.tokenizer.encode(prompt + "\n\n" + response)
        return ids[-self.max_length:]  # keep the end: the response is what is scored

    @torch.inference_mode()
    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The reward of each (prompt, response)."""
        out: list[float] = []
        rendered = [self.render(p, r) for p, r in zip(prompts, responses)]
        embed = self.model.get_input_embeddings()
        for start in range(0, len(rendered), self.batch_size):
            batch = _left_padded_batch(self.tokenizer, rendered[start:start + self.batch_size], self.device)
            # Inputs as embeddings: with left padding the score is read at the last position, whatever the pad id
            # (a pad id equal to the end-of-turn token would otherwise move the read-out position).
            logits = self.model(inputs_embeds=embed(batch["input_ids"]), attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"]).logits.float()
            r = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
            out.extend(r.tolist())
        return out

    def prefer(self, prompts, a, b, references=None) -> list[float]:
        if not (len(prompts) == len(a) == len(b)):
            raise ValueError("prompts, a and b must have the same length")
        n = len(prompts)
        r = self.rewards(list(prompts) * 2, list(a) + list(b))
        out = []
        for i in range(n):
            if a[i] == b[i]:
                out.append(0.5)
                continue
            d = r[i] - r[n + i]
            if self.mode == "hard":
                out.append(0.5 if abs(d) < TIE_EPS else (1.0 if d > 0 else 0.0))
            else:
                out.append(1.0 / (1.0 + math.exp(-d)) if d > -700 else 0.0)
        return out
