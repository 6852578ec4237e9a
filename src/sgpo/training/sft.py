"""Supervised training: negative log-likelihood on completion tokens only (SFT and the improver role).

On a CPU a batch is run in exact micro-batches of at most ``batching.CPU_MAX_POSITIONS`` positions (improver
examples hold a prompt, a draft and a target: four of them in one forward pass cost several GB of activations)."""
from __future__ import annotations

from dataclasses import dataclass

from sgpo.config.schema import TrainConfig
from sgpo.training.batching import (collate, length_buckets, micro_batching, micro_passes, pass_context, position_slices,
                       token_logps)
from sgpo.training.loop import Job, Optim, mean_metrics, run_steps


@dataclass(frozen=True)
class NLLExample:
    prompt_ids: tuple[int, ...]      # the rendered chat input (policy or improver mode)
    completion_ids: tuple[int, ...]  # the target response, ending with EOS
    kind: str = "policy"             # "policy" or "improver": only for reporting


def nll_step(pad_id: int, max_positions: int | None = None, backward=None):
    """The step function of ``run_steps``: the mean NLL over the completion tokens of a batch.

    With ``max_positions`` and ``backward``, the batch is cut into micro-batches of at most ``max_positions`` padded
    positions (``batching.micro_passes``: under several processes, as many passes as the rank that needs the most,
    padded with zero-weight passes); every pass but the last is back-propagated here, without gradient sync, and the
    returned loss carries the gradient of the last plus the value of the others: the accumulated gradient is exactly
    the whole batch's."""
    def split(examples: list[NLLExample]) -> list[list[NLLExample]]:
        lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
        return [examples[s] for s in position_slices(lengths, max_positions)]

    def step(model, examples: list[NLLExample], batch=None):   # weighted by tokens in run_steps already
        device = next(model.parameters()).device
        total = max(_completion_tokens(examples), 1)
        done, loss = 0.0, None
        for chunk, pad, last in micro_passes(examples, split, backward):
            with pass_context(backward, last):
                batch = collate([(list(e.prompt_ids), list(e.completion_ids)) for e in chunk], pad_id).to(device)
                part_loss = -(token_logps(model, batch) * batch.target_mask).sum() / total
                if pad:
                    part_loss = part_loss * 0.0
                if not last:
                    backward(part_loss)
                    done += 0.0 if pad else float(part_loss.detach())
            if last:
                loss = part_loss + done
        return loss, {"loss": loss.detach()}
    return step


def _completion_tokens(examples: list[NLLExample]) -> int:
    """The NLL loss is a mean over completion tokens: a slice of a batch weighs its share of them."""
    return sum(len(e.completion_ids) for e in examples)


def train_nll(model, examples: list[NLLExample], cfg: TrainConfig, job: Job) -> dict:
    """Train on ``examples`` for ``cfg.epochs``; batches are length-bucketed in an order seeded by ``job.seed``.
    ``cfg.batch_size`` examples make one optimizer step, over all processes together (see ``run_steps``).
    Returns the mean metrics (``nll/loss``, ``nll/steps``, ``nll/examples``)."""
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in examples]
    batches = []
    for epoch in range(cfg.epochs):
        batches += [[examples[i] for i in b] for b in length_buckets(lengths, cfg.batch_size, job.seed + epoch)]
    max_positions, backward = micro_batching(model, job.max_positions, job.accelerator)
    opt = Optim(cfg.lr, cfg.max_grad_norm, cfg.weight_decay, cfg.warmup_steps, cfg.checkpoint_every,
                cfg.checkpoint_minutes)
    hist = run_steps(model, batches, nll_step(job.pad_id, max_positions, backward), opt, job,
                     weight_fn=_completion_tokens, backward=backward)
    m = mean_metrics(hist)
    return {"nll/loss": m.get("loss", float("nan")), "nll/steps": len(hist), "nll/examples": len(examples)}
