"""The figures a run computes about its own models: the judges (``eval.judge`` kept loaded, ``eval.second_judge`` for
one use at a time), the per-stage figures on the development prompts, and the test answers of a model."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from sgpo.config.schema import Config
from sgpo.data.records import Record
from sgpo.eval.base import JudgePart, prefer
from sgpo.eval.judges import cached_judge, judge_for_one_use
from sgpo.core.files import is_writer, read_jsonl
from sgpo.generation.engine import Generation
from sgpo.eval.held_out import answer_key
from sgpo.eval.improver import draft_and_rewrite, figures, win_rate_metrics
from sgpo.models.loading import free_memory
from sgpo.models.policy import PolicyPart
from sgpo.generation.rollout import SamplerPart, generation_of

log = logging.getLogger("sgpo")


class Evaluator:
    """``make_judge``: spec → judge (cached verdicts by default); ``answer_cache``: the folder the start and pre-rounds
    models' test answers are cached in by the model's hash (None: no cache)."""

    def __init__(self, cfg: Config, sampler: SamplerPart, policy: PolicyPart, stages,
                 make_judge: Callable[[str], JudgePart] = cached_judge, answer_cache: Path | None = None):
        self.cfg, self.sampler, self.policy, self.stages = cfg, sampler, policy, stages
        self.make_judge, self.answer_cache = make_judge, answer_cache
        self._judge = None

    @property
    def scorer(self):
        """The run's judge when it is a program scoring each response (``eval.base.Scorer``), else None — decided from
        its spec, so that a pairwise judge is not loaded for it."""
        from sgpo.core.judge_spec import is_scorer

        return self.judge if is_scorer(self.cfg.eval.judge) else None

    @property
    def judge(self):
        """The run's judge (``eval.judge``), kept loaded."""
        if self._judge is None:
            self._judge = self.make_judge(self.cfg.eval.judge)
        return self._judge

    def one_use(self, spec: str):
        """A context with the judge of ``spec`` (None when empty), freed afterwards."""
        return judge_for_one_use(spec, self.make_judge)

    def second_judge(self):
        """``eval.second_judge`` for one use (None when off): a model of its own, and training needs the memory."""
        return self.one_use(self.cfg.eval.second_judge)

    def stage_path(self, *parts: str) -> Path:
        return self.policy.run.path(self.stages.current, *parts)

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
        out = draft_and_rewrite(self.sampler, self.policy.generator, recs, self.stage_path(), rewrite=rewrite,
                                samples=self.cfg.improver.experimental.rewrite_samples)
        m = {"eval/dev/length": sum(len(out.drafts[r.id].text.split()) for r in recs) / len(recs)}
        if start_dev is not None and e.head_to_head_size:
            h = recs[:e.head_to_head_size]
            prefs = prefer(self.judge, [r.prompt_text for r in h], [out.drafts[r.id].text for r in h],
                           [start_dev[r.id] for r in h], [r.reference for r in h], [r.row() for r in h])
            m.update(win_rate_metrics("eval/dev/win_rate_vs_start", prefs))
        if rewrite:
            # the improver has seen the references: the second judge decides, unless the run's judge is a program
            # (a constraint checker is not swayed by a rewrite's closeness to the reference)
            if self.cfg.improver.sees_reference and self.scorer is None:
                with self.second_judge() as judge:
                    m.update(figures(judge, recs[:rewrite], out))
            else:
                m.update(figures(self.judge, recs[:rewrite], out))
        return m

    # -- test answers ------------------------------------------------------------------------------------------------
    def answers(self, records: list[Record], label: str, model_path: str, *, cached: bool = False
                ) -> dict[str, Generation]:
        """``model_path``'s answers to ``records`` (role ``test``), saved as ``<stage>/answers_<label>.jsonl``. With
        ``cached`` (and an answer cache), they come from (and go to) the cache keyed by the model's hash."""
        out = self.stage_path(f"answers_{label}.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        shard = out
        if cached and self.answer_cache is not None:
            shard, rows = self._cached(model_path, records)
            if rows is not None:
                log.info("test: the %s model's answers come from the cache (%s, %d answers)", label, shard.name,
                         len(records))
                _copy(shard, out)
                return {r["id"]: generation_of(r) for r in rows}
        model = self.policy.generator_at(model_path)
        gens = self.sampler.rollout(model, records, "test", 0, shard=shard)
        del model  # a start or pre-rounds model loaded for this is freed before the next one loads
        free_memory()
        if shard != out:
            _copy(shard, out)
        return gens

    def _cached(self, model_path: str, records: list[Record]) -> tuple[Path, list[dict] | None]:
        """The answer cache's shard of ``model_path``'s answers to ``records``, and its rows when it holds them all.
        Every machine has a cache of its own, so the main process's decides and every process gets its rows: a
        process that found answers the others did not would skip the rollout they wait in (only the main process
        reads or writes the shard)."""
        dist = self.sampler.dist

        def look() -> tuple[Path, list[dict] | None]:
            key = answer_key(model_path, self.sampler, self.cfg.data.max_prompt_tokens, records)
            shard = self.answer_cache / f"{key[:24]}.jsonl"
            shard.parent.mkdir(parents=True, exist_ok=True)
            rows = read_jsonl(shard) if shard.exists() else []
            return shard, rows if len(rows) >= len(records) else None

        if dist is None or not dist.active:
            return look()
        return dist.broadcast(look() if dist.is_main else None)


def _copy(src: Path, dst: Path) -> None:
    if is_writer():
        shutil.copyfile(src, dst)
