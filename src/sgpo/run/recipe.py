"""The recipe, top to bottom, the same for every method: data → (SFT) → the method's own stages → rounds of
preference pairs + DPO → final model → test figures.

A method (``methods/``) says only what differs: how a round makes its pairs, which model is their reference, which
stages run before the rounds (SGPO's improver training: ``methods/sgpo.py``, ``methods/improver.py``). Every stage reads and writes the
run directory, is recorded in its manifest and skipped when a re-run finds it done (``stages.Stages``); generation
resumes from its shards, training from its checkpoints. The parts a stage uses are in ``session.py``; a dry run walks
this same code with parts that count the work instead (``dry_run.py``).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import torch

from sgpo.core import distributed
from sgpo.eval import held_out
from sgpo.core import phases
from sgpo.config import schema as config_mod
from sgpo.config.schema import Config
from sgpo.data.records import Record
from sgpo.eval.preflight import check_run_judges, run_finished
from sgpo.eval.winrate import format_metric
from sgpo.core.files import RunError, atomic_write_json, read_jsonl, set_writer, write_jsonl
from sgpo.methods.gates import Gates, TemplateMarkers
from sgpo.methods.base import Context, Method, Reference, get_method, warn_ignored
from sgpo.methods.pairs import (Pair, candidate_metrics, filter_pairs, judge_agreement, pair_metrics, save_round, saved_round,
                    score_metrics, verify)
from sgpo.run.stages import RunDir, open_run
from sgpo.run.session import Session, open_session
from sgpo.data.splits import Splits, prepare_splits

log = logging.getLogger("sgpo")


def run(cfg: Config, out_dir: str | Path, *, force_restart: bool = False, sft_from: Sequence[Path] = ()) -> dict:
    """Run the whole recipe into ``out_dir`` (resuming what is there). Returns the summary figures. ``sft_from``:
    other runs whose SFT stage this one may take instead of training the same SFT again (``reusable_sft``).
    Under ``accelerate launch`` every process runs this; only the main one writes (see ``sgpo.core.distributed``)."""
    dist = distributed.setup(cfg.model.device, cfg.collective_timeout_minutes)
    set_writer(dist.is_main)
    phases.PROFILE.reset()  # this run's times and peak only, when the process ran another before (sgpo compare)
    s = None
    try:
        run_dir = open_run(out_dir, cfg, force_restart, dist)
        if not run_finished(run_dir, cfg):  # every judge answers before the first stage (a finished run asks none)
            check_run_judges(cfg, dist)
        s = open_session(cfg, run_dir, dist)
        s.sft_from = [Path(p) for p in sft_from]
        torch.manual_seed(cfg.seed)
        return finish(s, run_stages(s, get_method(cfg.method), prepare_splits(cfg, s.tokenizer)))
    finally:
        if s is not None:
            s.close()
        set_writer(True)


def sft_step(s: Session, records: list[Record], data: Splits) -> dict:
    """Supervised fine-tuning: NLL on (P(x) → y*) for ``records``, the current model — or the model of another run
    that trained exactly this SFT (``reusable_sft``), taken as this stage's."""
    donor = reusable_sft(s, records, data)
    if donor is None:
        return s.trainer.train_nll(s.trainer.policy_examples(records), "sft", s.cfg.seed)
    s.policy.adopt(str(donor.path("sft", "model")))
    m = {k: v for k, v in donor.metrics("sft").items() if not k.startswith(("time/", "memory/", "eval/", "improver/"))}
    log.info("sft: the same SFT was trained by %s (same start model, data, SFT settings, seed and prompts, and its "
             "inputs hash alike): its model taken instead of training again", donor.root)
    return {**m, "sft/reused": 1}


SFT_READS = ("model", "data", "train", "seed", "sft")
"""The config sections and keys an SFT stage's model depends on (besides the code and its inputs)."""


def _sft_reads(cfg: Config) -> dict:
    return {k: v for k, v in config_mod.to_dict(cfg).items() if k in SFT_READS}


def reusable_sft(s: Session, records: list[Record], data: Splits) -> RunDir | None:
    """The first of ``s.sft_from`` whose SFT stage is done with the same inputs (the chain of stage inputs, which
    covers the seed, the development and training prompts) under the same ``SFT_READS``, on the same prompts in the
    same order (``Method.sft_prompts`` of either run's method: method sft trains on more, unless ``data.sft_size`` is
    0 and both train on the whole pool; ``records``: this run's); never under several processes or in a dry run."""
    if not s.sft_from or s.dist.world > 1 or s.tokenizer is None:
        return None
    mine = [r.id for r in records]
    for d in s.sft_from:
        try:
            donor, other = RunDir(d, writer=False), config_mod.load(str(d / "config.yaml"), [])
        except (OSError, ValueError, RunError, config_mod.ConfigError):
            continue
        if (donor.done("sft", s.stages.chain[-1]) and _sft_reads(other) == _sft_reads(s.cfg)
                and _sft_ids(other, data) == mine and donor.path("sft", "model", "config.json").exists()):
            return donor
    return None


def _sft_ids(cfg: Config, data: Splits) -> list[str]:
    """The ids, in training order, of the prompts ``cfg.method`` trains SFT on (the same data and splits: the caller
    checked the data settings and the inputs' chain alike)."""
    return [r.id for r in get_method(cfg.method).sft_prompts(data, cfg) or []]


def run_stages(s: Session, method: Method, data: Splits) -> dict:
    """The stage list; returns the test figures and the last stage's. ``s.stage(name, fn, inputs, model)`` runs ``fn``
    unless the stage is done."""
    cfg, rounds = s.cfg, method.rounds(data)
    log.info("model: %s | method: %s | %d training prompts, %d development prompts | %d rounds",
             cfg.model.name, cfg.method, len(data.train), len(data.dev), len(rounds))
    warn_ignored(method, cfg)  # a setting this method never reads is said so, once
    # 0. the start model on the development prompts: the yardstick for every later model
    s.dev = data.dev
    last = s.stage("round_0", s.dev_figures, inputs=data.dev)
    s.start_dev = start_answers(s)
    # 1. SFT on the references (a method without rounds gets its final figures here)
    sft = method.sft_prompts(data, cfg)
    if sft is not None:
        last = s.stage("sft", lambda: {**sft_step(s, sft, data), **({} if rounds else s.dev_figures())},
                       inputs=data.train, model=True)
    # 2. the method's own stages before the rounds (SGPO: the same weights learn to refine their own drafts)
    last = method.before_rounds(Context(s, "", 0, data.improver, plan=rounds)) or last
    initial = s.policy.path
    # 3. rounds of preference pairs + DPO
    for t, records in enumerate(rounds, 1):
        ctx = Context(s, f"round_{t}", t, records, initial, rounds)
        last = s.stage(ctx.stage, lambda: {**round_stage(ctx, method), **s.dev_figures(improver=False)},
                       inputs=records, model=True)
    # 4. the final model, and the numbers that matter: start, pre-rounds and final models on the test prompts
    if not s.run.done("final"):
        phases.PROFILE.stage = "final"
        with s.run.stage("final"):
            s.policy.save("final")
    reported = {}
    if data.test:
        reported = s.stage("test", lambda: test_stage(s, data.test, initial if rounds else None), inputs=data.test)
        if cfg.eval.second_judge:
            reported = {**reported, **s.stage("test_second_judge", lambda: second_judge_stage(s, data.test),
                                              inputs=data.test)}
    return {**last, **reported}


def round_stage(ctx: Context, method: Method) -> dict:
    """Round t: the method makes its candidate pairs; the gates drop degenerate ones (``pairs.verify``: and those its
    judge does not prefer); the reference model scores both sides once; DPO on (chosen ≻ rejected) gives π_{t+1}."""
    s, cfg, t = ctx.session, ctx.cfg, ctx.round
    pairs, m = saved_round(ctx.path(ctx.stage))  # a resumed round reuses its gated, scored pairs
    if pairs is None:
        candidates = method.make_pairs(ctx)
        gates = Gates(TemplateMarkers.of(s.sampler.instruction), cfg.pairs.require_finished)
        refs = {r.id: r.reference for r in ctx.records if r.reference}
        rows = {r.id: r.row() for rs in (*ctx.plan, ctx.records) for r in rs}  # SynPO's pairs span rounds
        pairs, dropped = filter_pairs(candidates, gates, refs)
        write_jsonl(ctx.path(ctx.stage, "candidates.jsonl"), [p.to_json() for p in candidates])  # with verdicts
        with s.evaluator.one_use(cfg.pairs.verify) as judge:
            pairs, dropped["not_verified"] = verify(pairs, judge, refs, rows)
        m = {**candidate_metrics(candidates, gates.markers, refs), **pair_metrics(pairs, dropped),
             **pair_agreement(s, pairs, refs, rows), **score_metrics(s.evaluator.scorer, candidates, rows)}
        initial = method.reference(cfg) is Reference.INITIAL
        s.trainer.reference_pass(pairs, ctx.initial_path if initial else s.policy.path)
        save_round(ctx.path(ctx.stage), pairs, m)
    log.info("round %d: %d pairs kept, dropped %s", t, len(pairs),
             {k.split("/")[-1]: v for k, v in m.items() if k.startswith("pairs/dropped/") and v})
    if not pairs:
        log.warning("round %d: no pairs passed the gates; the model is unchanged this round", t)
        return m
    return {**m, **s.trainer.train_dpo(pairs, f"round {t}: dpo", cfg.seed + 100 * t)}


def pair_agreement(s: Session, pairs: list[Pair], refs: dict[str, str], rows: dict[str, dict]) -> dict:
    """How often a judge that did not select the pairs prefers their chosen side: ``pairs/judge_agreement`` (the
    second judge) and, when the improver never saw the references (reading A), ``pairs/judge_agreement_reference``.
    ``refs``: the round's SFT references by record id. At most ``eval.agreement_size`` pairs are judged (a fixed
    sample: the pairs of the lowest id hashes), enough for a CI of a few points at a bounded cost."""
    size = s.cfg.eval.agreement_size
    if len(pairs) > size:
        pairs = sorted(pairs, key=lambda p: hashlib.sha256(p.record_id.encode()).hexdigest())[:size]
    with s.evaluator.second_judge() as judge:
        m = judge_agreement(pairs, judge, refs, rows)
    # the reference judge, when the pairs have references (not so for an external preference set) that the improver
    # never saw (reading A), and it did not select the pairs
    if (all(p.record_id in refs for p in pairs) and not s.cfg.improver.sees_reference
            and s.cfg.pairs.verify != s.cfg.eval.judge and s.evaluator.scorer is None):
        m.update({k.replace("pairs/judge_agreement", "pairs/judge_agreement_reference"): v
                  for k, v in judge_agreement(pairs, s.evaluator.judge, refs, rows).items()})
    return m


def test_stage(s: Session, test: list[Record], pre_rounds_path: str | None) -> dict:
    """The start model, the pre-rounds model and the final model answer the test prompts with the same seeds; the
    run's judge compares final with the other two (``held_out.py``). The first two are cached by the model's hash: the
    methods of a comparison share a start model, and those whose SFT came out the same a pre-rounds model. One model
    is in memory at a time."""
    s.policy.unload()
    ev = s.evaluator
    gens = {"start": ev.answers(test, "start", s.policy.start_path, cached=True)}
    if pre_rounds_path is not None:
        gens["pre_rounds"] = ev.answers(test, "pre_rounds", pre_rounds_path, cached=True)
    gens["final"] = ev.answers(test, "final", s.policy.path)
    texts = {label: {i: g.text for i, g in x.items()} for label, x in gens.items()}
    name = held_out.judge_name(s.cfg.eval.judge)
    m = {**held_out.answer_figures(gens), **held_out.versus(ev.judge, name, test, texts)}
    log.info("test: %s", held_out.summary_line(m, name))
    return m


def second_judge_stage(s: Session, test: list[Record]) -> dict:
    """The same comparisons as ``test_stage``, judged by ``eval.second_judge`` (a separate stage: its own time)."""
    texts = held_out.saved_answers(s.run.path("test"))
    name = held_out.judge_name(s.cfg.eval.second_judge)
    s.policy.unload()  # the answers are saved: the policy need not sit beside the judge's model
    with s.evaluator.second_judge() as judge:
        m = held_out.versus(judge, name, test, texts)
    log.info("test: %s", held_out.summary_line(m, name))
    return m


def start_answers(s: Session) -> dict[str, str] | None:
    """The start model's answers to the development prompts (``round_0``), the other side of every head-to-head."""
    path = s.run.path("round_0", "dev_policy.jsonl")
    return {row["id"]: row["text"] for row in read_jsonl(path)} if path.exists() else None


def engine_counts(s: Session) -> dict:
    """This process's vLLM engine in this invocation: the engines started (one for the run; a resumed run starts its
    own) and the checkpoints whose weights were loaded into the running engine. Zero with the built-in engine."""
    engine = getattr(s.sampler, "engine", None)
    m = {"generation/vllm_engine_starts": engine.starts if engine else 0,
         "generation/vllm_weight_loads": engine.loads if engine else 0}
    if engine:
        log.info("vllm: %d engine start(s) and %d weight load(s) in this process", engine.starts, engine.loads)
    return m


def finish(s: Session, last: dict) -> dict:
    """``summary.json`` (the test-split figures, and the last stage's eval/ and improver/ figures), the final line of
    the log, the report."""
    summary = {k: v for k, v in last.items() if k.startswith("eval/") or k.startswith("improver/")}
    spent = phases.totals({st: s.run.metrics(st) for st in s.run.manifest["stages"] if st != "final"})
    summary.update({f"time/total/{p}_s": round(v, 1) for p, v in spent.items()})
    if spent:
        log.info("time by phase, all stages: %s", ", ".join(f"{p} {v:.0f}s" for p, v in spent.items()))
    phases.PROFILE.note_peak("other")
    here = round(phases.PROFILE.peak_bytes / 1e9, 2)
    log.info("peak memory (RSS) of this process: %.2f GB, reached in %s", here, phases.PROFILE.peak_at)
    stages = [s.run.metrics(st).get(f"memory/{st}/peak_rss_gb", 0) for st in s.run.manifest["stages"]]
    summary["memory/peak_rss_gb"] = max([here, *stages])  # a resumed run's earlier stages ran in other processes
    summary.update(engine_counts(s))
    atomic_write_json(s.run.path("summary.json"), summary)
    key = "eval/dev/win_rate_vs_start"
    if key in summary:
        log.info("final vs start, head-to-head on held-out development prompts (judge: %s): %s",
                 s.cfg.eval.judge, format_metric(summary, key))
    if s.dist.is_main:
        from sgpo.run.model_card import write_card
        from sgpo.run.report import write_report

        for what, write in (("report", write_report), ("model card", write_card)):
            try:
                write(s.run.root)
            except Exception as e:  # a report problem must not fail a finished run
                log.warning("%s not written: %s", what, e)
    s.dist.barrier()
    return summary
