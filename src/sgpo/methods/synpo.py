"""SynPO's response improver (Dong et al. 2024), without its prompt generator: a SEPARATE improver model.

prepare (once): drafts y0 ~ π_0(P(x)) on the improver slice; a copy of π_0 is trained, in improver mode, to turn
each draft into its SFT reference (the full jump I(x, y0) → y*); it is saved as ``prepare/improver_model`` and never
trained again. The policy's own weights never learn the improver role.

Round t: y ~ π_t(P(x)); chosen = R(I(x, y)), the separate improver's refinement of it; rejected = y' ~ π_0(P(x)), the
initial model's answer to the same prompt (in round 1, where π_t = π_0, that is y itself); reference model = π_t.
Pairs accumulate: round t trains on its new pairs and on every pair kept in rounds 1..t-1 (their reference
log-probabilities are recomputed under π_t).
"""
from __future__ import annotations

import dataclasses
import math

from .. import templates
from ..files import read_jsonl, write_jsonl
from ..improver.targets import examples_from_draft, nll_example
from ..pairs import Pair
from .base import Context, Method

IMPROVER_DIR = "improver_model"


class SynPO(Method):
    name = "synpo"
    trains_improver = False
    runs_sft = False
    has_rounds = True
    has_prepare = True
    self_improving = False

    def reference(self, cfg) -> str:
        return "round_start"

    # -- once: the separate improver R ----------------------------------------------------------------------------
    def prepare(self, ctx: Context) -> dict:
        cfg, tok = ctx.cfg, ctx.tokenizer
        records = [r for r in ctx.records if r.reference]
        drafts = ctx.rollout("draft", records, name="improver_drafts")
        full_jump = dataclasses.replace(cfg.improver, target="reference")
        examples = []
        for r in records:
            examples += examples_from_draft(r.id, drafts[r.id].text, r.reference, full_jump)
        write_jsonl(ctx.path("prepare", "improver_examples.jsonl"), [e.__dict__ for e in examples])
        by_id = {r.id: r for r in records}
        nll = [nll_example(tok, by_id[e.record_id], e, ctx.session.sampler.instruction) for e in examples]
        # a separate copy of π_0 (the policy is not touched), trained like every other training call
        m = ctx.train_separate(nll, "synpo: separate improver", ctx.path("prepare", IMPROVER_DIR))
        return {**m, "improver/train_examples": len(examples)}

    # -- every round ----------------------------------------------------------------------------------------------
    def make_pairs(self, ctx: Context) -> list[Pair]:
        records = ctx.records
        drafts = ctx.rollout("policy", records, name="policy")
        texts = {i: g.text for i, g in drafts.items()}
        improver = ctx.load_model(ctx.path("prepare", IMPROVER_DIR))
        refined = ctx.rollout("improver", records, name="improver", drafts=texts, model=improver)
        del improver
        initial = ctx.initial()
        if initial is ctx.model:
            rejected = drafts
        else:
            rejected = ctx.rollout("initial-policy", records, name="initial_policy", model=initial)
        del initial
        new = [Pair(record_id=r.id, prompt=templates.policy_messages(r.prompt), chosen=refined[r.id].text,
                    rejected=rejected[r.id].text, chosen_finished=refined[r.id].finished,
                    rejected_finished=rejected[r.id].finished,
                    meta={"round": ctx.round, "chosen": "separate_improver(policy)", "rejected": "initial_policy"})
               for r in records]
        return self.earlier_pairs(ctx) + new

    @staticmethod
    def earlier_pairs(ctx: Context) -> list[Pair]:
        """The pairs kept in round t-1 (which already hold those of earlier rounds), reference log-probs cleared."""
        if ctx.round <= 1:
            return []
        path = ctx.path(f"round_{ctx.round - 1}", "pairs.jsonl")
        if not path.exists():
            raise FileNotFoundError(f"synpo accumulates pairs over rounds but {path} is missing")
        out = []
        for d in read_jsonl(path):
            p = Pair.from_json(d)
            p.ref_chosen_logp = p.ref_rejected_logp = None
            out.append(p)
        return out

    # -- dry runs ------------------------------------------------------------------------------------------------
    def plan_prepare(self, cfg) -> dict:
        n = cfg.data.improver_size
        return {"generations": n, "sft_examples": n,
                "sft_steps": math.ceil(n / cfg.train.batch_size) * cfg.train.epochs,
                "what": "separate improver: π_0 drafts → SFT references (full jump)"}

    def plan_round(self, cfg, t: int) -> dict:
        n = cfg.data.round_size
        return {"generations": n * (2 if t == 1 else 3), "pairs": n * t}
