"""What the stages of a run share: config, run directory, tokenizer, sampler, judge and the current model, with the
few operations the recipe performs on it (generate, train, score, save). One ``Session`` per run."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from pathlib import Path

from . import distributed, templates
from .config import Config, improver_instruction, to_dict
from .data import Record
from .eval.judges import make_judge
from .files import atomic_dir, is_writer
from .improver.figures import draft_and_rewrite, figures, win_rate_metrics
from .models import cache_dir, free_memory, load_model, load_tokenizer, resolve
from .pairs import Pair
from .rollout import Sampler, cut_prompt
from .vllm_backend import resolve_backend, worker_options
from .runs import RunDir, Stages
from .trackers import Trackers
from .training.adapters import trainable
from .training.dpo import TokenPair, reference_logps, train_dpo
from .training.loop import Job, exported_weights
from .training.sft import NLLExample, train_nll

log = logging.getLogger("sgpo")


class Session:
    def __init__(self, cfg: Config, run: RunDir, dist: distributed.Dist):
        self.cfg, self.run, self.dist = cfg, run, dist
        self.stages = Stages(run, dist, cfg.seed)
        # under a launcher every process uses the device the launcher gave it
        self.device = str(dist.device) if dist.accelerator is not None else cfg.model.device
        self.tokenizer = load_tokenizer(cfg.model.name)
        self.model_path = resolve(cfg.model.name)
        backend = resolve_backend(cfg.generation.backend, self.device)
        self.sampler = Sampler(self.tokenizer, cfg.generation, cfg.seed, cfg.data.max_prompt_tokens,
                               improver_instruction(cfg.improver), dist, backend, worker_options(cfg, self.device))
        run.record("generation_backend", backend)
        self.trackers = Trackers(cfg.report_to, run.root, to_dict(cfg), dist.is_main)
        self._step_keys: set[str] = set()  # metrics logged per step (their stage means are not logged again)
        if self.trackers:
            self.stages.on_stage = lambda name, m: self.trackers.log(
                {k: v for k, v in m.items() if k not in self._step_keys}, run.manifest.get("train_steps", 0))
        self._model = None
        self._judge = None
        self._changed = False  # the in-memory weights differ from ``model_path`` (trained since it was saved)

    # -- the current model --------------------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            self._model = self.load(self.model_path)
        return self._model

    @property
    def generator(self):
        """What rollouts generate with: the current model for the engine; for vLLM a checkpoint directory of exactly
        the current weights: ``model_path``, or, when training changed them since, the running stage's ``model/``,
        saved now (the stage's end then keeps it instead of saving again)."""
        if self.sampler.backend != "vllm":
            return self.model
        if self._changed:
            self.save(self.stages.current)
        return self.model_path

    def unload(self) -> None:
        """Hand the current model's memory back (it is saved: the next use loads it again from ``model_path``)."""
        if self._changed:
            raise RuntimeError("the current model has unsaved training: save it before unloading")
        self._model = None
        free_memory()

    def load(self, path: str):
        """A model from ``path`` on the run's device and dtype (a separate copy: the current model is untouched)."""
        return load_model(path, device=self.device, dtype=self.cfg.model.dtype)

    def resume_from(self, stage: str) -> None:
        """The stage is done: the current model is its checkpoint (loaded when needed)."""
        self.model_path, self._model, self._changed = str(self.run.path(stage, "model")), None, False

    def save(self, stage: str) -> None:
        """Save the current model as the stage's checkpoint atomically (main process only; the others wait).
        ``final/`` holds the model itself, every other stage keeps it in ``<stage>/model``."""
        path = self.run.path(stage) if stage == "final" else self.run.path(stage, "model")
        if not self._changed and self.model_path == str(path):  # saved already (for a vLLM rollout)
            return
        save_model(self.model, self.tokenizer, path)
        self.dist.barrier()
        self.model_path, self._changed = str(path), False

    @property
    def judge(self):
        """The run's judge (``eval.judge``), kept loaded; its verdicts are cached by content across runs."""
        if self._judge is None:
            self._judge = cached_judge(self.cfg.eval.judge)
        return self._judge

    @contextlib.contextmanager
    def second_judge(self):
        """``eval.second_judge`` for one use (None when off), freed afterwards: it is a model of its own, and the
        training that follows needs the memory."""
        with judge_for_one_use(self.cfg.eval.second_judge) as judge:
            yield judge

    # -- training --------------------------------------------------------------------------------------------
    def job(self, desc: str, seed: int, loss_name: str = "nll/loss") -> Job:
        """A training call of the running stage, with its resumable checkpoints in ``<stage>/checkpoints/<desc>``
        and, when trackers are on, its steps logged (the step's ``loss`` as ``loss_name``)."""
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", desc).strip("_")
        return Job(self.tokenizer.pad_token_id, seed, desc, self.dist.accelerator,
                   self.run.path(self.stages.current, "checkpoints", folder),
                   on_step=self._step_logger(desc, loss_name) if self.trackers else None)

    def _step_base(self, desc: str) -> int:
        """The global step before training call ``desc`` of the running stage: the run's step count when the call
        first started, kept in the manifest so that a resumed call keeps its numbering."""
        offsets = self.run.manifest.setdefault("train_offsets", {})
        key = f"{self.stages.current}/{desc}"
        if key not in offsets:
            offsets[key] = self.run.manifest.get("train_steps", 0)
            self.run.save_manifest()
        return offsets[key]

    def _step_logger(self, desc: str, loss_name: str):
        """The trackers' per-step feed of one training call, numbered after all earlier calls of the run."""
        base = self._step_base(desc)

        def on_step(done: int, metrics: dict) -> None:
            named = {(loss_name if k == "loss" else k): v for k, v in metrics.items()}
            self.trackers.log(named, base + done)
            self._step_keys.update(named)

        return on_step

    def _count_steps(self, desc: str, steps: int) -> None:
        """After training call ``desc`` (``steps`` optimizer steps in all, resumed ones included): the run's global
        step, for the next call and the stage metrics."""
        if self.trackers:
            self.run.record("train_steps", self._step_base(desc) + steps)

    def train_nll(self, examples: list[NLLExample], desc: str, seed: int, model=None) -> dict:
        """NLL training of the current model (or of ``model``, a separate one) on ``examples``. Inputs are cut as the
        rollouts cut them: the model trains on what it sees when it generates (and one uncut long request can take
        tens of GB in a training step)."""
        limit = self.cfg.data.max_prompt_tokens
        examples = [dataclasses.replace(e, prompt_ids=tuple(cut_prompt(e.prompt_ids, limit))) for e in examples]
        job = self.job(desc, seed)
        with trainable(self.model if model is None else model, self.cfg.model) as m:
            metrics = train_nll(m, examples, self.cfg.train, job)
        self._count_steps(desc, metrics["nll/steps"])
        if model is None:
            self._after_training(job)
        return metrics

    def train_separate(self, examples: list[NLLExample], desc: str, seed: int, out: Path) -> dict:
        """Train a separate copy of the current model on ``examples`` (through the same path as every training call:
        accelerator, resumable checkpoints) and save it to ``out``; the current model is not touched."""
        model = self.load(self.model_path)
        metrics = self.train_nll(examples, desc, seed, model=model)
        job = self.job(desc, seed)
        if self.dist.sharded:  # the trained weights are split across ranks: their export is the model
            model = self.load(str(exported_weights(job.checkpoint_dir)))
        save_model(model, self.tokenizer, out)
        self.dist.barrier()
        return metrics

    def train_dpo(self, pairs: list[Pair], desc: str, seed: int) -> dict:
        """DPO of the current model on ``pairs`` (their reference log-probs filled by ``reference_pass``)."""
        job = self.job(desc, seed, "dpo/loss")
        with trainable(self.model, self.cfg.model) as model:
            metrics = train_dpo(model, self.token_pairs(pairs, self.cfg.dpo.improver_nll_coef > 0), self.cfg.dpo, job)
        self._count_steps(desc, metrics["dpo/steps"])
        self._after_training(job)
        return metrics

    def _after_training(self, job: Job) -> None:
        """Sharded training (FSDP/DeepSpeed) leaves the weights split across ranks: continue from their export.
        The optimizer state is gone: its memory goes back to the system before the next phase."""
        free_memory()
        self._changed = True
        if self.dist.sharded:
            self.model_path, self._model, self._changed = str(exported_weights(job.checkpoint_dir)), None, False

    def reference_pass(self, pairs: list[Pair], reference: str, initial_path: str) -> None:
        """Fill the pairs' reference log-probs, once per round: under the round-start model, or the initial one."""
        if not pairs:
            return
        ref_model = self.model
        if reference == "initial" and initial_path != self.model_path:
            ref_model = self.load(initial_path)
        tp = self.token_pairs(pairs, False)
        reference_logps(ref_model, tp, pad_id=self.tokenizer.pad_token_id, batch_size=self.cfg.dpo.batch_size * 2)
        for p, x in zip(pairs, tp):
            p.ref_chosen_logp, p.ref_rejected_logp = x.ref_chosen, x.ref_rejected

    def token_pairs(self, pairs: list[Pair], improver_drafts: bool) -> list[TokenPair]:
        """Token pairs for the reference pass and DPO; prompts are cut as the rollouts that sampled them cut them."""
        tok, limit, instruction = self.tokenizer, self.cfg.data.max_prompt_tokens, self.sampler.instruction
        out = []
        for p in pairs:
            prompt = tuple((m["role"], m["content"]) for m in p.prompt)
            out.append(TokenPair(
                cut_prompt(templates.render(tok, p.prompt), limit),
                templates.completion_ids(tok, p.chosen, eos=p.chosen_finished),
                templates.completion_ids(tok, p.rejected, eos=p.rejected_finished),
                p.ref_chosen_logp, p.ref_rejected_logp,
                cut_prompt(templates.improver_ids(tok, prompt, p.rejected, instruction), limit)
                if improver_drafts else None))
        return out

    def policy_examples(self, records: list[Record]) -> list[NLLExample]:
        """SFT examples P(x) → y* (EOS after the reference)."""
        tok = self.tokenizer
        return [NLLExample(tuple(templates.policy_ids(tok, r.prompt)),
                           tuple(templates.completion_ids(tok, r.reference)), "policy") for r in records]

    # -- figures on the development prompts ----------------------------------------------------------------------
    def dev_figures(self, dev: list[Record], start_dev: dict | None, improver: bool = True) -> dict:
        """The current model on the development prompts: head-to-head against the start model's answers
        (``start_dev``, None in ``round_0``) and, with ``improver``, the improver's figures (drafts → rewrites, as in
        the rounds; a round measures its improver on its own candidates instead, before and after the gates)."""
        e = self.cfg.eval
        rewrite = e.improver_size if improver else 0
        recs = dev[:max(e.head_to_head_size, rewrite)]
        if not recs:
            return {}
        out = draft_and_rewrite(self.sampler, self.generator, recs, self.run.path(self.stages.current),
                                rewrite=rewrite, samples=self.cfg.improver.experimental.rewrite_samples)
        m = {"eval/dev/length": sum(len(out.drafts[r.id].text.split()) for r in recs) / len(recs)}
        if start_dev is not None and e.head_to_head_size:
            h = recs[:e.head_to_head_size]
            prefs = self.judge.prefer([r.prompt_text for r in h], [out.drafts[r.id].text for r in h],
                                      [start_dev[r.id] for r in h], [r.reference for r in h])
            m.update(win_rate_metrics("eval/dev/win_rate_vs_start", prefs))
        if rewrite:
            if self.cfg.improver.sees_reference:  # the improver has seen the references: the second judge decides
                with self.second_judge() as judge:
                    m.update(figures(judge, recs[:rewrite], out))
            else:
                m.update(figures(self.judge, recs[:rewrite], out))
        return m


def cached_judge(spec: str):
    """A judge whose verdicts are cached by content in the user cache (``judgements/<spec>.jsonl``); only the main
    process keeps the cache (under a launcher every rank judges, one writes)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)
    return make_judge(spec, cache=str(cache_dir() / "judgements" / f"{name}.jsonl") if is_writer() else None)


@contextlib.contextmanager
def judge_for_one_use(spec: str):
    """``cached_judge(spec)`` (None for an empty spec), released afterwards: a judge holding a model of its own frees
    it, and its pages go back to the system before whatever needs the memory next."""
    judge = cached_judge(spec) if spec else None
    try:
        yield judge
    finally:
        if hasattr(judge, "close"):
            judge.close()
        del judge
        free_memory()


def save_model(model, tokenizer, path: Path) -> None:
    """Model and tokenizer into ``path`` atomically (main process only)."""
    with atomic_dir(path) as tmp:
        if is_writer():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

