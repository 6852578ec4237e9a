"""The shared optimisation loop: AdamW, warm-up, clipping, accelerate for devices and processes, checkpoints."""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable

import torch


def make_optimizer(model, lr: float, weight_decay: float = 0.0):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=False, foreach=True)


def warmup_schedule(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0)


def run_steps(model, batches: list, step_fn: Callable, *, lr: float, weight_decay: float = 0.0,
              warmup_steps: int = 0, max_grad_norm: float = 1.0, accelerator=None, desc: str = "train",
              show_progress: bool = True) -> list[dict]:
    """Run one optimizer step per batch. ``step_fn(model, batch) -> (loss, metrics dict)``.

    Returns the per-step metrics (averaged across processes by the caller when needed).
    """
    from tqdm.auto import tqdm

    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = warmup_schedule(optimizer, warmup_steps)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    history = []
    bar = tqdm(batches, desc=desc, leave=False, disable=not show_progress, unit="step")
    for batch in bar:
        loss, metrics = step_fn(model, batch)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if max_grad_norm and max_grad_norm > 0:
            params = [p for p in model.parameters() if p.grad is not None]
            if accelerator is not None:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {k: float(v) for k, v in metrics.items()}
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
    model.eval()
    return history


def mean_metrics(history: list[dict]) -> dict:
    keys = {k for h in history for k in h}
    return {k: sum(h[k] for h in history if k in h) / max(1, sum(1 for h in history if k in h)) for k in keys}
