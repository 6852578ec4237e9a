"""The generation engine: batched sampling with a KV cache, stop at EOS, per-prompt seeds.

One interface, ``generate(model, tokenizer, requests, settings)``; backends slot in behind it.
Determinism contract (see the project notes): every request carries its own seed, sampling for a request draws only
from a generator seeded with it, and requests are cut into batches by ``plan_batches`` which depends only on the
requests themselves, never on the number of processes or on where a run was resumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Request:
    """One prompt to complete: its token ids (chat template already applied) and its sampling seed."""
    prompt_ids: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    finished: bool  # True when the model emitted EOS (the text is complete), False when cut at max_new_tokens


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0
    batch_size: int = 16


def plan_batches(requests: Sequence[Request], batch_size: int) -> list[list[int]]:
    """Indices of ``requests`` grouped into batches: contiguous in the given order (a fixed plan)."""
    return [list(range(i, min(i + batch_size, len(requests)))) for i in range(0, len(requests), batch_size)]


def _sample(logits: torch.Tensor, gens: list[torch.Generator], s: Settings) -> torch.Tensor:
    if s.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    out = [torch.multinomial(probs[i].cpu(), 1, generator=g) for i, g in enumerate(gens)]
    return torch.cat(out).to(logits.device)


@torch.inference_mode()
def generate_batch(model, tokenizer, batch: Sequence[Request], s: Settings) -> list[Generation]:
    """Generate for one batch (left padding, KV cache, finished rows keep emitting pad)."""
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    gens = [torch.Generator().manual_seed(int(r.seed)) for r in batch]
    out: list[list[int]] = [[] for _ in batch]
    done = [False] * len(batch)
    finished = [False] * len(batch)
    past = None
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, step_pos = ids, pos
    for _ in range(s.max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                    use_cache=True)
        past = res.past_key_values
        nxt = _sample(res.logits[:, -1, :], gens, s)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in eos:
                done[i] = finished[i] = True
            else:
                out[i].append(t)
        if all(done):
            break
        step_ids = nxt.unsqueeze(-1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=device)], dim=1)
    return [Generation(tokenizer.decode(o, skip_special_tokens=True), tuple(o), f) for o, f in zip(out, finished)]


def generate(model, tokenizer, requests: Sequence[Request], s: Settings,
             on_batch: Callable[[list[int], list[Generation]], None] | None = None,
             skip: set[int] | None = None, progress: str | None = None) -> list[Generation | None]:
    """Generate for all ``requests`` following ``plan_batches``.

    ``on_batch(indices, generations)`` is called after every batch (used to append results to disk);
    batches whose indices are all in ``skip`` are not generated (resume) and give ``None`` entries.
    """
    from tqdm.auto import tqdm

    results: list[Generation | None] = [None] * len(requests)
    batches = plan_batches(requests, s.batch_size)
    todo = [b for b in batches if not (skip and all(i in skip for i in b))]
    bar = tqdm(total=sum(len(b) for b in todo), desc=progress or "generate", disable=progress is None,
               unit="seq", leave=False)
    was_training = model.training
    model.eval()
    try:
        for b in todo:
            gens = generate_batch(model, tokenizer, [requests[i] for i in b], s)
            for i, g in zip(b, gens):
                results[i] = g
            if on_batch:
                on_batch(b, gens)
            bar.update(len(b))
    finally:
        bar.close()
        model.train(was_training)
    return results


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (cfg_eos, tokenizer.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(e)
    return ids
