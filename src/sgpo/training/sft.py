"""Supervised training: negative log-likelihood on completion tokens only (SFT and the improver role).

An example may carry per-token loss weights (the improver up-weights the tokens its target changes). On a CPU a batch
is run in exact micro-batches of at most ``batching.CPU_MAX_POSITIONS`` positions (improver examples hold a prompt, a
draft and a target: four of them in one forward pass cost several GB of activations)."""
from __future__ import annotations

from dataclasses import dataclass

from .batching import collate, length_buckets, micro_batching, position_slices, token_logps
from .loop import mean_metrics, run_steps


@dataclass(frozen=True)
class NLLExample:
    prompt_ids: tuple[int, ...]      # the rendered chat input (policy or improver mode)
    completion_ids: tuple[int, ...]  # the target response, ending with EOS
    kind: str = "policy"             # "policy" or "improver": only for reporting
    weights: tuple[float, ...] | None = None  # per-completion-token loss weights (None = all 1)


def _token_weight(e: NLLExample) -> float:
    return float(sum(e.weights)) if e.weights is not None else float(len(e.completion_ids))


def nll_step(pad_id: int, max_positions: int | None = None, backward=None):
    """The step function of ``run_steps``: the weighted mean NLL over the completion tokens of a batch.

    With ``max_positions`` and ``backward``, the batch is cut into micro-batches of at most ``max_positions`` padded
    positions; every slice but the last is back-propagated here and the returned loss carries the gradient of the last
    slice plus the value of the others: the accumulated gradient is exactly the whole batch's."""
    def step(model, examples: list[NLLExample]):
        device = next(model.parameters()).device
        lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
        parts = position_slices(lengths, max_positions) if backward is not None else [slice(0, len(examples))]
        # a weighted mean over completion tokens: up-weighting some tokens shifts the gradient towards them
        # without changing the loss scale
        total = max(sum(_token_weight(e) for e in examples), 1e-8)
        done, loss = 0.0, None
        for k, part in enumerate(parts):
            chunk = examples[part]
            batch = collate([(list(e.prompt_ids), list(e.completion_ids)) for e in chunk], pad_id,
                            weights=[list(e.weights) if e.weights is not None else None for e in chunk]).to(device)
            part_loss = -(token_logps(model, batch) * batch.target_mask).sum() / total
            if k < len(parts) - 1:
                backward(part_loss)
                done += float(part_loss.detach())
            else:
                loss = part_loss + done
        return loss, {"loss": loss.detach()}
    return step


def _completion_tokens(examples: list[NLLExample]) -> int:
    """The NLL loss is a mean over completion tokens: a slice of a batch weighs its share of them."""
    return sum(len(e.completion_ids) for e in examples)


def train_nll(model, examples: list[NLLExample], *, pad_id: int, batch_size: int, epochs: int, lr: float,
              seed: int, warmup_steps: int = 0, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
              accelerator=None, desc: str = "sft", checkpoint_dir=None, checkpoint_every: int = 0,
              max_positions: int | None | str = "auto") -> dict:
    """Train on ``examples`` for ``epochs``; batches are length-bucketed in a seeded order. Returns mean metrics.

    ``batch_size`` examples make one optimizer step, over all processes together (see ``run_steps``).
    ``max_positions``: positions per forward pass (``auto`` = ``default_max_positions``; single process only).
    """
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
    batches = []
    for epoch in range(epochs):
        batches += [[examples[i] for i in b] for b in length_buckets(lengths, batch_size, seed + epoch)]
    max_positions, backward = micro_batching(model, max_positions, accelerator)
    hist = run_steps(model, batches, nll_step(pad_id, max_positions, backward), lr=lr, weight_decay=weight_decay,
                     warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, accelerator=accelerator, desc=desc,
                     weight_fn=_completion_tokens, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    m = mean_metrics(hist)
    return {"nll/loss": m.get("loss", float("nan")), "nll/steps": len(hist), "nll/examples": len(examples)}
