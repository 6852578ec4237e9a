"""What the stages of a run share, as parts with one job each: the config, the run directory and its stages, the
sampler (every generation), the current model (``Policy``), the training calls (``Trainer``), the run's figures
(``Evaluator``) and the trackers. ``open_session`` builds the real parts; a dry run (``dry_run.py``) builds stand-ins
that count the work instead of doing it, and walks the same recipe."""
from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Callable

from sgpo.core import distributed
from sgpo.config.schema import Config, to_dict
from sgpo.models.templates import improver_instruction
from sgpo.data.records import Record, cut_reference, load_records
from sgpo.eval.judges import MainProcessJudge, cached_judge
from sgpo.eval.evaluator import Evaluator
from sgpo.models.loading import cache_dir, load_tokenizer
from sgpo.models.policy import Policy, PolicyPart
from sgpo.generation.rollout import Sampler, SamplerPart
from sgpo.run.stages import RunDir, Stages
from sgpo.core.trackers import Trackers
from sgpo.run.trainer import Trainer, TrainerPart
from sgpo.generation.vllm_backend import Engine, resolve_backend, worker_options


@dataclass
class Session:
    cfg: Config
    run: RunDir
    stages: Stages
    dist: distributed.Dist
    sampler: SamplerPart
    policy: PolicyPart
    trainer: TrainerPart
    evaluator: Evaluator
    trackers: Trackers | None = None
    load: Callable = load_records     # reads a data source: (source, **options) → (records, report)
    dev: list[Record] = field(default_factory=list)   # the development prompts
    start_dev: dict | None = None     # the start model's answers to them (``round_0``), once known
    sft_from: list = field(default_factory=list)  # runs whose SFT this one may take (``recipe.reusable_sft``)

    @property
    def tokenizer(self):
        return self.policy.tokenizer

    def stage(self, name: str, fn: Callable[[], dict], inputs=(), model: bool = False) -> dict:
        """``fn()`` as stage ``name`` unless it is done; with ``model`` it ends with a checkpoint of the current model
        (and a skipped one makes its checkpoint the current model)."""
        return self.stages.run_stage(name, fn, inputs, self.policy if model else None)

    def dev_figures(self, improver: bool = True) -> dict:
        """The current model on the development prompts (``Evaluator.dev_figures``)."""
        return self.evaluator.dev_figures(self.dev, self.start_dev, improver)

    def cut(self, text: str, max_tokens: int) -> str:
        """``text`` cut at a sentence boundary under ``max_tokens`` tokens (kept whole without a tokenizer: a dry run)."""
        return text.strip() if self.tokenizer is None else cut_reference(text, self.tokenizer, max_tokens)

    def close(self) -> None:
        """The end of the run (finished, failed or interrupted): the vLLM engine shut down, the trackers closed."""
        try:
            self.sampler.close()
        finally:
            if self.trackers is not None:
                self.trackers.close()


def open_session(cfg: Config, run: RunDir, dist: distributed.Dist) -> Session:
    """The real parts of a run in ``run``."""
    stages = Stages(run, dist, cfg.seed)
    # under a launcher every process uses the device the launcher gave it
    device = str(dist.device) if dist.accelerator is not None else cfg.model.device
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.chat_template)
    backend = resolve_backend(cfg.generation.backend, device)
    instruction = improver_instruction(cfg.improver)
    options = worker_options(cfg, device)
    # one vLLM engine per process for the whole run (started by the first rollout, its weights swapped after)
    engine = Engine({**options, "slot": dist.slot, "progress": dist.is_main}) if backend == "vllm" else None
    sampler = Sampler(tokenizer, cfg.generation, cfg.seed, cfg.data.max_prompt_tokens, instruction, dist, backend,
                      options, engine)
    run.record("generation_backend", backend)
    trackers = Trackers(cfg.report_to, run.root, to_dict(cfg), dist.is_main)
    policy = Policy(cfg.model, tokenizer, device, run, stages, dist, backend)
    trainer = Trainer(cfg, policy, instruction, stages, dist, trackers if trackers else None)
    if trackers:
        stages.on_stage = lambda name, m: trackers.log({k: v for k, v in m.items() if k not in trainer.step_keys},
                                                       run.manifest.get("train_steps", 0))
    own = functools.partial(cached_judge, eval_cfg=cfg.eval)
    make_judge = (lambda spec: MainProcessJudge(spec, dist, own)) if dist.active else own
    evaluator = Evaluator(cfg, sampler, policy, stages, make_judge, answer_cache=cache_dir() / "answers")
    return Session(cfg, run, stages, dist, sampler, policy, trainer, evaluator, trackers)
