"""DPO on (chosen ≻ rejected): reference log-probabilities computed once per round and stored, then the preference
loss named by ``dpo.loss`` (``losses.py``; default sigmoid DPO:
loss = -log σ(β · [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])).

* The reference pass runs once, before training, in inference mode, in length-sorted batches; its summed
  log-probabilities are stored with the pairs (on disk, by the caller), so no reference model is in memory during the
  updates and nothing is recomputed across epochs or after a resume. For a PEFT model the reference is the model with
  its adapter disabled.
* A pair is ONE row: ``[prompt, chosen, rejected]`` with an attention mask under which the rejected tokens do not see
  the chosen ones (``batching.collate_pairs``), so the prompt is computed once for both responses, and chosen and
  rejected of a whole batch go through the model in a single forward pass. Batches group pairs of similar row length
  (little padding); the LM head runs only on the completion window.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sgpo.training.batching import (PairBatch, collate, collate_pairs, default_max_positions, length_buckets, micro_batching,
                       micro_passes, packing_supported, pair_length, pair_logps, pass_context, position_slices,
                       token_logps)
from sgpo.config.schema import DPOConfig
from sgpo.training.losses import LogRatios, preference_loss
from sgpo.training.loop import Job, Optim, mean_metrics, run_steps

LAYOUTS = ("auto", "packed", "stacked")


@dataclass
class TokenPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    improver_prompt_ids: list[int] | None = None  # for the optional improver NLL term: I(x, y_l) → y_w


def resolve_layout(model, pairs: list[TokenPair], layout: str = "auto") -> str:
    """``auto``: the packed layout (prompt computed once per pair) when the model's attention takes it."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}' ({', '.join(LAYOUTS)})")
    if layout != "auto":
        return layout
    longest = max((pair_length(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs), default=0)
    return "packed" if packing_supported(model, longest) else "stacked"


def pair_batch(pairs: list[TokenPair], pad_id: int, layout: str = "packed") -> PairBatch:
    return collate_pairs([(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids)) for p in pairs], pad_id,
                         layout)


def _lengths(pairs: list[TokenPair], layout: str) -> list[int]:
    return [pair_length(p.prompt_ids, p.chosen_ids, p.rejected_ids, layout) for p in pairs]


def _reference_context(model):
    """The reference of a PEFT model is its base model: the adapter disabled."""
    if hasattr(model, "peft_config") and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


@torch.inference_mode()
def reference_logps(model, pairs: list[TokenPair], *, pad_id: int, batch_size: int = 8,
                    show_progress: bool = True, layout: str = "auto", dist=None) -> None:
    """Fill ``ref_chosen``/``ref_rejected`` (summed log-probs) of every pair, batched and length-sorted; a batch whose
    padded rows exceed the position budget (``default_max_positions`` without gradients: none on a CPU) is cut into
    consecutive parts. Under several processes (``dist``: ``sgpo.core.distributed.Dist``) batch k of the plan is scored by rank
    k mod world size and the results are gathered on every rank: each batch is the one a single process scores, so the
    values are too."""
    from tqdm.auto import tqdm

    if not pairs:
        return
    layout = resolve_layout(model, pairs, layout)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = _lengths(pairs, layout)
    order = sorted(range(len(pairs)), key=lambda i: (lengths[i], i))
    budget = default_max_positions(model, training=False)
    rows = 1 if layout == "packed" else 2
    plan = []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        plan += [batch[s] for s in position_slices([rows * lengths[i] for i in batch], budget)]
    shared = dist is not None and dist.active
    mine = plan[dist.rank::dist.world] if shared else plan
    done = []
    try:
        with _reference_context(model):
            for idx in tqdm(mine, desc="reference log-probs", leave=False, disable=not show_progress):
                logp = pair_logps(model, pair_batch([pairs[i] for i in idx], pad_id, layout).to(device))
                done.append((idx, logp.double().cpu().tolist()))
    finally:
        model.train(was_training)
    for idx, logp in (dist.gather(done) if shared else done):
        for k, i in enumerate(idx):
            pairs[i].ref_chosen = logp[k]
            pairs[i].ref_rejected = logp[len(idx) + k]


def micro_batches(pairs: list[TokenPair], layout: str, max_positions: int | None) -> list[list[TokenPair]]:
    """Consecutive slices of ``pairs`` whose padded rows hold at most ``max_positions`` positions (one pair at least)."""
    rows = 1 if layout == "packed" else 2
    lengths = [rows * pair_length(p.prompt_ids, p.chosen_ids, p.rejected_ids, layout) for p in pairs]
    return [pairs[s] for s in position_slices(lengths, max_positions)]


def _log_ratios(logp, part: list[TokenPair]) -> LogRatios:
    """Policy minus reference summed log-probs of a slice's chosen (first half of ``logp``) and rejected sides."""
    m, device, dtype = len(part), logp.device, logp.dtype

    def col(values):
        return torch.tensor(values, dtype=dtype, device=device)

    return LogRatios(logp[:m] - col([p.ref_chosen for p in part]), logp[m:] - col([p.ref_rejected for p in part]),
                     col([len(p.chosen_ids) for p in part]), col([len(p.rejected_ids) for p in part]))


def dpo_step(pad_id: int, cfg: DPOConfig, layout: str = "packed", max_positions: int | None = None, backward=None):
    """The step function of ``run_steps``: (loss, metrics) of a batch of pairs.

    With ``max_positions`` and ``backward``, a batch whose rows exceed ``max_positions`` positions is cut into
    micro-batches (``batching.micro_passes``: under several processes, as many passes as the rank that needs the most,
    padded with zero-weight passes): every pass but the last is back-propagated here (``backward(loss)``, without
    gradient sync) and the returned loss carries the gradient of the last plus the value of the others. Every
    preference loss is a mean of per-pair terms (the NLL term a mean over tokens), so the accumulated gradient is
    exactly the whole batch's; peak activation memory is a slice's. Metrics are computed over the whole batch.
    """
    def step(model, pairs: list[TokenPair], batch: list[TokenPair] | None = None):
        device = next(model.parameters()).device
        n = len(pairs)
        with_nll = cfg.improver_nll_coef > 0 and all(p.improver_prompt_ids for p in pairs)
        nll_tokens = _token_denominator(pairs, pairs if batch is None else batch)
        done, nll_sum, chosen_sum, ratios, loss = 0.0, 0.0, 0.0, [], None   # done: the passes already back-propagated
        for part, pad, last in micro_passes(pairs, lambda ps: micro_batches(ps, layout, max_positions), backward):
            with pass_context(backward, last):
                logp = pair_logps(model, pair_batch(part, pad_id, layout).to(device))
                r = _log_ratios(logp, part)
                part_loss = preference_loss(cfg.loss, r, cfg.beta)[0] * (len(part) / n)
                if with_nll:
                    b = collate([(p.improver_prompt_ids, p.chosen_ids) for p in part], pad_id).to(device)
                    tl = (token_logps(model, b) * b.target_mask).sum()
                    part_loss = part_loss - cfg.improver_nll_coef * tl / max(nll_tokens, 1)
                if pad:  # the same forwards and backward as a real pass, a zero gradient
                    part_loss = part_loss * 0.0
                else:
                    ratios.append(r.detached())
                    chosen_sum += float(logp[:len(part)].detach().sum())   # the chosen sides' log-prob (policy role)
                    nll_sum += float(tl.detach()) if with_nll else 0.0
                if not last:
                    backward(part_loss)
                    done += 0.0 if pad else float(part_loss.detach())
            if last:
                loss = part_loss + done
        _, metrics = preference_loss(cfg.loss, LogRatios.cat(ratios), cfg.beta)
        metrics["nll/chosen"] = torch.tensor(-chosen_sum / max(nll_tokens, 1))
        if with_nll:
            metrics["improver/nll"] = torch.tensor(-nll_sum / max(nll_tokens, 1))
        return loss, metrics
    return step


def _token_denominator(part: list[TokenPair], batch: list[TokenPair]) -> float:
    """What a rank divides its chosen tokens' log-probs by (the improver NLL term, ``nll/chosen``): both are means over
    the chosen tokens of the whole global batch, but ``run_steps`` weighs a rank's loss and metrics by its share of the
    batch's *pairs*; dividing by the batch's tokens times that share makes the sum over ranks the one-process mean,
    however the tokens fall between ranks. One process: the batch's tokens."""
    return max(sum(len(p.chosen_ids) for p in batch) * (len(part) / len(batch)), 1)


def train_dpo(model, pairs: list[TokenPair], cfg: DPOConfig, job: Job, layout: str = "auto") -> dict:
    """DPO over ``pairs`` (their reference log-probs must be filled). Returns the mean of each metric over steps.

    Batches are length-bucketed (sorted by row length, cut, then shuffled by ``job.seed + epoch``); each process's
    slice of a batch runs in micro-batches of at most ``job.max_positions`` positions (not under DeepSpeed).
    """
    if any(p.ref_chosen is None or p.ref_rejected is None for p in pairs):
        raise ValueError("every pair needs reference log-probs: call reference_logps first")
    layout = resolve_layout(model, pairs, layout)
    lengths = _lengths(pairs, layout)
    batches = []
    for epoch in range(cfg.epochs):
        batches += [[pairs[i] for i in b] for b in length_buckets(lengths, cfg.batch_size, job.seed + epoch)]
    max_positions, backward = micro_batching(model, job.max_positions, job.accelerator)
    step = dpo_step(job.pad_id, cfg, layout, max_positions, backward)
    opt = Optim(cfg.lr, cfg.max_grad_norm, checkpoint_every=cfg.checkpoint_every,
                checkpoint_minutes=cfg.checkpoint_minutes)
    hist = run_steps(model, batches, step, opt, job, backward=backward)
    m = mean_metrics(hist)
    out = {("dpo/loss" if k == "loss" else k): v for k, v in m.items()}
    out["dpo/steps"] = len(hist)
    if hist:  # the last step's accuracy says where training ended
        out["rewards/accuracies_last"] = hist[-1]["rewards/accuracies"]
    return out
