"""Rollouts: run the generation engine for records in one role, with per-prompt seeds and on-disk resume.

Roles: ``policy`` answers P(x); ``improver`` rewrites a draft, I(x, y). Each request's seed is derived from
(run seed, round, record id, role), so a response never depends on batch composition, process count or resume point.
Results are appended to a shard (JSONL: id, text, finished) after every batch; a resumed rollout skips them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from . import templates
from .data import Record
from .generation import Generation, Request, Settings, generate
from .runs import Shard


def seed_for(run_seed: int, round_: int, record_id: str, role: str) -> int:
    h = hashlib.sha256(f"{run_seed}|{round_}|{record_id}|{role}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


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
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            ids = ids[len(ids) - max_prompt_tokens:]  # keep the end: the generation prompt must stay intact
        reqs.append(Request(tuple(ids), seed_for(run_seed, round_, r.id, role)))
    return reqs


def rollout(model, tokenizer, records: Sequence[Record], role: str, settings: Settings, *, run_seed: int,
            round_: int, drafts: dict[str, str] | None = None, instruction: str | dict[str, str] = "",
            shard: str | Path | None = None, max_prompt_tokens: int | None = None,
            desc: str | None = None) -> dict[str, Generation]:
    """Generate one response per record in ``role``; returns {record id: Generation}.

    With ``shard``, finished batches are appended there and a re-run generates only what is missing.
    """
    reqs = build_requests(tokenizer, records, role, run_seed=run_seed, round_=round_, drafts=drafts,
                          instruction=instruction, max_prompt_tokens=max_prompt_tokens)
    done: dict[str, Generation] = {}
    store = Shard(shard) if shard else None
    if store:
        for row in store.rows():
            done[row["id"]] = Generation(row["text"], tuple(row.get("token_ids", ())), row["finished"])
    skip = {i for i, r in enumerate(records) if r.id in done}

    def save(indices, gens):
        if store:
            store.append({"id": records[i].id, "text": g.text, "finished": g.finished,
                          "token_ids": list(g.token_ids)} for i, g in zip(indices, gens))

    results = generate(model, tokenizer, reqs, settings, on_batch=save, skip=skip, progress=desc or role)
    out = {}
    for r, g in zip(records, results):
        out[r.id] = g if g is not None else done[r.id]
    return out
