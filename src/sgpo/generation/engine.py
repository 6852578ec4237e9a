"""The generation engine: batched sampling with a KV cache, stop at EOS, per-prompt seeds.

One interface, ``generate(model, tokenizer, requests, settings)``; backends slot in behind it. Llama-family models
run on ``sgpo.generation.kv_decoder`` (preallocated KV cache, finished rows leave the batch, shared prompt prefix computed once,
pre-packed weights on CPU); any other causal LM runs through its own forward.
Determinism contract (see the project notes): every request carries its own seed, sampling for a request draws only
from a generator seeded with it, and requests are cut into batches by ``plan_batches`` which depends only on the
requests themselves, never on the number of processes or on where a run was resumed.
"""
from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from sgpo.generation import kv_decoder
from sgpo.models.loading import free_memory


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
    batch_size: int = 16  # 0: the largest batch whose KV cache fits ``kv_cache_mb`` (see ``auto_batch_size``)
    kv_cache_mb: int = 2048
    max_auto_batch: int = 64


def plan_batches(requests: Sequence[Request], batch_size: int) -> list[list[int]]:
    """Indices of ``requests`` grouped into batches of at most ``batch_size``: a fixed plan, a pure function of the
    requests (prompts sorted by length, ties by position), so that a batch holds prompts of similar length and
    little padding. It never depends on the number of processes or on where a run was resumed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(requests)), key=lambda i: (len(requests[i].prompt_ids), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def auto_batch_size(model, requests: Sequence[Request], s: Settings) -> int:
    """The largest batch (at most ``s.max_auto_batch``) whose KV cache for the longest prompt plus ``max_new_tokens``
    fits in ``s.kv_cache_mb``. It depends only on the model's shape, the requests and the settings, so the plan it
    gives is still fixed."""
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    itemsize = next(model.parameters()).element_size()
    longest = max((len(r.prompt_ids) for r in requests), default=1) + s.max_new_tokens
    per_row = 2 * layers * kv_heads * head_dim * itemsize * longest
    return max(1, min(s.max_auto_batch, int(s.kv_cache_mb * 2 ** 20 // per_row)))


def _uniforms(batch: Sequence[Request], steps: int) -> torch.Tensor:
    """``[rows, steps]`` uniform draws in [0, 1): row i comes only from a generator seeded with request i's seed, so a
    request's samples do not depend on which other requests share its batch."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(r.seed)), dtype=torch.float64)
                        for r in batch])


def _sample(logits: torch.Tensor, u: torch.Tensor | None, s: Settings) -> torch.Tensor:
    """One token per row of ``logits`` (``[rows, vocab]``), by inverse-CDF sampling with the row's uniform ``u``.

    Temperature 0 is greedy (argmax). Otherwise the distribution is softmax(logits / temperature), restricted to the
    nucleus of mass ``top_p`` when ``top_p < 1`` (sorting only then).
    """
    if s.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p >= 1.0:
        return _inverse_cdf(probs, u)
    probs, idx = probs.sort(-1, descending=True)
    keep = probs.cumsum(-1) - probs < s.top_p  # the smallest prefix whose mass reaches top_p
    return idx.gather(-1, _inverse_cdf(probs * keep, u).unsqueeze(-1)).squeeze(-1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """For each row, the first index whose cumulative (unnormalised) mass exceeds ``u`` times the row's total.

    Two levels, so that no full-vocabulary scan is sequential: pick the block of ``block`` tokens by the cumulative
    mass of the blocks, then the token inside it. Cumulative sums are in float64. A token of zero mass is never
    returned.
    """
    n, vocab = probs.shape
    nb = -(-vocab // block)
    if nb * block != vocab:
        probs = F.pad(probs, (0, nb * block - vocab))
    blocks = probs.view(n, nb, block)
    cdf = blocks.sum(-1).to(torch.float64).cumsum(-1)  # [n, nb]
    total = cdf[:, -1:]
    x = u.to(device=cdf.device, dtype=torch.float64).view(n, 1) * total
    j = torch.searchsorted(cdf, x, right=True)
    j = torch.minimum(j, (cdf < total).sum(-1, keepdim=True))  # rounding guard: the last block with mass
    before = torch.where(j > 0, cdf.gather(-1, (j - 1).clamp(min=0)), torch.zeros_like(x))
    inner = blocks.gather(1, j.unsqueeze(-1).expand(n, 1, block)).squeeze(1).to(torch.float64).cumsum(-1)
    k = torch.searchsorted(inner, x - before, right=True)
    k = torch.minimum(k, (inner < inner[:, -1:]).sum(-1, keepdim=True))  # the last token with mass in the block
    return (j * block + k).squeeze(-1)


@torch.inference_mode()
def generate_batch(model, tokenizer, batch: Sequence[Request], s: Settings, decoder=None) -> list[Generation]:
    """Generate for one batch. Llama-family models use the KV-cache decoder of ``sgpo.generation.kv_decoder``; other models go
    through their own forward with finished rows emitting padding."""
    if decoder is None and kv_decoder.supports(model):
        decoder = kv_decoder.KVDecoder(model, rows_hint=len(batch))
    if decoder is None:
        eos = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
        u = _uniforms(batch, s.max_new_tokens) if s.temperature > 0 else None
        out, finished = _generate_plain(model, batch, s, eos, pad, u)
        return [Generation(tokenizer.decode(o, skip_special_tokens=True), tuple(o), f)
                for o, f in zip(out, finished)]
    got: list[Generation] = []
    _run_kv(decoder, model, tokenizer, _KVPlan(batch, [list(range(len(batch)))], len(batch), s),
            lambda idx, gens: got.extend(gens))
    return got


MIN_SHARED_PREFIX = 8  # a prompt prefix shared by every request of a call is computed once from this many tokens


@dataclass(frozen=True)
class _KVPlan:
    """What ``_run_kv`` generates: ``batches`` of indices into ``requests`` (in plan order), up to ``width`` sequences
    in flight, with ``settings``."""
    requests: Sequence[Request]
    batches: list[list[int]]
    width: int
    settings: Settings


@dataclass
class _Flight:
    """The sequences in flight in ``_run_kv``: the request index of each live row, the rows' uniforms (when
    sampling) and the logits of each row's next token."""
    rows: list[int]
    u_rows: torch.Tensor
    logits: torch.Tensor | None = None


@torch.inference_mode()
def _run_kv(decoder, model, tokenizer, plan: _KVPlan, deliver: Callable[[list[int], list[Generation]], None]) -> None:
    """Generate the plan's batches (in plan order) keeping up to ``plan.width`` sequences in flight.

    A finished sequence leaves at once and the next request of the plan takes its row (in groups of at least a
    quarter of ``width``, so that prompt passes stay few), so no step decodes padding and the batch does not thin out
    at the end of each plan batch. ``deliver(batch, generations)`` is called as soon as a plan batch is complete.
    Every request samples with its own uniforms (``_uniforms``) and rows are computed independently, so the results
    are those of running each plan batch on its own.
    """
    requests, batches, width, s = plan.requests, plan.batches, plan.width, plan.settings
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    order = [i for b in batches for i in b]
    if not order:
        return
    out: dict[int, list[int]] = {i: [] for i in order}
    finished: dict[int, bool] = {}
    complete = _batch_completer(tokenizer, batches, out, finished, deliver)
    if s.max_new_tokens <= 0:
        for i in order:
            complete(i)
        return
    if width > len(order):  # fewer requests than rows: a cache for the rows that will be used (the same outputs)
        width = len(order)
        plan = replace(plan, width=width)
    _reserve_kv(decoder, [requests[i].prompt_ids for i in order], width, s.max_new_tokens)
    queue = deque(order)
    flight = _Flight(rows=[], u_rows=torch.empty((0, s.max_new_tokens), dtype=torch.float64))
    refill = max(1, width // 4)
    try:
        while queue or flight.rows:
            _refill_rows(decoder, plan, queue, flight, refill, pad)
            _decode_step(decoder, flight, out, finished, eos, s, complete)
    finally:
        decoder.release()


def _batch_completer(tokenizer, batches: list[list[int]], out: dict[int, list[int]], finished: dict[int, bool],
                     deliver: Callable[[list[int], list[Generation]], None]) -> Callable[[int], None]:
    """``complete(i)`` marks request ``i`` done and delivers its plan batch once every request of it is done."""
    left = [len(b) for b in batches]
    batch_of = {i: k for k, b in enumerate(batches) for i in b}

    def complete(i: int) -> None:
        k = batch_of[i]
        left[k] -= 1
        if left[k] == 0:
            deliver(batches[k], [Generation(tokenizer.decode(out[j], skip_special_tokens=True), tuple(out[j]),
                                            finished.get(j, False)) for j in batches[k]])

    return complete


def _reserve_kv(decoder, prompts: Sequence[Sequence[int]], width: int, max_new_tokens: int) -> None:
    """Size the decoder's cache for ``width`` rows of the longest prompt plus ``max_new_tokens``, and compute the
    prompts' shared prefix once when it is long enough (and there is more than one prompt)."""
    decoder.reserve(width, max(len(p) for p in prompts) + max_new_tokens)
    shared = min(_common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
    if shared >= MIN_SHARED_PREFIX and len(prompts) > 1:
        decoder.set_prefix(prompts[0][:shared])


def _refill_rows(decoder, plan: _KVPlan, queue: deque, flight: _Flight, refill: int, pad: int) -> None:
    """Move the next requests of ``queue`` into the free rows (of ``plan.width``): when nothing is in flight, or when at
    least ``refill`` rows (or the whole rest of the queue) can be taken at once. Their prompt logits join ``flight``."""
    requests, s, free = plan.requests, plan.settings, plan.width - len(flight.rows)
    if queue and free and (not flight.rows or free >= min(refill, len(queue))):
        take = [queue.popleft() for _ in range(min(free, len(queue)))]
        new = decoder.add([requests[i].prompt_ids for i in take], pad)
        flight.logits = new if not flight.rows else torch.cat([flight.logits, new])
        flight.rows += take
        if s.temperature > 0:
            flight.u_rows = torch.cat([flight.u_rows, _uniforms([requests[i] for i in take], s.max_new_tokens)])


def _decode_step(decoder, flight: _Flight, out: dict[int, list[int]], finished: dict[int, bool], eos: set[int],
                 s: Settings, complete: Callable[[int], None]) -> None:
    """Sample one token for every live row, complete the rows that are done (EOS or ``max_new_tokens``), drop them
    from the decoder and, while rows remain, run the decoder step that gives the next logits."""
    sampling = s.temperature > 0
    rows = flight.rows
    u = None
    if sampling:
        u = flight.u_rows[torch.arange(len(rows)), torch.tensor([len(out[i]) for i in rows])]
    nxt = _sample(flight.logits, u, s)
    done = _record_tokens(nxt.tolist(), rows, out, finished, eos, s.max_new_tokens)
    for j in done:
        complete(rows[j])
    if done:
        kept = decoder.drop(done)
        flight.rows = [rows[j] for j in kept]
        sel = torch.tensor(kept, dtype=torch.long)
        nxt = nxt[sel.to(nxt.device)]
        if sampling:
            flight.u_rows = flight.u_rows[sel]
    if flight.rows:
        flight.logits = decoder.step(nxt)


def _record_tokens(tokens: list[int], rows: list[int], out: dict[int, list[int]], finished: dict[int, bool],
                   eos: set[int], max_new_tokens: int) -> list[int]:
    """Append each live row's token to its request's output (EOS marks it finished instead); the positions of the
    rows that are now done."""
    done = []
    for j, tok in enumerate(tokens):
        i = rows[j]
        if tok in eos:
            finished[i] = True
            done.append(j)
        else:
            out[i].append(tok)
            if len(out[i]) >= max_new_tokens:
                done.append(j)
    return done


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for other in seqs[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def _generate_plain(model, batch, s: Settings, eos: set[int], pad: int, u):
    """Any causal LM through its own forward: left padding, its KV cache, finished rows keep emitting pad."""
    device = next(model.parameters()).device
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    out: list[list[int]] = [[] for _ in batch]
    done = [False] * len(batch)
    finished = [False] * len(batch)
    past = {}
    cache_kw = _cache_kwarg(model)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, step_pos = ids, pos
    for t in range(s.max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **past)
        past = {cache_kw: res.past_key_values}
        nxt = _sample(res.logits[:, -1, :], u[:, t] if u is not None else None, s)
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tok in eos:
                done[i] = finished[i] = True
            else:
                out[i].append(tok)
        if all(done):
            break
        step_ids = nxt.unsqueeze(-1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=device)], dim=1)
    return out, finished


def generate(model, tokenizer, requests: Sequence[Request], s: Settings,
             on_batch: Callable[[list[int], list[Generation]], None] | None = None,
             skip: set[int] | None = None, progress: str | None = None) -> list[Generation | None]:
    """Generate for all ``requests`` following ``plan_batches``.

    ``on_batch(indices, generations)`` is called for every batch as soon as it is complete (used to append results
    to disk; with the KV-cache decoder, sequences of the next batches fill the rows that finished ones free, so a
    short batch can complete before a longer one planned earlier); batches whose indices are all in ``skip`` are not
    generated (resume) and give ``None`` entries. ``s.batch_size`` is the number of sequences in flight; 0 picks it
    from the KV-cache budget (``auto_batch_size``).
    """
    from tqdm.auto import tqdm

    results: list[Generation | None] = [None] * len(requests)
    batch_size = s.batch_size if s.batch_size > 0 else auto_batch_size(model, requests, s)
    batches = plan_batches(requests, batch_size)
    todo = [b for b in batches if not (skip and all(i in skip for i in b))]
    bar = tqdm(total=sum(len(b) for b in todo), desc=progress or "generate", disable=progress is None,
               unit="seq", leave=False)
    was_training = model.training
    model.eval()

    def deliver(b: list[int], gens: list[Generation]) -> None:
        for i, g in zip(b, gens):
            results[i] = g
        if on_batch:
            on_batch(b, gens)
        bar.update(len(b))

    try:
        if todo and kv_decoder.supports(model):
            # built once per call (packed weights are a snapshot: the model may be trained between calls)
            decoder = kv_decoder.KVDecoder(model, rows_hint=batch_size)
            _run_kv(decoder, model, tokenizer, _KVPlan(requests, todo, batch_size, s), deliver)
        else:
            for b in todo:
                deliver(b, generate_batch(model, tokenizer, [requests[i] for i in b], s))
    finally:
        bar.close()
        model.train(was_training)
        decoder = None
        free_memory()  # the KV cache and packed weights are gone: hand their pages back before the next phase
    return results


def _cache_kwarg(model) -> str:
    """The name under which this transformers version takes the KV cache (``cache`` in newer releases)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (cfg_eos, tokenizer.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(e)
    return ids
