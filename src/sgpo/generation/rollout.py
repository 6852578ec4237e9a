"""Rollouts: run the generation engine for records in one role, with per-prompt seeds and on-disk resume.

Roles: ``policy`` answers P(x); ``improver`` rewrites a draft, I(x, y). Each request's seed is derived from
(run seed, round, record id, role), so a response never depends on batch composition, process count or resume point.
Results are appended to a shard (JSONL: id, text, finished) after every batch; a resumed rollout skips them.

Several processes (``dist``): the batches of the fixed plan still to do are dealt out whole, batch k of the plan to
rank k mod world size; after each group of ``world`` batches the results are gathered on every rank and the main
process appends them to the shard in plan order. Every batch is exactly the batch a single process would have run,
so the responses are the same. With vLLM every process runs an engine of its own, kept for the whole run, and the
unit dealt out is a vLLM call (consecutive whole batches, a fixed plan: ``vllm_backend.plan_calls``), since vLLM's
samples may depend on the requests generated together.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from sgpo.models import templates
from sgpo.config.schema import GenerationConfig
from sgpo.data.records import Record
from sgpo.generation.engine import Generation, Request, Settings, auto_batch_size, generate, plan_batches
from sgpo.core.text import normalise
from sgpo.core.files import Shard
from sgpo.core.phases import phase

log = logging.getLogger("sgpo")


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


class SamplerPart(Protocol):
    """What a run asks of its sampler — ``Sampler``, and the dry run's ``CountingSampler``
    (``tests/run/test_protocols.py`` holds both to it): every generation goes through ``rollout`` and ``rewrite`` (as
    ``Sampler`` documents them); ``identity`` keys the answer cache, ``dist`` is the process group that cache is shared
    in, ``instruction`` the improver's (the gates look for its markers), ``engine`` the run's vLLM engine (None: none)
    and ``close`` ends it."""

    instruction: str
    dist: Any
    engine: Any

    def identity(self) -> list: ...

    def rollout(self, model, records: Sequence[Record], role: str, round_: int, *,
                drafts: dict[str, str] | None = None, shard: str | Path | None = None) -> dict[str, Generation]: ...

    def rewrite(self, model, records: Sequence[Record], drafts: dict[str, str], round_: int, *, role: str = "improver",
                shard_dir: str | Path | None = None, samples: int = 1) -> dict[str, Generation]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Sampler:
    """What every rollout of a run shares: the tokenizer, the ``generation`` config section, the run seed, the input
    cut, the improver instruction, the process group, the backend. ``rollout`` is the one way the recipe generates.

    ``backend`` is ``engine`` (``engine.generate`` on the model object) or ``vllm`` (``vllm_backend.generate`` on
    a checkpoint directory: pass its path; a model object is saved to a temporary directory first). ``engine``: the
    run's ``vllm_backend.Engine``, kept across rollouts (``close`` ends it); without one every rollout starts an
    engine of its own with ``vllm_options`` (dtype, device, GPU memory share) and shuts it down."""
    tokenizer: Any
    gen: GenerationConfig
    seed: int
    max_prompt_tokens: int | None = None
    instruction: str = ""
    dist: Any = None
    backend: str = "engine"
    vllm_options: dict | None = None
    engine: Any = None

    def close(self) -> None:
        """Shut the run's vLLM engine down (its worker and vLLM's processes); nothing to do without one."""
        if self.engine is not None:
            self.engine.close()

    def _engine(self, **extra):
        """A context with the engine a rollout uses: the run's (left running), else one for this rollout only."""
        from sgpo.generation import vllm_backend

        if self.engine is not None:
            return contextlib.nullcontext(self.engine)
        return vllm_backend.Engine({**(self.vllm_options or {}), **extra})

    def identity(self) -> list:
        """What decides this sampler's samples, for cache keys: the settings, the seed and, when not the engine, the
        backend (vLLM samples differently; the engine's keys are those of earlier versions)."""
        return [self.settings().__dict__, self.seed] + ([self.backend] if self.backend != "engine" else [])

    def settings(self) -> Settings:
        g = self.gen
        return Settings(g.max_new_tokens, g.temperature, g.top_p, g.batch_size)

    def requests(self, records: Sequence[Record], role: str, round_: int,
                 drafts: dict[str, str] | None = None) -> list[Request]:
        """``drafts`` given: improver mode, I(x, y) with ``instruction`` (a ``{reference}`` in it is filled with the
        record's reference); else policy mode, P(x). Inputs longer than ``max_prompt_tokens`` keep their end."""
        reqs, cut = [], []
        for r in records:
            if drafts is not None:
                ids = templates.improver_ids(self.tokenizer, r.prompt, drafts[r.id], self.instruction, r.reference)
            else:
                ids = templates.policy_ids(self.tokenizer, r.prompt)
            if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
                cut.append(len(ids) - self.max_prompt_tokens)
            reqs.append(Request(tuple(cut_prompt(ids, self.max_prompt_tokens)), seed_for(self.seed, round_, r.id, role)))
        if cut:
            log.info("%s: %d of %d inputs longer than data.max_prompt_tokens=%d lost their start (by %d tokens on "
                     "average, at most %d)", role, len(cut), len(records), self.max_prompt_tokens,
                     round(sum(cut) / len(cut)), max(cut))
        return reqs

    @phase("generation")
    def rollout(self, model, records: Sequence[Record], role: str, round_: int, *,
                drafts: dict[str, str] | None = None, shard: str | Path | None = None) -> dict[str, Generation]:
        """One response per record in ``role``; returns {record id: Generation}.

        With ``shard``, finished batches are appended there and a re-run generates only what is missing. Under
        several processes (``dist``) the batches are shared among them; every rank gets every result.
        """
        reqs = self.requests(records, role, round_, drafts)
        done: dict[str, Generation] = {}
        store = Shard(shard) if shard else None
        desc = f"{Path(shard).parent.name}: {Path(shard).stem}" if shard else role
        if store and (self.dist is None or self.dist.is_main):
            for row in store.rows():
                done[row["id"]] = generation_of(row)
        shared = self.dist is not None and self.dist.active
        if shared:
            done = self.dist.broadcast(done)
            if self.backend != "vllm":
                return self._rollout_shared(model, records, reqs, done, store, desc)
        skip = {i for i, r in enumerate(records) if r.id in done}

        def save(indices, gens):
            if store:
                store.append(_row(records[i].id, g) for i, g in zip(indices, gens))

        if self.backend == "vllm":
            results = self._vllm_shared(model, records, reqs, skip, store) if shared else self._vllm(model, reqs, save,
                                                                                                     skip)
        else:
            results = generate(model, self.tokenizer, reqs, self.settings(), on_batch=save, skip=skip, progress=desc)
        return {r.id: g if g is not None else done[r.id] for r, g in zip(records, results)}

    def _vllm(self, model, reqs: list[Request], save, skip: set[int]) -> list[Generation | None]:
        """vLLM on ``model``: a checkpoint path, or a model object saved to a temporary directory for the call."""
        from sgpo.generation import vllm_backend

        with self._engine() as engine:
            if isinstance(model, (str, Path)):
                return vllm_backend.generate(model, self.tokenizer, reqs, self.settings(), on_batch=save, skip=skip,
                                             engine=engine)
            with tempfile.TemporaryDirectory(prefix="sgpo-snapshot-") as tmp:
                model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
                return vllm_backend.generate(tmp, self.tokenizer, reqs, self.settings(), on_batch=save, skip=skip,
                                             engine=engine)

    def _vllm_shared(self, checkpoint, records, reqs: list[Request], skip: set[int], store) -> list:
        """One vLLM engine per process, on its own GPU or its own share of the cores: the rollout's calls
        (``vllm_backend.plan_calls``) dealt out, call k to rank k mod world size. After each group of ``world`` calls
        the answers are gathered on every rank and the main process appends them to the shard (those of a partly saved
        call that it has already are left out); a process that fails says so in the next gather and every process
        raises there (none waits for answers that will never come)."""
        from sgpo.generation import vllm_backend

        if not isinstance(checkpoint, (str, Path)):
            raise TypeError("under several processes vLLM generates from a checkpoint folder, not a model object")
        dist, s = self.dist, self.settings()
        opts = self.vllm_options or {}
        calls = vllm_backend.plan_calls(reqs, s, skip, int(opts.get("min_call", vllm_backend.MIN_CALL)))
        results: list = [None] * len(reqs)
        gathered = []

        def group(done: list, error: str | None = None) -> None:
            gathered.append(len(done))
            mine = [(i, g) for batch, gens in done for i, g in zip(batch, gens) if i not in skip]
            rows = dist.gather([(error, mine)])
            failed = [e for e, _ in rows if e]
            if failed:
                raise PeerFailed(failed[0])
            for i, g in _saved([x for _, items in rows for x in items], records, store):
                results[i] = g

        error = None
        try:
            with self._engine(slot=dist.slot, progress=dist.is_main) as engine:
                vllm_backend.generate_calls(checkpoint, self.tokenizer, reqs, s, calls[dist.rank::dist.world],
                                            on_call=group, engine=engine)
        except PeerFailed:
            raise
        except Exception as e:  # noqa: BLE001 - told to every process at the next gather, then raised here
            error = f"process {dist.rank}: {type(e).__name__}: {e}"
        while len(gathered) < -(-len(calls) // dist.world):  # this process's share is done (or failed): it still
            group([], error)                                    # takes part in every group's gather
        if not dist.all_agree(error is None):
            raise vllm_backend.BackendError(error or "vLLM failed on another process")
        return results

    def rewrite(self, model, records: Sequence[Record], drafts: dict[str, str], round_: int, *, role: str = "improver",
                shard_dir: str | Path | None = None, samples: int = 1) -> dict[str, Generation]:
        """The improver's rewrite of every draft; with ``samples`` > 1, a rewrite equal to its draft (after
        whitespace normalisation) is sampled again, up to ``samples`` tries in all, and the first that differs is kept
        (no judge involved). Shards: ``<shard_dir>/<role>.jsonl`` (``-`` written ``_``), then ``<role>1.jsonl`` …"""
        def shard(name):
            return Path(shard_dir) / f"{name.replace('-', '_')}.jsonl" if shard_dir is not None else None

        out = self.rollout(model, records, role, round_, drafts=drafts, shard=shard(role))
        for k in range(1, samples):
            same = [r for r in records if normalise(out[r.id].text) == normalise(drafts[r.id])]
            if not same:
                break
            more = self.rollout(model, same, f"{role}{k}", round_, drafts=drafts, shard=shard(f"{role}{k}"))
            out.update({r.id: more[r.id] for r in same if normalise(more[r.id].text) != normalise(drafts[r.id])})
        return out

    def _rollout_shared(self, model, records, reqs, done: dict, store, desc):
        """The multi-process rollout: whole batches of the fixed plan per rank, gathered after each group."""
        from tqdm.auto import tqdm

        tokenizer, settings, dist = self.tokenizer, self.settings(), self.dist
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
            results = _saved(dist.gather(local), records, store)
            for i, g in results:
                out[records[i].id] = g
            bar.update(len(results))
        bar.close()
        return {r.id: out[r.id] for r in records}


class PeerFailed(RuntimeError):
    """Another process's vLLM failed (its message); every process stops at the same gather."""


def _saved(answers: list, records, store) -> list:
    """A group's gathered (request index, Generation) pairs in index order, appended to the shard (only the main
    process writes: the others' Shard is read-only)."""
    answers = sorted(answers, key=lambda x: x[0])
    if store:
        store.append(_row(records[i].id, g) for i, g in answers)
    return answers


def generation_of(row: dict) -> Generation:
    """A shard row back as a Generation (what ``_row`` wrote)."""
    return Generation(row["text"], tuple(row.get("token_ids", ())), row["finished"])


def _row(record_id: str, g: Generation) -> dict:
    return {"id": record_id, "text": g.text, "finished": g.finished, "token_ids": list(g.token_ids)}
