"""The recipe, top to bottom: data → (SFT) → improver training → rounds of self-generated pairs + DPO → final.

``run`` is the stage list; ``improver_stage`` and ``round_stage`` are SGPO itself (SGPO.md, steps 1 and 2). Every
stage reads and writes the run directory, is recorded in its manifest and skipped when a re-run finds it done
(``runs.Stages``); generation resumes from its shards, training from its checkpoints. A baseline method
(``methods/``) only says how its pairs are made and which model is their reference.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from . import distributed, held_out
from .config import Config
from .data import Record
from .eval.winrate import format_metric
from .files import atomic_write_json, read_jsonl, set_writer, write_jsonl
from .improver.targets import examples_from_draft, nll_example
from .methods import Context, Method, get_method
from .gates import Gates, TemplateMarkers
from .models import resolve
from .pairs import (Pair, candidate_metrics, filter_pairs, judge_agreement, pair_metrics, save_round, saved_round,
                    verify)
from .runs import open_run
from .session import Session
from .splits import Splits, prepare_splits

log = logging.getLogger("sgpo")


def run(cfg: Config, out_dir: str | Path, *, force_restart: bool = False) -> dict:
    """Run the whole recipe into ``out_dir`` (resuming what is there). Returns the summary figures.
    Under ``accelerate launch`` every process runs this; only the main one writes (see ``sgpo.distributed``)."""
    dist = distributed.setup(cfg.model.device)
    set_writer(dist.is_main)
    s = None
    try:
        s = Session(cfg, open_run(out_dir, cfg, force_restart, dist), dist)
        torch.manual_seed(cfg.seed)
        return run_stages(s, get_method(cfg.method), prepare_splits(cfg, s.tokenizer))
    finally:
        if s is not None:
            s.trackers.close()
        set_writer(True)


def run_stages(s: Session, method: Method, data: Splits) -> dict:
    """The stage list. Each ``run_stage(name, fn, inputs, model)`` runs ``fn`` unless the stage is done."""
    cfg, stages = s.cfg, s.stages
    log.info("model: %s | method: %s | %d training prompts, %d development prompts | %d rounds",
             cfg.model.name, cfg.method, len(data.train), len(data.dev), cfg.rounds if method.has_rounds else 0)
    # 0. the start model on the development prompts: the yardstick for every later model
    last = stages.run_stage("round_0", lambda: s.dev_figures(data.dev, None), inputs=data.dev)
    start_dev = start_answers(s)
    # 1. optional SFT on the references (a method without rounds gets its final figures here)
    if cfg.sft or method.runs_sft:
        sft = data.sft if method.has_rounds else data.seen(cfg.sft)  # SFT alone: the prompts the others see
        last = stages.run_stage("sft", lambda: {**s.train_nll(s.policy_examples(sft), "sft", cfg.seed),
                                                **(s.dev_figures(data.dev, start_dev) if not method.has_rounds
                                                   else {})}, inputs=data.train, model=s)
    # 2. improver training: the same weights learn to refine their own drafts
    if method.trains_improver:
        last = stages.run_stage("improver", lambda: {**improver_stage(s, data.improver),
                                                     **s.dev_figures(data.dev, start_dev)},
                                inputs=data.improver, model=s)
    initial_path = s.model_path
    # 2b. the method's one-off preparation (a separate improver, an offline preference set)
    if method.has_prepare:
        ctx = Context(s, "prepare", 0, data.improver, initial_path, data.rounds)
        stages.run_stage("prepare", lambda: method.prepare(ctx))
    # 3. rounds of preference pairs + DPO
    for t, records in enumerate(data.rounds if method.has_rounds else [], 1):
        last = stages.run_stage(f"round_{t}", lambda: {**round_stage(s, method, t, records, initial_path),
                                                       **s.dev_figures(data.dev, start_dev, improver=False)},
                                inputs=records, model=s)
    # 4. the final model, and the numbers that matter: start, pre-rounds and final models on the test prompts
    if not s.run.done("final"):
        with s.run.stage("final"):
            s.save("final")
    reported, pre_rounds = {}, initial_path if method.has_rounds and data.rounds else None
    if data.test:
        reported = stages.run_stage("test", lambda: test_stage(s, data.test, pre_rounds), inputs=data.test)
        if cfg.eval.second_judge:
            reported = {**reported, **stages.run_stage("test_second_judge", lambda: second_judge_stage(s, data.test),
                                                       inputs=data.test)}
    return finish(s, {**last, **reported})


def improver_stage(s: Session, records: list[Record]) -> dict:
    """Improver training (SGPO step 1): the model drafts y0 ~ π(P(x)); each (y0, y*) gives targets a step towards the
    reference (``improver/targets.py``); the same weights learn I(x, y) → target, mixed with policy examples
    P(x) → y* that keep the policy role (``improver.mix_policy`` per improver example)."""
    cfg, ic = s.cfg, s.cfg.improver
    examples = []
    for k in range(ic.experimental.drafts_per_prompt):
        n = str(k or "")
        drafts = s.sampler.rollout(s.generator, records, "draft" + n, 0, shard=s.run.path("improver", f"drafts{n}.jsonl"))
        for r in records:
            examples += examples_from_draft(r.id, drafts[r.id].text, r.reference, ic)
    write_jsonl(s.run.path("improver", "examples.jsonl"), [e.__dict__ for e in examples])
    by_id = {r.id: r for r in records}
    nll = [nll_example(s.tokenizer, by_id[e.record_id], e, s.sampler.instruction) for e in examples]
    rng = random.Random(cfg.seed)
    policy = [records[rng.randrange(len(records))] for _ in range(round(ic.mix_policy * len(nll)))] if records else []
    m = s.train_nll(nll + s.policy_examples(policy), "improver training", cfg.seed + 1)
    return {**m, "improver/train_examples": len(examples), "improver/policy_examples": len(policy)}


def round_stage(s: Session, method: Method, t: int, records: list[Record], initial_path: str) -> dict:
    """Round t (SGPO step 2): the policy drafts y_l ~ π_t(P(x)); the same weights rewrite it, y_w ~ π_t(I(x, y_l));
    the gates drop degenerate pairs; the reference model scores both sides once; DPO on (y_w ≻ y_l) gives π_{t+1}.
    A baseline makes its pairs in ``methods/<name>.py`` instead; all the rest is the same."""
    cfg, stage = s.cfg, f"round_{t}"
    pairs, m = saved_round(s.run.path(stage))  # a resumed round reuses its gated, scored pairs
    if pairs is None:
        if method.self_improving:
            drafts = s.sampler.rollout(s.generator, records, "policy", t, shard=s.run.path(stage, "policy.jsonl"))
            texts = {r.id: drafts[r.id].text for r in records}
            rewrites = s.sampler.rewrite(s.generator, records, texts, t, shard_dir=s.run.path(stage),
                                         samples=cfg.improver.experimental.rewrite_samples)
            candidates = [Pair.of(r, rewrites[r.id], drafts[r.id], round=t) for r in records]
        else:
            candidates = method.make_pairs(Context(s, stage, t, records, initial_path))
        gates = Gates(TemplateMarkers.of(s.sampler.instruction), cfg.pairs.require_finished)
        refs = {r.id: r.reference for r in records if r.reference}
        pairs, dropped = filter_pairs(candidates, gates, refs)
        write_jsonl(s.run.path(stage, "candidates.jsonl"), [p.to_json() for p in candidates])  # with their verdicts
        pairs, dropped["not_verified"] = verify(pairs, cfg.pairs.verify)
        m = {**candidate_metrics(candidates, gates.markers, refs), **pair_metrics(pairs, dropped),
             **pair_agreement(s, pairs, refs)}
        s.reference_pass(pairs, method.reference(cfg), initial_path)
        save_round(s.run.path(stage), pairs, m)
    log.info("round %d: %d pairs kept, dropped %s", t, len(pairs),
             {k.split("/")[-1]: v for k, v in m.items() if k.startswith("pairs/dropped/") and v})
    if not pairs:
        log.warning("round %d: no pairs passed the gates; the model is unchanged this round", t)
        return m
    return {**m, **s.train_dpo(pairs, f"round {t}: dpo", cfg.seed + 100 * t)}


def pair_agreement(s: Session, pairs: list[Pair], refs: dict[str, str]) -> dict:
    """How often a judge that did not select the pairs prefers their chosen side: ``pairs/judge_agreement`` (the
    second judge) and, when the improver never saw the references (reading A), ``pairs/judge_agreement_reference``.
    ``refs``: the round's SFT references by record id."""
    with s.second_judge() as judge:
        m = judge_agreement(pairs, judge)
    # the reference judge, when the pairs have references (not so for an external preference set) that the improver
    # never saw (reading A), and it did not select the pairs
    if (all(p.record_id in refs for p in pairs) and not s.cfg.improver.sees_reference
            and s.cfg.pairs.verify != s.cfg.eval.judge):
        m.update({k.replace("pairs/judge_agreement", "pairs/judge_agreement_reference"): v
                  for k, v in judge_agreement(pairs, s.judge, refs).items()})
    return m


def test_stage(s: Session, test: list[Record], pre_rounds_path: str | None) -> dict:
    """The start model (answers cached by its hash), the pre-rounds model and the final model answer the test
    prompts with the same seeds; the run's judge compares final with the other two (``held_out.py``). One model is
    in memory at a time."""
    s.unload()
    gens = {"start": held_out.answers(s, test, "start", resolve(s.cfg.model.name), cached=True)}
    if pre_rounds_path is not None:
        gens["pre_rounds"] = held_out.answers(s, test, "pre_rounds", pre_rounds_path)
    gens["final"] = held_out.answers(s, test, "final", s.model_path)
    texts = {label: {i: g.text for i, g in x.items()} for label, x in gens.items()}
    name = held_out.judge_name(s.cfg.eval.judge)
    m = {**held_out.answer_figures(gens), **held_out.versus(s.judge, name, test, texts)}
    log.info("test: %s", held_out.summary_line(m, name))
    return m


def second_judge_stage(s: Session, test: list[Record]) -> dict:
    """The same comparisons as ``test_stage``, judged by ``eval.second_judge`` (a separate stage: its own time)."""
    texts = held_out.saved_answers(s.run.path("test"))
    name = held_out.judge_name(s.cfg.eval.second_judge)
    s.unload()  # the answers are saved: the policy need not sit beside the judge's model
    with s.second_judge() as judge:
        m = held_out.versus(judge, name, test, texts)
    log.info("test: %s", held_out.summary_line(m, name))
    return m


def start_answers(s: Session) -> dict[str, str] | None:
    """The start model's answers to the development prompts (``round_0``), the other side of every head-to-head."""
    path = s.run.path("round_0", "dev_policy.jsonl")
    return {row["id"]: row["text"] for row in read_jsonl(path)} if path.exists() else None


def finish(s: Session, last: dict) -> dict:
    """``summary.json`` (the test-split figures, and the last stage's eval/ and improver/ figures), the final line of
    the log, the report."""
    summary = {k: v for k, v in last.items() if k.startswith("eval/") or k.startswith("improver/")}
    atomic_write_json(s.run.path("summary.json"), summary)
    key = "eval/dev/win_rate_vs_start"
    if key in summary:
        log.info("final vs start, head-to-head on held-out development prompts (judge: %s): %s",
                 s.cfg.eval.judge, format_metric(summary, key))
    if s.dist.is_main:
        from .model_card import write_card
        from .report import write_report

        for what, write in (("report", write_report), ("model card", write_card)):
            try:
                write(s.run.root)
            except Exception as e:  # a report problem must not fail a finished run
                log.warning("%s not written: %s", what, e)
    s.dist.barrier()
    return summary
