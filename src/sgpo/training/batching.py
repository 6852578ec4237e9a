"""Turning (prompt, completion) token sequences into padded batches, and scoring completions.

Sequences are LEFT-padded so every completion ends at the last position: the LM head then runs only on the last
``K = max completion length + 1`` positions (``logits_to_keep``), which skips the vocabulary projection for prompt
tokens — the largest single cost for long improver prompts with a 49k vocabulary.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor    # (B, T)
    targets: torch.Tensor         # (B, K-1) completion token ids in the kept window
    target_mask: torch.Tensor     # (B, K-1) float: 1 on completion tokens (times a token weight), else 0
    keep: int                     # K

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.targets.to(device), self.target_mask.to(device), self.keep)


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int,
            weights: list[list[float] | None] | None = None) -> Batch:
    """``seqs``: (prompt_ids, completion_ids) pairs; ``weights``: optional per-completion-token loss weights."""
    width = max(len(p) + len(c) for p, c in seqs)
    keep = max(len(c) for _, c in seqs) + 1
    B = len(seqs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    targets = torch.full((B, keep - 1), pad_id, dtype=torch.long)
    tmask = torch.zeros((B, keep - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, width - n:] = torch.tensor(p + c)
        mask[i, width - n:] = 1
        if c:
            targets[i, keep - 1 - len(c):] = torch.tensor(c)
            w = weights[i] if weights and weights[i] is not None else [1.0] * len(c)
            tmask[i, keep - 1 - len(c):] = torch.tensor(w, dtype=torch.float32)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, mask, pos, targets, tmask, keep)


def token_logps(model, batch: Batch) -> torch.Tensor:
    """Log-probabilities (B, K-1) of the completion tokens under ``model`` (0 where the mask is 0)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=batch.keep, use_cache=False)
    logits = out.logits[:, :-1, :].float()
    logp = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
    return logp * (batch.target_mask > 0)


def length_buckets(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of indices with similar lengths (little padding), in a seeded random order.

    Sorting by length, cutting into batches, then shuffling the batches keeps each batch tight while the order in
    which batches are seen stays random.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches
