"""DPO: sigmoid loss on (chosen ≻ rejected), reference log-probabilities computed once per round and stored.

loss = -log σ(β · [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

Chosen and rejected of a batch go through the model in ONE forward pass (stacked), and the reference pass runs in
inference mode before training, so no reference model is in memory during the updates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batching import collate, length_buckets, token_logps
from .loop import mean_metrics, run_steps


@dataclass
class TokenPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    improver_prompt_ids: list[int] | None = None  # for the optional improver NLL term: I(x, y_l) → y_w


def _stacked(pairs: list[TokenPair], pad_id: int):
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return collate(seqs, pad_id)


@torch.inference_mode()
def reference_logps(model, pairs: list[TokenPair], *, pad_id: int, batch_size: int = 8,
                    show_progress: bool = True) -> None:
    """Fill ``ref_chosen``/``ref_rejected`` (summed log-probs) of every pair, batched and length-sorted."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: lengths[i])
    for s in tqdm(range(0, len(order), batch_size), desc="reference log-probs", leave=False,
                  disable=not show_progress):
        idx = order[s:s + batch_size]
        group = [pairs[i] for i in idx]
        logp = token_logps(model, _stacked(group, pad_id).to(device)).sum(-1).float().cpu()
        for k, i in enumerate(idx):
            pairs[i].ref_chosen = float(logp[k])
            pairs[i].ref_rejected = float(logp[len(idx) + k])
    model.train(was_training)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Sigmoid DPO loss and TRL-named metrics (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margins = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margins).mean()
    metrics = {"loss": loss.detach(), "rewards/chosen": chosen_reward.mean().detach(),
               "rewards/rejected": rejected_reward.mean().detach(), "rewards/margins": margins.mean().detach(),
               "rewards/accuracies": (margins > 0).float().mean().detach()}
    return loss, metrics


def dpo_step(pad_id: int, beta: float, improver_nll_coef: float = 0.0):
    def step(model, pairs: list[TokenPair]):
        device = next(model.parameters()).device
        logp = token_logps(model, _stacked(pairs, pad_id).to(device)).sum(-1)
        n = len(pairs)
        ref_c = torch.tensor([p.ref_chosen for p in pairs], device=device)
        ref_r = torch.tensor([p.ref_rejected for p in pairs], device=device)
        loss, metrics = dpo_loss(logp[:n], logp[n:], ref_c, ref_r, beta)
        if improver_nll_coef > 0 and all(p.improver_prompt_ids for p in pairs):
            b = collate([(p.improver_prompt_ids, p.chosen_ids) for p in pairs], pad_id).to(device)
            tl = token_logps(model, b)
            nll = -(tl * b.target_mask).sum() / b.target_mask.sum().clamp(min=1)
            loss = loss + improver_nll_coef * nll
            metrics["improver/nll"] = nll.detach()
        return loss, metrics
    return step


def train_dpo(model, pairs: list[TokenPair], *, pad_id: int, beta: float, batch_size: int, epochs: int, lr: float,
              seed: int, max_grad_norm: float = 1.0, improver_nll_coef: float = 0.0, accelerator=None,
              desc: str = "dpo", checkpoint_dir=None, checkpoint_every: int = 0) -> dict:
    """DPO over ``pairs`` (their reference log-probs must be filled). Returns the mean of each metric over steps."""
    if any(p.ref_chosen is None or p.ref_rejected is None for p in pairs):
        raise ValueError("every pair needs reference log-probs: call reference_logps first")
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    batches = []
    for epoch in range(epochs):
        batches += [[pairs[i] for i in b] for b in length_buckets(lengths, batch_size, seed + epoch)]
    hist = run_steps(model, batches, dpo_step(pad_id, beta, improver_nll_coef), lr=lr,
                     max_grad_norm=max_grad_norm, accelerator=accelerator, desc=desc,
                     checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    m = mean_metrics(hist)
    out = {("dpo/loss" if k == "loss" else k): v for k, v in m.items()}
    out["dpo/steps"] = len(hist)
    if hist:  # the last step's accuracy says where training ended
        out["rewards/accuracies_last"] = hist[-1]["rewards/accuracies"]
    return out
