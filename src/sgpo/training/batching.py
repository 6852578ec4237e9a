"""Turning token sequences into padded batches, and scoring completions.

Two batch kinds:

* :class:`Batch` (``collate``): one (prompt, completion) sequence per row, LEFT-padded so every completion ends at the
  last position: the LM head then runs only on the last ``K = max completion length + 1`` positions
  (``logits_to_keep``), which skips the vocabulary projection for prompt tokens.
* :class:`PairBatch` (``collate_pairs``): a preference pair per row, its prompt computed ONCE for both responses. The
  row is ``[pad…, prompt, chosen, rejected]`` with a 4-D attention mask under which the rejected tokens see the prompt
  and themselves but not the chosen tokens, and position ids that restart after the prompt for the rejected side. Each
  response is then computed exactly as in its own ``prompt + response`` sequence (same positions, same visible keys),
  with ``len(prompt)`` fewer tokens per pair than two separate sequences. The layout ``"stacked"`` (chosen rows, then
  rejected rows, each a separate sequence) is the fallback for attention kernels that take no 4-D mask.

Log-probabilities are ``logit[target] - logsumexp(logits)`` over the contiguous vocabulary axis, in at least fp32.
"""
from __future__ import annotations

import contextlib
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


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """``seqs``: (prompt_ids, completion_ids) pairs, left-padded; the loss mask covers the completion tokens."""
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
            tmask[i, keep - 1 - len(c):] = 1.0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, mask, pos, targets, tmask, keep)


LSE_CHUNK = 1024  # positions whose log-sum-exp is computed at once (an fp32 copy of that many rows of logits)


def logsumexp_fp32(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last (vocabulary) axis in at least fp32, ``LSE_CHUNK`` positions at a time: low-precision
    logits are never copied to fp32 whole (rows × positions × a 128k vocabulary is tens of GB at paper shapes).

    The reduction runs over the contiguous vocabulary axis: a strided one (``cross_entropy`` on a ``(B, V, K)`` view)
    accumulates a bias of ~1e-4 per token in fp32 with a 49k vocabulary."""
    if logits.dtype in (torch.float32, torch.float64):
        return torch.logsumexp(logits, dim=-1)
    flat = logits.reshape(-1, logits.size(-1))
    out = torch.cat([torch.logsumexp(c.float(), dim=-1) for c in flat.split(LSE_CHUNK)])
    return out.reshape(logits.shape[:-1])


def _completion_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` along the last axis, in at least fp32."""
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    if logits.dtype == torch.float64:
        picked = picked.double()
    return picked - logsumexp_fp32(logits)


def token_logps(model, batch: Batch) -> torch.Tensor:
    """Log-probabilities (B, K-1) of the completion tokens under ``model`` (0 where the mask is 0)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=batch.keep, use_cache=False)
    logp = _completion_logps(out.logits[:, :-1, :], batch.targets)
    return logp * (batch.target_mask > 0)


# -- preference pairs ------------------------------------------------------------------------------------------------

@dataclass
class PairBatch:
    """``B`` pairs scored in one forward pass; sequence ``i`` is chosen ``i`` for ``i < B``, rejected ``i - B`` after."""
    input_ids: torch.Tensor       # (R, T) left-padded rows
    attention_mask: torch.Tensor  # (R, T) for "stacked"; (R, 1, T, T) bool, True = may attend, for "packed"
    position_ids: torch.Tensor    # (R, T)
    keep: int                     # K: logits are computed for the last K positions of every row only
    index: torch.Tensor           # (N,) flat index into the (R, K) logits window of the position predicting ...
    targets: torch.Tensor         # (N,) ... this completion token
    seq: torch.Tensor             # (N,) which of the 2B sequences the token belongs to
    n_pairs: int                  # B
    layout: str                   # "packed" or "stacked"

    @property
    def tokens(self) -> int:
        """Positions computed (padding included)."""
        return self.input_ids.numel()

    def to(self, device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                         self.keep, self.index.to(device), self.targets.to(device), self.seq.to(device),
                         self.n_pairs, self.layout)


def pair_length(prompt: list[int], chosen: list[int], rejected: list[int], layout: str = "packed") -> int:
    """Row length of a pair in ``layout`` (what length bucketing should sort by)."""
    if layout == "packed":
        return len(prompt) + len(chosen) + len(rejected)
    return len(prompt) + max(len(chosen), len(rejected))


def collate_pairs(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int,
                  layout: str = "packed") -> PairBatch:
    """``pairs``: (prompt_ids, chosen_ids, rejected_ids); an empty response scores 0."""
    if layout not in ("packed", "stacked"):
        raise ValueError(f"unknown layout '{layout}' (packed, stacked)")
    if any(not p for p, _, _ in pairs):
        raise ValueError("every pair needs a non-empty prompt")
    B = len(pairs)
    index, targets, seq = [], [], []
    if layout == "stacked":
        rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
        T = max(len(p) + len(c) for p, c in rows)
        K = max(len(c) for _, c in rows) + 1
        ids = torch.full((2 * B, T), pad_id, dtype=torch.long)
        mask = torch.zeros((2 * B, T), dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            n = len(p) + len(c)
            ids[i, T - n:] = torch.tensor(p + c)
            mask[i, T - n:] = 1
            # completion token j sits at row position T-len(c)+j and is predicted one position earlier, which is
            # window position K-1-len(c)+j (the window holds the last K positions)
            first = i * K + K - 1 - len(c)
            index += range(first, first + len(c))
            targets += c
            seq += [i] * len(c)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
    else:
        T = max(len(p) + len(c) + len(r) for p, c, r in pairs)
        K = max(len(c) + len(r) for _, c, r in pairs) + 1
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        mask = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1, 1).view(B, 1, T, T)  # pads see themselves only
        causal = torch.ones((T, T), dtype=torch.bool).tril()
        for i, (p, c, r) in enumerate(pairs):
            P, C, R = len(p), len(c), len(r)
            s = T - P - C - R                  # row start (after the left padding)
            ids[i, s:] = torch.tensor(p + c + r)
            pos[i, s:s + P + C] = torch.arange(P + C)
            pos[i, s + P + C:] = torch.arange(P, P + R)
            m = mask[i, 0]
            m[s:s + P + C, s:s + P + C] = causal[:P + C, :P + C]      # prompt + chosen: causal
            m[s + P + C:, s:s + P] = True                            # rejected sees the prompt ...
            m[s + P + C:, s + P + C:] = causal[:R, :R]                # ... and itself, never the chosen tokens
            w = i * K + K - T                  # flat window index of row position 0
            last_prompt = w + s + P - 1
            if C:
                index += range(last_prompt, last_prompt + C)
                targets += c
                seq += [i] * C
            if R:
                index += [last_prompt] + list(range(w + s + P + C, w + s + P + C + R - 1))
                targets += r
                seq += [B + i] * R
    return PairBatch(ids, mask, pos, K, torch.tensor(index, dtype=torch.long),
                     torch.tensor(targets, dtype=torch.long), torch.tensor(seq, dtype=torch.long), B, layout)


def _config(model):
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP-style wrappers
        model = model.module
    return getattr(model, "config", None)


def packing_supported(model, max_length: int | None = None) -> bool:
    """Whether ``model`` takes the packed layout: a 4-D attention mask (sdpa and eager attention do; FlashAttention
    and flex attention do not), and no sliding window shorter than the rows."""
    cfg = _config(model)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(cfg, "sliding_window", None)
    if isinstance(window, int) and window > 0 and (max_length is None or max_length > window):
        return False
    return True


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def pair_logps(model, batch: PairBatch) -> torch.Tensor:
    """Summed log-probabilities (2B,) of the responses: the B chosen, then the B rejected."""
    mask = batch.attention_mask
    if mask.dim() == 4:  # additive form: works for sdpa and eager attention alike
        dtype = _model_dtype(model)
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    out = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                logits_to_keep=batch.keep, use_cache=False)
    flat = out.logits.reshape(-1, out.logits.size(-1))
    # logsumexp over every kept position (a few are unused), then pick: no (N, V) copy of the logits is made
    picked = flat[batch.index, batch.targets]
    picked = picked.double() if flat.dtype == torch.float64 else picked.float()
    lp = picked - logsumexp_fp32(flat)[batch.index]
    return torch.zeros(2 * batch.n_pairs, dtype=lp.dtype, device=lp.device).index_add(0, batch.seq, lp)


CPU_MAX_POSITIONS = 512
GPU_MAX_POSITIONS = 8192


def default_max_positions(model, training: bool = True) -> int | None:
    """Positions per forward pass. On a CPU (training only): 512, which bounds the activation memory (≈1.5 MB per
    position in fp32 for a 135M model); smaller forwards also stay in cache better (measured on 2 cores, two
    micro-batches of ~500 positions took no longer than one of ~1000); the CPU reference pass is not cut (its
    batches are small). On an accelerator: 8192, in training and in the reference pass. At 8B with gradient
    checkpointing a position costs about 1 MB (the layer inputs kept, 32 × 4096 × 2 bytes; one layer's recomputed
    activations; the kept logits over a 128k vocabulary, 256 KB in bf16), so a micro-batch stays near 8 GB, while an
    uncut batch at the paper's shapes (16 rows of up to 3.5k tokens on one GPU, 64 rows in the reference pass) would
    need 50–200 GB. 8192 positions keep a GPU's matrix units full."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return None
    if device.type == "cpu":
        return CPU_MAX_POSITIONS if training else None
    return GPU_MAX_POSITIONS


class SliceBackward:
    """Back-propagates a micro-batch that is not the last of a process's slice of the batch, scaled like that slice's
    loss (``run_steps`` sets ``scale`` every step: the slice's share of the batch times the number of processes).
    Under several processes ``run_steps`` also sets ``peers``, every rank's slice of the step's batch (each rank holds
    the whole batch), from which ``micro_passes`` gives every rank the same number of passes; the step function runs
    each pass in ``pass_context``. ``model``: the prepared (wrapped) model, set by ``run_steps``."""

    def __init__(self, accelerator=None):
        self.accelerator, self.model, self.scale, self.peers = accelerator, None, 1.0, []

    def __call__(self, loss: torch.Tensor) -> None:
        loss = loss * self.scale if self.scale != 1.0 else loss
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)


def micro_passes(items: list, split, backward) -> list[tuple[list, bool, bool]]:
    """``(micro-batch, pad, last)`` for every forward/backward pass a step function makes over ``items``, a process's
    slice of a batch: the micro-batches ``split(items)`` (all of ``items`` at once without ``backward``). Under several
    processes every rank makes as many passes as the rank whose slice ``split`` cuts the most (``backward.peers``):
    each forward and backward is a collective under FSDP2 (and the last one's under DDP), and ranks making different
    numbers would wait on each other's collectives or sum gradients across the wrong passes. The extra passes are
    pads: ``items``' first row, whose loss the step function multiplies by 0 (a zero gradient for every parameter,
    the same collectives). ``backward``: a ``SliceBackward``, or any callable back-propagating a loss (one process)."""
    if backward is None:
        return [(items, False, True)]
    parts = split(items)
    n = max([len(parts)] + [len(split(s)) for s in getattr(backward, "peers", ())])
    return [(parts[k] if k < len(parts) else items[:1], k >= len(parts), k == n - 1) for k in range(n)]


def pass_context(backward, last: bool):
    """Where a step function runs a micro-batch's forward and backward: every pass but the step's last without gradient
    synchronisation (``no_sync``); the last one's backward (in ``run_steps``) synchronises the sum once. The forward
    is inside too: DDP decides when the forward runs whether its backward all-reduces."""
    accelerator = getattr(backward, "accelerator", None)
    if last or accelerator is None:
        return contextlib.nullcontext()
    return accelerator.no_sync(backward.model)


def micro_batching(model, max_positions: int | None | str, accelerator=None):
    """``(max_positions, backward)`` for a step function: ``auto`` = ``default_max_positions``; ``backward`` (a
    ``SliceBackward``) is None — whole slices — without a limit, or under DeepSpeed, whose engine accumulates
    gradients its own way."""
    from sgpo.core.distributed import is_deepspeed

    if max_positions == "auto":
        max_positions = default_max_positions(model)
    if max_positions and not is_deepspeed(accelerator):
        return max_positions, SliceBackward(accelerator)
    return max_positions, None


def position_slices(lengths: list[int], max_positions: int | None) -> list[slice]:
    """Consecutive slices of a batch whose padded size (rows × longest row) is at most ``max_positions`` (one row at
    least). With length-bucketed batches the rows are about as long as each other, so the slices stay tight."""
    if not max_positions:
        return [slice(0, len(lengths))]
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (i - start + 1) * max(longest, n) > max_positions:
            out.append(slice(start, i))
            start, longest = i, 0
        longest = max(longest, n)
    out.append(slice(start, len(lengths)))
    return out


def length_buckets(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of indices with similar lengths (little padding), in a seeded random order.

    Sorting by length, cutting into batches, then shuffling the batches keeps each batch tight while the order in
    which batches are seen stays random.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches
