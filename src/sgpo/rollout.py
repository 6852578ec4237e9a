"""Rollouts: run the generation engine for records in one role, with per-prompt seeds and on-disk resume.

Roles: ``policy`` answers P(x); ``improver`` rewrites a draft, I(x, y). Each request's seed is derived from
(run seed, round, record id, role), so a response never depends on batch composition, process count or resume point.
Results are appended to a shard (JSONL: id, text, finished) after every batch; a resumed rollout skips them.

Several processes (``dist``): the batches of the fixed plan still to do are dealt out whole, batch k of the plan to
rank k mod world size; after each group of ``world`` batches the results are gathered on every rank and the main
process appends them to the shard in plan order. Every batch is exactly the batch a single process would have run,
so the responses are the same.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from . import templates
from .data import Record
from .generation import Generation, Request, Settings, auto_batch_size, generate, plan_batches
from .runs import Shard


def seed_for(run_seed: int, round_: int, record_id: str, role: str) -> int:
    h = hashlib.sha256(f"{run_seed}|{round_}|{record_id}|{role}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def cut_prompt(ids, max_prompt_tokens: int | None):
    """The last ``max_prompt_tokens`` of a rendered prompt (the end holds the generation prompt, which must stay
    intact). Generation and every training pass on its outputs use the same cut, so log-probabilities are conditioned
    on the context the response was sampled from."""
    if max_prompt_tokens and len(ids) > max_prompt_tokens:
        return ids[len(ids) - max_prompt_tokens:]
    return ids


def build_requests(tokenizer, records: Sequence[Record], role: str, *, run_seed: int, round_: int,
                   drafts: dict[str, str] | None = None, instruction: str | dict[str, str] = "",
                   max_prompt_tokens: int | None = None) -> list[Request]:
    """``drafts`` given: improver mode with ``instruction`` (one string, or one per record id)."""
    reqs = []
    for r in records:
        if drafts is not None:
            text = instruction[r.id] if isinstance(instruction, dict) else instruction
            ids = templates.improver_ids(tokenizer, r.prompt, drafts[r.id], text)
        else:
            ids = templates.policy_ids(tokenizer, r.prompt)
        ids = cut_prompt(ids, max_prompt_tokens)
        reqs.append(Request(tuple(ids), seed_for(run_seed, round_, r.id, role)))
    return reqs


def rollout(model, tokenizer, records: Sequence[Record], role: str, settings: Settings, *, run_seed: int,
            round_: int, drafts: dict[str, str] | None = None, instruction: str | dict[str, str] = "",
            shard: str | Path | None = None, max_prompt_tokens: int | None = None,
            desc: str | None = None, dist=None) -> dict[str, Generation]:
    """Generate one response per record in ``role``; returns {record id: Generation}.

    With ``shard``, finished batches are appended there and a re-run generates only what is missing.
    ``dist`` (a ``sgpo.distributed.Dist``): share the batches among the processes; every rank gets every result.
    """
    reqs = build_requests(tokenizer, records, role, run_seed=run_seed, round_=round_, drafts=drafts,
                          instruction=instruction, max_prompt_tokens=max_prompt_tokens)
    done: dict[str, Generation] = {}
    store = Shard(shard) if shard else None
    if store and (dist is None or dist.is_main):
        for row in store.rows():
            done[row["id"]] = Generation(row["text"], tuple(row.get("token_ids", ())), row["finished"])
    if dist is not None and dist.active:
        done = dist.broadcast(done)
        return _rollout_shared(model, tokenizer, records, reqs, settings, done, store, dist, desc)
    skip = {i for i, r in enumerate(records) if r.id in done}

    def save(indices, gens):
        if store:
            store.append(_row(records[i].id, g) for i, g in zip(indices, gens))

    results = generate(model, tokenizer, reqs, settings, on_batch=save, skip=skip, progress=desc or role)
    out = {}
    for r, g in zip(records, results):
        out[r.id] = g if g is not None else done[r.id]
    return out


def _row(record_id: str, g: Generation) -> dict:
    return {"id": record_id, "text": g.text, "finished": g.finished, "token_ids": list(g.token_ids)}


def _rollout_shared(model, tokenizer, records, reqs, settings: Settings, done: dict, store, dist, desc):
    """The multi-process rollout: whole batches of the fixed plan per rank, gathered after each group."""
    from tqdm.auto import tqdm

    batch_size = settings.batch_size or auto_batch_size(model, reqs, settings)
    todo = [b for b in plan_batches(reqs, batch_size) if not all(records[i].id in done for i in b)]
    bar = tqdm(total=sum(len(b) for b in todo), desc=desc or "generate", unit="seq", leave=False,
               disable=desc is None or not dist.is_main)
    out = dict(done)
    for g0 in range(0, len(todo), dist.world):
        group = todo[g0:g0 + dist.world]
        local = []
        if dist.rank < len(group):
            mine = group[dist.rank]
            gens = generate(model, tokenizer, [reqs[i] for i in mine], settings)  # one batch, as in the plan
            local = list(zip(mine, gens))
        results = sorted(dist.gather(local), key=lambda x: x[0])
        for i, g in results:
            out[records[i].id] = g
        if store:  # only the main process writes (the others' Shard is read-only)
            store.append(_row(records[i].id, g) for i, g in results)
        bar.update(len(results))
    bar.close()
    return {r.id: out[r.id] for r in records}
