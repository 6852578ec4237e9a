"""The recipe, top to bottom: data → (SFT) → improver → rounds of self-generated pairs + DPO → final → figures.

Every stage reads and writes the run directory, is recorded in its manifest, and is skipped when a re-run finds it
done; generation resumes from its shards. The method (``cfg.method``) only says how pairs are made and which model
is the reference.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from . import config as config_mod
from . import distributed, templates
from .config import Config
from .data import Record, cut_reference, load_records, split_dev
from .eval.improver import improver_figures
from .eval.judges import make_judge
from .eval.winrate import format_win_rate, win_rate
from .generation import Settings
from .improver import GUIDED_INSTRUCTION, examples_from_draft, nll_example
from .improver_eval import resample_copies
from .methods import Context, get_method, has_prepare
from .models import load_model, load_tokenizer, resolve
from .pairs import Pair, filter_pairs, pair_metrics
from .rollout import cut_prompt, rollout
from .runs import (RunDir, RunError, atomic_dir, atomic_write_json, atomic_write_text, content_hash, is_writer,
                   read_jsonl, set_writer, write_jsonl)
from .training.adapters import trainable
from .training.dpo import TokenPair, reference_logps, train_dpo
from .training.loop import exported_weights
from .training.sft import NLLExample, train_nll

log = logging.getLogger("sgpo")


@dataclass
class Prepared:
    train: list[Record]     # the training pool (references cut to the token limit)
    dev: list[Record]       # held out: improver figures and head-to-head evaluation


def prepare_data(cfg: Config, tokenizer) -> Prepared:
    records, report = load_records(cfg.data.sft, split=cfg.data.split, on_error=cfg.data.on_error,
                                   need="reference")
    log.info("data: %s", report.summary())
    cut = [Record(r.id, r.prompt, cut_reference(r.reference, tokenizer, cfg.data.max_reference_tokens))
           for r in records]
    kept, skipped = [], 0
    for r in cut:
        n = len(templates.policy_ids(tokenizer, r.prompt))
        if n > cfg.data.max_prompt_tokens and cfg.data.on_long_prompt == "skip":
            skipped += 1
            continue
        kept.append(r)
    if skipped:
        log.warning("data: skipped %d prompts longer than data.max_prompt_tokens=%d", skipped,
                    cfg.data.max_prompt_tokens)
    train, dev = split_dev(kept, cfg.data.dev_size, cfg.data.split_seed)
    if cfg.data.prompts:
        extra, rep = load_records(cfg.data.prompts, split=cfg.data.split, on_error=cfg.data.on_error)
        log.info("round prompts: %s", rep.summary())
        dev_ids = {r.id for r in dev}
        train = [r for r in extra if r.id not in dev_ids]
    return Prepared(train, dev)


def take(pool: list[Record], start: int, n: int) -> list[Record]:
    """``n`` records from ``pool`` starting at ``start``, wrapping around a small pool."""
    if not pool or n <= 0:
        return []
    return [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]


class Runner:
    """Holds what the stages share: config, run directory, tokenizer, the current model (loaded lazily)."""

    def __init__(self, cfg: Config, run: RunDir, dist: distributed.Dist | None = None):
        self.cfg = cfg
        self.run = run
        self.dist = dist or distributed.Dist(None)
        # under a launcher every process uses the device the launcher gave it
        self.device = str(self.dist.device) if self.dist.accelerator is not None else cfg.model.device
        self.stage_name = "train"  # the stage now running (training checkpoints go into its folder)
        self.tokenizer = load_tokenizer(cfg.model.name)
        self.start_path = resolve(cfg.model.name)
        self.model_path = self.start_path
        self._model = None
        self._judge = None
        g = cfg.generation
        self.settings = Settings(g.max_new_tokens, g.temperature, g.top_p, g.batch_size)

    # -- model state ---------------------------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.model_path, device=self.device, dtype=self.cfg.model.dtype)
        return self._model

    def checkpoint(self, stage: str) -> str:
        return str(self.run.path(stage, "model"))

    def resume_from(self, stage: str) -> None:
        """The stage is done: the current model is its checkpoint (loaded when needed)."""
        self.model_path, self._model = self.checkpoint(stage), None

    def save(self, stage: str, model=None) -> None:
        """Save the model as the stage's checkpoint atomically (main process only; the others wait).
        ``final/`` holds the model itself, every other stage keeps it in ``<stage>/model``."""
        path = self.run.path(stage) if stage == "final" else self.run.path(stage, "model")
        with atomic_dir(path) as tmp:
            if is_writer():
                model = model or self.model
                model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        self.dist.barrier()
        self.model_path = str(path)

    def checkpoint_dir(self, desc: str) -> Path:
        """Resumable training checkpoints of one training call of the running stage."""
        return self.run.path(self.stage_name, "checkpoints", re.sub(r"[^A-Za-z0-9_.-]+", "_", desc).strip("_"))

    def after_training(self, checkpoint_dir: Path) -> None:
        """Sharded training (FSDP/DeepSpeed) leaves the weights split across ranks: continue from their export."""
        if self.dist.sharded:
            self.model_path, self._model = str(exported_weights(checkpoint_dir)), None

    @property
    def judge(self):
        if self._judge is None:
            self._judge = make_judge(self.cfg.eval.judge)
        return self._judge

    def rollout(self, stage: str, round_: int, role: str, records, *, name: str, drafts=None, model=None,
                instruction=None):
        return rollout(model or self.model, self.tokenizer, records, role, self.settings, run_seed=self.cfg.seed,
                       round_=round_, drafts=drafts,
                       instruction=self.cfg.improver.instruction if instruction is None else instruction,
                       shard=self.run.path(stage, f"{name}.jsonl"), max_prompt_tokens=self.cfg.data.max_prompt_tokens,
                       desc=f"{stage}: {name}", dist=self.dist)

    # -- training helpers --------------------------------------------------------------------------------------
    def nll_examples_policy(self, records: list[Record]) -> list[NLLExample]:
        tok = self.tokenizer
        return [NLLExample(tuple(templates.policy_ids(tok, r.prompt)),
                           tuple(templates.completion_ids(tok, r.reference)), "policy") for r in records]

    def trainable(self):
        """The current model as training sees it: with a fresh LoRA adapter (merged afterwards) when configured."""
        mc = self.cfg.model
        return trainable(self.model, lora_r=mc.lora_r, lora_alpha=mc.lora_alpha, lora_dropout=mc.lora_dropout,
                         gradient_checkpointing=mc.gradient_checkpointing)

    def train_nll(self, examples, desc: str, seed: int) -> dict:
        t = self.cfg.train
        # the inputs the model sees when it generates: longer prompts are cut like the rollouts cut them; uncut, one
        # long request can take tens of GB in a training step
        limit = self.cfg.data.max_prompt_tokens
        examples = [dataclasses.replace(e, prompt_ids=tuple(cut_prompt(e.prompt_ids, limit))) for e in examples]
        ckpt = self.checkpoint_dir(desc)
        with self.trainable() as model:
            m = train_nll(model, examples, pad_id=self.tokenizer.pad_token_id, batch_size=t.batch_size,
                      epochs=t.epochs, lr=t.lr, seed=seed, warmup_steps=t.warmup_steps,
                          weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, desc=desc,
                          accelerator=self.dist.accelerator, checkpoint_dir=ckpt, checkpoint_every=t.checkpoint_every)
        self.after_training(ckpt)
        return m


def _figures_on_dev(r: Runner, stage: str, dev: list[Record], start_dev: dict | None, round_: int) -> dict:
    """Dev-slice figures of the current model: head-to-head vs the start model, and the improver's figures."""
    cfg = r.cfg
    m: dict = {}
    n = max(cfg.eval.head_to_head_size, cfg.eval.improver_size)
    recs = dev[:n]
    if not recs:
        return m
    drafts = r.rollout(stage, 0, "dev-policy", recs, name="dev_policy")
    if start_dev is not None and cfg.eval.head_to_head_size:
        h = recs[:cfg.eval.head_to_head_size]
        prefs = r.judge.prefer([x.prompt_text for x in h], [drafts[x.id].text for x in h],
                               [start_dev[x.id] for x in h], [x.reference for x in h])
        w = win_rate(prefs)
        m.update({"eval/dev/win_rate_vs_start": w["win_rate"], "eval/dev/win_rate_vs_start_ci_low": w["ci_low"],
                  "eval/dev/win_rate_vs_start_ci_high": w["ci_high"], "eval/dev/win_rate_vs_start_n": w["n"]})
    m["eval/dev/length"] = sum(len(drafts[x.id].text.split()) for x in recs) / len(recs)
    if cfg.eval.improver_size:
        imp = recs[:cfg.eval.improver_size]
        texts = {x.id: drafts[x.id].text for x in imp}
        rewrites = r.rollout(stage, 0, "dev-improver", imp, name="dev_improver", drafts=texts)
        if cfg.improver.rewrite_samples > 1:  # the same procedure as the rounds' pairs (no judge involved)
            rewrites = resample_copies(r.model, r.tokenizer, imp, texts, rewrites, r.settings,
                                       instruction=cfg.improver.instruction, seed=cfg.seed,
                                       samples=cfg.improver.rewrite_samples, round_=0,
                                       shard=lambda name: r.run.path(stage, f"dev_{name}.jsonl"),
                                       max_prompt_tokens=cfg.data.max_prompt_tokens, role="dev-improver")
        m.update(improver_figures(r.judge, [x.prompt_text for x in imp], [texts[x.id] for x in imp],
                                  [rewrites[x.id].text for x in imp], [x.reference for x in imp]))
    return m


def _improver_stage(r: Runner, records: list[Record]) -> dict:
    """Improver training: draft with the current model, build targets a step towards the references, train the same
    weights on (improver input → target), mixed with policy examples (prompt → reference) that keep the policy role."""
    cfg, tok = r.cfg, r.tokenizer
    ic = cfg.improver
    stage = "improver"
    examples = []
    for k in range(ic.drafts_per_prompt):
        suffix = "" if k == 0 else str(k)
        drafts = r.rollout(stage, 0, "draft" + suffix, records, name="drafts" + suffix)
        revisions = {}
        if ic.target == "guided":
            instr = {x.id: GUIDED_INSTRUCTION.replace("{reference}", x.reference) for x in records}
            revisions = r.rollout(stage, 0, "guided" + suffix, records, name="guided" + suffix,
                                  drafts={i: g.text for i, g in drafts.items()}, instruction=instr)
        for x in records:
            rev = revisions[x.id].text if x.id in revisions else None
            examples += examples_from_draft(x.id, drafts[x.id].text, x.reference, ic.target, ic.step, ic.chain, rev,
                                            ic.guided_min_gain, ic.guided_min_overlap, ic.split_blocks)
    write_jsonl(r.run.path(stage, "examples.jsonl"), [e.__dict__ for e in examples])
    by_id = {x.id: x for x in records}
    nll = [nll_example(tok, by_id[e.record_id].prompt, e, ic.instruction, ic.changed_weight) for e in examples]
    n_policy = round(ic.mix_policy * len(nll))
    rng = random.Random(cfg.seed)
    policy_recs = [records[rng.randrange(len(records))] for _ in range(n_policy)] if records else []
    nll += r.nll_examples_policy(policy_recs)
    m = r.train_nll(nll, "improver training", cfg.seed + 1)
    m.update({"improver/train_examples": len(examples), "improver/policy_examples": len(policy_recs)})
    return m


def _pairs_to_tokens(r: Runner, pairs: list[Pair], improver_drafts: bool) -> list[TokenPair]:
    """Token pairs for the reference pass and DPO; prompts are cut as the rollouts that sampled the responses cut
    them (``data.max_prompt_tokens``)."""
    tok, cfg = r.tokenizer, r.cfg
    limit = cfg.data.max_prompt_tokens
    out = []
    for p in pairs:
        prompt = tuple((m["role"], m["content"]) for m in p.prompt)
        out.append(TokenPair(
            cut_prompt(templates.render(tok, p.prompt), limit),
            templates.completion_ids(tok, p.chosen, eos=p.chosen_finished),
            templates.completion_ids(tok, p.rejected, eos=p.rejected_finished),
            p.ref_chosen_logp, p.ref_rejected_logp,
            cut_prompt(templates.improver_ids(tok, prompt, p.rejected, cfg.improver.instruction), limit)
            if improver_drafts else None))
    return out


def _context(r: Runner, stage: str, t: int, records: list[Record], initial_path: str, plan=()) -> Context:
    cfg = r.cfg

    def load(path):
        return load_model(path, device=cfg.model.device, dtype=cfg.model.dtype)

    return Context(cfg, r.run, r.tokenizer, r.model, t, records,
                   rollout=lambda role, recs, *, name, drafts=None, model=None:
                   r.rollout(stage, t, role, recs, name=name, drafts=drafts, model=model),
                   model_path=r.model_path,
                   initial=lambda: r.model if initial_path == r.model_path else load(initial_path),
                   load_model=load, plan=list(plan))


def _round_stage(r: Runner, method, t: int, records: list[Record], initial_path: str) -> dict:
    cfg = r.cfg
    stage = f"round_{t}"
    pairs_path = r.run.path(stage, "pairs.jsonl")
    if pairs_path.exists():  # generation and the reference pass of this round are already done
        kept = [Pair.from_json(d) for d in read_jsonl(pairs_path)]
        m = dict(read_jsonl(r.run.path(stage, "pair_stats.jsonl"))[0])
    else:
        ctx = _context(r, stage, t, records, initial_path)
        kept, dropped = filter_pairs(method.make_pairs(ctx), cfg.pairs.require_eos)
        if cfg.pairs.verify and kept:
            judge = make_judge(cfg.pairs.verify)
            prefs = judge.prefer([p.prompt[-1]["content"] for p in kept], [p.chosen for p in kept],
                                 [p.rejected for p in kept], None)
            dropped["not_verified"] = sum(1 for x in prefs if x <= 0.5)
            kept = [p for p, x in zip(kept, prefs) if x > 0.5]
        m = pair_metrics(kept, dropped)
        if kept:
            ref_model = r.model
            if method.reference(cfg) == "initial" and initial_path != r.model_path:
                ref_model = load_model(initial_path, device=r.device, dtype=cfg.model.dtype)
            tp = _pairs_to_tokens(r, kept, False)
            reference_logps(ref_model, tp, pad_id=r.tokenizer.pad_token_id, batch_size=cfg.dpo.batch_size * 2)
            for p, x in zip(kept, tp):
                p.ref_chosen_logp, p.ref_rejected_logp = x.ref_chosen, x.ref_rejected
            del ref_model
        write_jsonl(r.run.path(stage, "pair_stats.jsonl"), [m])
        write_jsonl(pairs_path, [p.to_json() for p in kept])
    log.info("round %d: %d pairs kept, dropped %s", t, len(kept),
             {k.split("/")[-1]: v for k, v in m.items() if k.startswith("pairs/dropped/") and v})
    if kept:
        d = cfg.dpo
        ckpt = r.checkpoint_dir("dpo")
        with r.trainable() as model:
            m.update(train_dpo(model, _pairs_to_tokens(r, kept, d.improver_nll_coef > 0),
                               pad_id=r.tokenizer.pad_token_id, beta=d.beta, batch_size=d.batch_size, epochs=d.epochs,
                               lr=d.lr, seed=cfg.seed + 100 * t, max_grad_norm=d.max_grad_norm,
                               improver_nll_coef=d.improver_nll_coef, desc=f"round {t}: dpo",
                               accelerator=r.dist.accelerator, checkpoint_dir=ckpt,
                               checkpoint_every=d.checkpoint_every))
        r.after_training(ckpt)
    else:
        log.warning("round %d: no pairs survived the filters; the model is unchanged this round", t)
    return m


def _with_defaults(defaults: dict, old: dict) -> dict:
    """``old`` with the keys it lacks (added by a later sgpo) at their defaults."""
    out = dict(old)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _with_defaults(v, out[k])
    return out


def check_resume(run: RunDir, cfg: Config, force_restart: bool) -> None:
    """An output directory holding a run with another config is an error naming the changed keys."""
    saved = run.path("config.yaml")
    if force_restart:
        run.clear()
        return
    if not saved.exists():
        if run.manifest["stages"]:
            raise RunError(f"{run.root} holds a run without its config.yaml; use another --output, or "
                           "--force-restart to start over")
        return
    import yaml

    try:
        old = yaml.safe_load(saved.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict):
        raise RunError(f"{saved} is corrupted; use another --output, or --force-restart to start over")
    if isinstance(old.get("version"), int) and old["version"] > config_mod.CONFIG_VERSION:
        raise RunError(f"{run.root} holds a run made by a newer sgpo (config version {old['version']}; this sgpo "
                       f"reads up to {config_mod.CONFIG_VERSION}); upgrade sgpo or use another --output")
    changed = config_mod.diff(_with_defaults(config_mod.to_dict(Config()), old), config_mod.to_dict(cfg))
    if changed:
        raise RunError(f"{run.root} holds a run with a different config (changed: {', '.join(changed)}); "
                       "use another --output, or --force-restart to start over")


def _open_run(out_dir, cfg: Config, force_restart: bool, dist: distributed.Dist) -> RunDir:
    """Open (or create) the run directory on every process; all of them fail together or none does."""
    err: Exception | None = None
    run_dir = None
    try:
        run_dir = RunDir(out_dir, writer=dist.is_main)
        check_resume(run_dir, cfg, force_restart)
    except RunError as e:
        err = e
    if not dist.all_agree(err is None):
        raise err or RunError(f"{out_dir}: the main process could not open the run directory")
    dist.barrier()
    return run_dir


def run(cfg: Config, out_dir: str | Path, *, force_restart: bool = False) -> dict:
    """Run the whole recipe into ``out_dir`` (resuming what is there). Returns the summary figures.

    Under ``accelerate launch`` every process runs this; only the main one writes (see ``sgpo.distributed``).
    """
    dist = distributed.setup(cfg.model.device)
    set_writer(dist.is_main)
    try:
        return _run(cfg, out_dir, force_restart, dist)
    finally:
        set_writer(True)


def _run(cfg: Config, out_dir, force_restart: bool, dist: distributed.Dist) -> dict:
    run_dir = _open_run(out_dir, cfg, force_restart, dist)
    run_dir.tidy()
    atomic_write_text(run_dir.path("config.yaml"), config_mod.dump(cfg))
    torch.manual_seed(cfg.seed)
    method = get_method(cfg.method)
    r = Runner(cfg, run_dir, dist)
    data = prepare_data(cfg, r.tokenizer)
    log.info("model: %s | method: %s | %d training prompts, %d development prompts | %d rounds",
             cfg.model.name, cfg.method, len(data.train), len(data.dev), cfg.rounds)

    chain = [content_hash(["sgpo-run", cfg.seed])]

    def stage(name, fn, *, saves_model=False, inputs=()):
        """Run ``fn`` as stage ``name`` unless done; write its metrics; returns them.

        A stage's inputs hash covers its records and the hash of the stage before it (hence every earlier input):
        a done stage is reused, and a started one resumed, only when it matches.
        """
        chain.append(content_hash([chain[-1], name, [(x.id, x.prompt, x.reference) for x in inputs]]))
        h = chain[-1]
        dist.barrier()
        run_dir.check_inputs(name, h)
        metrics_path = run_dir.path(name, "metrics.json")
        if run_dir.done(name):
            if saves_model:
                r.resume_from(name)
            run_dir.tidy(name)
            log.info("%s: done earlier, skipped", name)
            import json
            try:
                return json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RunError(f"{metrics_path} is corrupted; delete it and the '{name}' entry of the manifest "
                               "to redo the stage, or --force-restart") from None
        r.stage_name = name
        with run_dir.stage(name, h):
            t0 = time.perf_counter()
            m = fn()
            if saves_model:
                r.save(name)
            m[f"time/{name}_s"] = round(time.perf_counter() - t0, 2)
            atomic_write_json(metrics_path, m)  # before the stage is marked done: a kill never loses them
        run_dir.tidy(name)  # the stage's model is saved: its resumable training checkpoints are no longer needed
        dist.barrier()
        log.info("%s: done in %.0fs %s", name, m[f"time/{name}_s"], _headline(m))
        return m

    # 0. the start model on the development prompts (the yardstick for every later model)
    m0 = stage("round_0", lambda: _figures_on_dev(r, "round_0", data.dev, None, 0), inputs=data.dev)
    start_dev = {row["id"]: row["text"] for row in read_jsonl(run_dir.path("round_0", "dev_policy.jsonl"))} \
        if run_dir.path("round_0", "dev_policy.jsonl").exists() else None

    # 1. optional SFT on the references (a method with no rounds gets its final figures here)
    rounds = cfg.rounds if getattr(method, "preference_rounds", True) else 0
    m_sft = {}
    if cfg.sft or getattr(method, "runs_sft", False):
        m_sft = stage("sft", lambda: {**r.train_nll(r.nll_examples_policy(data.train), "sft", cfg.seed),
                                      **(_figures_on_dev(r, "sft", data.dev, start_dev, 0) if not rounds else {})},
                      saves_model=True, inputs=data.train)

    # 2. improver training (the same weights learn to refine their own drafts). The improver slice of the pool is
    # reserved for every method, so that all methods see the same round prompts.
    cursor = 0
    imp_records = take(data.train, cursor, cfg.data.improver_size)
    cursor += len(imp_records)
    if method.trains_improver:
        stage("improver", lambda: {**_improver_stage(r, imp_records),
                                   **_figures_on_dev(r, "improver", data.dev, start_dev, 0)}, saves_model=True,
              inputs=imp_records)
    initial_path = r.model_path
    plan = []
    for _ in range(rounds):
        plan.append(take(data.train, cursor, cfg.data.round_size))
        cursor += len(plan[-1])

    # 2b. the method's one-off preparation (a separate improver, an offline preference set), if it has one
    if has_prepare(method):
        stage("prepare", lambda: method.prepare(_context(r, "prepare", 0, imp_records, initial_path, plan)))

    # 3. rounds of self-generated preference pairs + DPO
    per_round = []
    for t, records in enumerate(plan, 1):
        per_round.append(stage(f"round_{t}", lambda: {**_round_stage(r, method, t, records, initial_path),
                                                      **_figures_on_dev(r, f"round_{t}", data.dev, start_dev, t)},
                               saves_model=True, inputs=records))

    # 4. the final model, and the number that matters
    if not run_dir.done("final"):
        with run_dir.stage("final"):
            r.save("final")
    last = per_round[-1] if per_round else (m_sft or (m0 if not method.trains_improver else {}))
    summary = {k: v for k, v in last.items() if k.startswith("eval/") or k.startswith("improver/")}
    atomic_write_json(run_dir.path("summary.json"), summary)
    if "eval/dev/win_rate_vs_start" in summary:
        w = {"win_rate": summary["eval/dev/win_rate_vs_start"], "ci_low": summary["eval/dev/win_rate_vs_start_ci_low"],
             "ci_high": summary["eval/dev/win_rate_vs_start_ci_high"], "n": summary["eval/dev/win_rate_vs_start_n"]}
        log.info("final vs start, head-to-head on held-out development prompts (judge: %s): %s",
                 cfg.eval.judge, format_win_rate(w))
    if dist.is_main:
        try:
            from .report import write_report

            write_report(run_dir.root)
        except Exception as e:  # a report problem must not fail a finished run
            log.warning("report not written: %s", e)
    dist.barrier()
    return summary


def _headline(m: dict) -> str:
    keys = ["pairs/kept", "rewards/accuracies", "rewards/margins", "nll/loss", "improver/changed_rate",
            "improver/win_rate", "eval/dev/win_rate_vs_start"]
    parts = [f"{k.split('/', 1)[-1] if k != 'pairs/kept' else 'pairs'}={m[k]:.3g}" for k in keys if k in m]
    return "| " + " ".join(parts) if parts else ""
