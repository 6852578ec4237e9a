"""The training calls of a run: NLL (SFT, the improver role), DPO and its reference pass, each on the current model
(``Policy``) through the same path — accelerator, resumable checkpoints in ``<stage>/checkpoints/<call>``, per-step
tracker logging. Inputs are tokenized here, as the rollouts tokenized them."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Protocol

from sgpo.models import templates
from sgpo.config.schema import Config
from sgpo.data.records import Record
from sgpo.methods.improver import ImproverExample, nll_example
from sgpo.methods.pairs import Pair
from sgpo.models.loading import mapped_buffers
from sgpo.core.files import is_writer
from sgpo.models.policy import PolicyPart, place_folder, save_model
from sgpo.generation.rollout import cut_prompt
from sgpo.core.phases import phase
from sgpo.training.adapters import trainable
from sgpo.training.dpo import TokenPair, reference_logps, train_dpo
from sgpo.training.loop import Job, exported_weights
from sgpo.training.sft import NLLExample, train_nll


class TrainerPart(Protocol):
    """What a run asks of its training calls — ``Trainer``, and the dry run's ``CountingTrainer``
    (``tests/run/test_protocols.py`` holds both to it): examples from records, NLL training of the current model (or of a
    separate copy), DPO and its reference pass, as ``Trainer`` documents them."""

    def policy_examples(self, records: list[Record]) -> list[NLLExample]: ...

    def improver_examples(self, examples: list[ImproverExample], records: list[Record]) -> list[NLLExample]: ...

    def train_nll(self, examples: list[NLLExample], desc: str, seed: int, model=None) -> dict: ...

    def train_separate(self, examples: list[NLLExample], desc: str, seed: int, out: Path) -> dict: ...

    def train_dpo(self, pairs: list[Pair], desc: str, seed: int) -> dict: ...

    def reference_pass(self, pairs: list[Pair], reference_path: str) -> None: ...


class Trainer:
    def __init__(self, cfg: Config, policy: PolicyPart, instruction: str, stages, dist, trackers=None):
        self.cfg, self.policy, self.instruction = cfg, policy, instruction
        self.tokenizer, self.stages, self.dist, self.trackers = policy.tokenizer, stages, dist, trackers
        self.step_keys: set[str] = set()  # metrics logged per step (their stage means are not logged again)

    # -- examples ---------------------------------------------------------------------------------------------------
    def policy_examples(self, records: list[Record]) -> list[NLLExample]:
        """SFT examples P(x) → y* (EOS after the reference)."""
        tok = self.tokenizer
        return [NLLExample(tuple(templates.policy_ids(tok, r.prompt)),
                           tuple(templates.completion_ids(tok, r.reference)), "policy") for r in records]

    def improver_examples(self, examples: list[ImproverExample], records: list[Record]) -> list[NLLExample]:
        """I(x, source[, y*]) → target for each improver example (``records``: theirs, by id)."""
        by_id = {r.id: r for r in records}
        return [nll_example(self.tokenizer, by_id[e.record_id], e, self.instruction) for e in examples]

    def token_pairs(self, pairs: list[Pair], improver_drafts: bool) -> list[TokenPair]:
        """Token pairs for the reference pass and DPO; prompts are cut as the rollouts that sampled them cut them."""
        tok, limit = self.tokenizer, self.cfg.data.max_prompt_tokens
        out = []
        for p in pairs:
            prompt = tuple((m["role"], m["content"]) for m in p.prompt)
            out.append(TokenPair(
                cut_prompt(templates.render(tok, p.prompt), limit),
                templates.completion_ids(tok, p.chosen, eos=p.chosen_finished),
                templates.completion_ids(tok, p.rejected, eos=p.rejected_finished),
                p.ref_chosen_logp, p.ref_rejected_logp,
                cut_prompt(templates.improver_ids(tok, prompt, p.rejected, self.instruction), limit)
                if improver_drafts else None))
        return out

    # -- training calls ---------------------------------------------------------------------------------------------
    def job(self, desc: str, seed: int, loss_name: str = "nll/loss") -> Job:
        """A training call of the running stage, with its resumable checkpoints in ``<stage>/checkpoints/<desc>``
        and, when trackers are on, its steps logged (the step's ``loss`` as ``loss_name``)."""
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", desc).strip("_")
        return Job(self.tokenizer.pad_token_id, seed, desc, self.dist.accelerator,
                   self.policy.run.path(self.stages.current, "checkpoints", folder),
                   on_step=self._step_logger(desc, loss_name) if self.trackers else None, tokenizer=self.tokenizer)

    def train_nll(self, examples: list[NLLExample], desc: str, seed: int, model=None) -> dict:
        """NLL training of the current model (or of ``model``, a separate one) on ``examples``. Inputs are cut as the
        rollouts cut them: the model trains on what it sees when it generates (and one uncut long request can take
        tens of GB in a training step)."""
        limit = self.cfg.data.max_prompt_tokens
        examples = [dataclasses.replace(e, prompt_ids=tuple(cut_prompt(e.prompt_ids, limit))) for e in examples]
        job = self.job(desc, seed)
        target = self.policy.model if model is None else model
        with phase("training"), mapped_buffers(), trainable(target, self.cfg.model, self.dist.sharded, seed) as m:
            metrics = train_nll(m, examples, self.cfg.train, job)
        self._count_steps(desc, metrics["nll/steps"])
        if model is None:
            self._after_training(job)
        return metrics

    def train_separate(self, examples: list[NLLExample], desc: str, seed: int, out: Path) -> dict:
        """Train a separate copy of the current model on ``examples`` and save it to ``out``; the current model is not
        touched."""
        model = self.policy.load(self.policy.path)
        metrics = self.train_nll(examples, desc, seed, model=model)
        if self.dist.sharded:  # the trained weights are split across ranks: their export (a model folder) is the model,
            if is_writer():    # moved into place by the main process, not loaded by every process for one to save it
                place_folder(exported_weights(self.job(desc, seed).checkpoint_dir), out, move=True)
        else:
            save_model(model, self.tokenizer, out)
        self.dist.barrier()
        return metrics

    def train_dpo(self, pairs: list[Pair], desc: str, seed: int) -> dict:
        """DPO of the current model on ``pairs`` (their reference log-probs filled by ``reference_pass``)."""
        job = self.job(desc, seed, "dpo/loss")
        target = self.policy.model
        with phase("training"), mapped_buffers(), trainable(target, self.cfg.model, self.dist.sharded, seed) as model:
            metrics = train_dpo(model, self.token_pairs(pairs, self.cfg.dpo.improver_nll_coef > 0), self.cfg.dpo, job)
        self._count_steps(desc, metrics["dpo/steps"])
        self._after_training(job)
        return metrics

    def reference_pass(self, pairs: list[Pair], reference_path: str) -> None:
        """Fill the pairs' reference log-probs under the model at ``reference_path`` (once per round; the processes
        share the batches)."""
        if not pairs:
            return
        tp = self.token_pairs(pairs, False)
        model = self.policy.model_at(reference_path)
        with phase("reference_pass"):
            reference_logps(model, tp, pad_id=self.tokenizer.pad_token_id, batch_size=self.cfg.dpo.batch_size * 2,
                            dist=self.dist)
        for p, x in zip(pairs, tp):
            p.ref_chosen_logp, p.ref_rejected_logp = x.ref_chosen, x.ref_rejected

    def _after_training(self, job: Job) -> None:
        self.policy.trained(exported_weights(job.checkpoint_dir) if self.dist.sharded else None)

    # -- the trackers' step numbering ------------------------------------------------------------------------------
    def _step_base(self, desc: str) -> int:
        """The global step before training call ``desc`` of the running stage: the run's step count when the call
        first started, kept in the manifest so that a resumed call keeps its numbering."""
        run = self.policy.run
        offsets = run.manifest.setdefault("train_offsets", {})
        key = f"{self.stages.current}/{desc}"
        if key not in offsets:
            offsets[key] = run.manifest.get("train_steps", 0)
            run.save_manifest()
        return offsets[key]

    def _step_logger(self, desc: str, loss_name: str):
        """The trackers' per-step feed of one training call, numbered after all earlier calls of the run."""
        base = self._step_base(desc)

        def on_step(done: int, metrics: dict) -> None:
            named = {(loss_name if k == "loss" else k): v for k, v in metrics.items()}
            self.trackers.log(named, base + done)
            self.step_keys.update(named)

        return on_step

    def _count_steps(self, desc: str, steps: int) -> None:
        """After training call ``desc`` (``steps`` optimizer steps in all, resumed ones included): the run's global
        step, for the next call and the stage metrics."""
        if self.trackers:
            self.policy.run.record("train_steps", self._step_base(desc) + steps)
