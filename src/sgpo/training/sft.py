"""Supervised training: negative log-likelihood on completion tokens only (SFT and the improver role).

An example may carry per-token loss weights (the improver up-weights the tokens its target changes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batching import collate, length_buckets, token_logps
from .loop import mean_metrics, run_steps


@dataclass(frozen=True)
class NLLExample:
    prompt_ids: tuple[int, ...]      # the rendered chat input (policy or improver mode)
    completion_ids: tuple[int, ...]  # the target response, ending with EOS
    kind: str = "policy"             # "policy" or "improver": only for reporting
    weights: tuple[float, ...] | None = None  # per-completion-token loss weights (None = all 1)


def nll_step(pad_id: int):
    def step(model, examples: list[NLLExample]):
        batch = collate([(list(e.prompt_ids), list(e.completion_ids)) for e in examples], pad_id,
                        weights=[list(e.weights) if e.weights is not None else None for e in examples])
        batch = batch.to(next(model.parameters()).device)
        logp = token_logps(model, batch)
        # a weighted mean over completion tokens: up-weighting some tokens shifts the gradient towards them
        # without changing the loss scale
        loss = -(logp * batch.target_mask).sum() / batch.target_mask.sum().clamp(min=1e-8)
        return loss, {"loss": loss.detach()}
    return step


def _completion_tokens(examples: list[NLLExample]) -> int:
    """The NLL loss is a mean over completion tokens: a slice of a batch weighs its share of them."""
    return sum(len(e.completion_ids) for e in examples)


def train_nll(model, examples: list[NLLExample], *, pad_id: int, batch_size: int, epochs: int, lr: float,
              seed: int, warmup_steps: int = 0, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
              accelerator=None, desc: str = "sft", checkpoint_dir=None, checkpoint_every: int = 0) -> dict:
    """Train on ``examples`` for ``epochs``; batches are length-bucketed in a seeded order. Returns mean metrics.

    ``batch_size`` examples make one optimizer step, over all processes together (see ``run_steps``).
    """
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
    batches = []
    for epoch in range(epochs):
        batches += [[examples[i] for i in b] for b in length_buckets(lengths, batch_size, seed + epoch)]
    hist = run_steps(model, batches, nll_step(pad_id), lr=lr, weight_decay=weight_decay,
                     warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, accelerator=accelerator, desc=desc,
                     weight_fn=_completion_tokens, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    m = mean_metrics(hist)
    return {"nll/loss": m.get("loss", float("nan")), "nll/steps": len(hist), "nll/examples": len(examples)}
