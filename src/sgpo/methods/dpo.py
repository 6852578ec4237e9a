"""Offline DPO: a fixed preference set, made or read once, reference model = π_0 in every round.

prepare (once) builds ``prepare/preference.jsonl``, as many pairs as the rounds will use (rounds × round_size):
- ``data.preference`` set: an external prompt/chosen/rejected dataset (a file or an HF dataset name such as
  UltraFeedback), shuffled with ``data.split_seed``. A response longer than the response-token limit is cut at a
  sentence boundary and marked unfinished (no EOS is trained after it; ``pairs.require_finished`` decides whether
  such pairs are kept).
- empty (the offline default): chosen = the SFT reference, rejected = the pre-rounds model's (π_0's, after SFT)
  own answer to the same prompt, generated once, on the prompts the rounds use (the shard keeps its first name,
  ``prepare/start_answers.jsonl``). This is a single off-policy pass with π_0 as reference,
  which makes it close to SPIN's first round (SPIN then regenerates with the current model in later rounds).
Round t trains on the t-th slice of that set, so every method gets the same number of pairs per round.
"""
from __future__ import annotations

import random

from sgpo.generation.engine import Generation
from sgpo.methods.pairs import Pair
from sgpo.core.files import read_jsonl, write_jsonl
from sgpo.methods.base import NO_IMPROVER_TRAINING, Context, Method, Reference

PREFERENCE_FILE = "preference.jsonl"


class DPO(Method):
    name = "dpo"
    ignores = {"dpo.reference": "its reference is the pre-rounds model", **NO_IMPROVER_TRAINING}

    def reference(self, cfg) -> Reference:
        return Reference.INITIAL

    def before_rounds(self, ctx: Context) -> None:
        ctx.run_stage("prepare", lambda: self.prepare(ctx))

    def prepare(self, ctx: Context) -> dict:
        cfg = ctx.cfg
        n = cfg.rounds * cfg.data.round_size
        if cfg.data.preference:
            pairs = self._external(ctx, n)
        else:
            pairs = self._offline(ctx)
        write_jsonl(ctx.path("prepare", PREFERENCE_FILE), [p.to_json() for p in pairs])
        return {"dpo/preference_pairs": len(pairs), "dpo/preference_external": int(bool(cfg.data.preference))}

    def _external(self, ctx: Context, n: int) -> list[Pair]:
        cfg, s = ctx.cfg, ctx.session
        records, _ = s.load(cfg.data.preference, need="preference",
                            **{**cfg.data.read_options(), "split": cfg.data.preference_split})
        order = list(range(len(records)))
        random.Random(cfg.data.split_seed).shuffle(order)
        limit = max(cfg.data.max_reference_tokens, cfg.generation.max_new_tokens)
        out = []
        for i in order[:n]:
            r = records[i]
            sides = []
            for text in (r.chosen, r.rejected):  # a side cut to the limit is unfinished (no EOS trained after it)
                cut = s.cut(text, limit)
                sides.append(Generation(cut, (), cut == text.strip()))
            out.append(Pair.of(r, *sides, source=cfg.data.preference))
        return out

    def _offline(self, ctx: Context) -> list[Pair]:
        flat = [r for recs in ctx.plan for r in recs if r.reference]
        unique = list({r.id: r for r in flat}.values())
        answers = ctx.rollout("policy", unique, name="start_answers")
        return [Pair.of(r, r.reference, answers[r.id], source="start_model", chosen="reference", rejected="start_model")
                for r in flat]

    def make_pairs(self, ctx: Context) -> list[Pair]:
        pool = [Pair.from_json(d) for d in read_jsonl(ctx.path("prepare", PREFERENCE_FILE))]
        if not pool:
            return []
        size = ctx.cfg.data.round_size
        start = (ctx.round - 1) * size
        out = []
        for i in range(min(size, len(pool))):
            p = pool[(start + i) % len(pool)]
            p.meta = {**p.meta, "round": ctx.round}
            out.append(p)
        return out
