"""Reference-free judges from a causal LM's likelihood of each response (``lm:PATH``, ``lm-SCORE:PATH``).

Each response is scored on its own, from the log-probabilities the LM gives its tokens, in two contexts written in
plain text (no chat template, so a base model such as Gemma-3-270M fits):

    with the prompt      ``PROMPT_CONTEXT``  = "Instruction:\\n{instruction}\\n\\nResponse:\\n"
    without it           ``NULL_CONTEXT``    = "Response:\\n"

With ``c`` = log p(response | with the prompt), ``u`` = log p(response | without it) and ``n`` its token count:

    ``surprisal`` -c / n             mean per-token surprisal given the prompt (the default: see below)
    ``fluency``   c / n              mean per-token log-probability given the prompt
    ``pmi``       (c - u) / n        per-token pointwise mutual information of response and prompt (relevance)
    ``pmi-sum``   c - u              the same, summed over the tokens
    ``mix``       (2c - u) / n       fluency + pmi

Which score: measured against GPT-4 Turbo on decisive AlpacaEval pairs (``benchmarks/judge_agreement.py``), every
score above but ``surprisal`` agreed with GPT-4 Turbo *less* often than chance on length-matched pairs with
Gemma-3-270M: GPT-4 Turbo prefers the less predictable, denser answer of two of equal length, and a small base LM finds
generic, repetitive answers likely. ``surprisal`` was chosen on the tuning half and confirmed on the held-out half
(numbers in that script's docstring). It measures information density, not correctness: gibberish or
high-temperature samples are "surprising" too, so it is an evaluation judge for fluent candidates, not a reward to
optimise against.

The candidate with the higher score is preferred: ``prefer`` gives 1 / 0, and 0.5 for identical texts or scores
closer than 1e-6. References are ignored, so the judge stays valid when the judged model has seen them. Responses
are cut to ``max_response_chars`` characters and prompts to ``max_prompt_chars`` before scoring.

Judges on the same model share one ``LMScorer`` (the model is loaded once and every (context, response) is scored
once), so several scores can be compared for the cost of one.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from sgpo.eval.base import Judge

PROMPT_CONTEXT = "Instruction:\n{instruction}\n\nResponse:\n"
NULL_CONTEXT = "Response:\n"
SCORES = ("surprisal", "fluency", "pmi", "pmi-sum", "mix")
DEFAULT_SCORE = "surprisal"
TIE_EPS = 1e-6
_SCORERS: dict = {}


class LMScorer:
    """A causal LM that returns (sum of log-probabilities, token count) of a response after a context, memoised.

    New items are scored together: sorted by length and cut into batches of at most ``positions`` padded positions
    (right padding: under the causal mask a row's positions see only its own tokens), and the LM head runs on the response positions
    only, ``chunk`` at a time (never all positions' full-vocabulary logits at once). ``benchmarks/lm_judge.py``
    measures this against one item per forward."""

    def __init__(self, path: str, *, device: str = "auto", dtype: str = "auto", chunk: int = 128,
                 positions: int = 2048):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sgpo.models.loading import pick_device, pick_dtype, resolve

        resolved = resolve(path)
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        self.model = AutoModelForCausalLM.from_pretrained(
            resolved, dtype=pick_dtype(dtype, self.device)).to(self.device).eval()
        self.chunk, self.positions = chunk, positions
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.memo: dict[tuple[str, str], tuple[float, int]] = {}

    @classmethod
    def shared(cls, path: str, device: str = "auto", dtype: str = "auto") -> LMScorer:
        key = (path, device, dtype)
        if key not in _SCORERS:
            _SCORERS[key] = cls(path, device=device, dtype=dtype)
        return _SCORERS[key]

    def _encode(self, context: str, response: str) -> tuple[list[int], list[int]]:
        # the context with the tokenizer's BOS, if it adds one; the response without
        return self.tokenizer.encode(context), self.tokenizer.encode(response, add_special_tokens=False)

    def _batches(self, items: list[tuple[list[int], list[int]]]) -> list[list[int]]:
        """Indices of ``items`` by decreasing length, cut so that rows x longest row <= ``positions``."""
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
        out: list[list[int]] = []
        for i in order:
            if out and (len(out[-1]) + 1) * sum(map(len, items[out[-1][0]])) <= self.positions:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    @torch.inference_mode()
    def _score_batch(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        lengths = [len(c) + len(r) for c, r in items]
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(items), max(lengths)), pad, dtype=torch.long)
        for i, (c, r) in enumerate(items):
            ids[i, :lengths[i]] = torch.tensor(c + r)
        ids = ids.to(self.device)
        # right padding under the causal mask: a row's positions never see the padding after them, so no padding mask
        # is needed (and the attention keeps its mask-free causal path)
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state
        # the hidden state at position t predicts token t + 1: keep the positions that predict response tokens
        rows = torch.cat([torch.full((len(r),), i) for i, (c, r) in enumerate(items)]).to(self.device)
        cols = torch.cat([torch.arange(len(c) - 1, len(c) + len(r) - 1) for c, r in items]).to(self.device)
        hidden, targets = hidden[rows, cols], ids[rows, cols + 1]
        head = self.model.get_output_embeddings()
        picked = []
        for start in range(0, len(targets), self.chunk):
            logits = head(hidden[start:start + self.chunk]).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            tgt = targets[start:start + self.chunk]
            picked.append(logits.gather(-1, tgt[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
        per_row = torch.cat(picked).double().cpu().split([len(r) for _, r in items])
        return [(float(x.sum()), len(r)) for x, (_, r) in zip(per_row, items)]

    def logprobs(self, items: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """(sum of log-probabilities, token count) of each (context, response)."""
        todo = [k for k in dict.fromkeys(items) if k not in self.memo]
        encoded = [self._encode(*k) for k in todo]
        for k, (c, r) in zip(todo, encoded):
            if not r:
                self.memo[k] = (0.0, 0)
        live = [i for i, (c, r) in enumerate(encoded) if r]
        for batch in self._batches([encoded[i] for i in live]):
            scored = self._score_batch([encoded[live[j]] for j in batch])
            for j, v in zip(batch, scored):
                self.memo[todo[live[j]]] = v
        return [self.memo[k] for k in items]

    def logprob(self, context: str, response: str) -> tuple[float, int]:
        return self.logprobs([(context, response)])[0]


class LMJudge(Judge):
    """Prefers the response with the higher likelihood score (see the module docstring)."""

    def __init__(self, path: str, *, score: str = DEFAULT_SCORE, device: str = "auto", dtype: str = "auto",
                 max_response_chars: int = 1500, max_prompt_chars: int = 2000):
        if score not in SCORES:
            raise ValueError(f"unknown score '{score}' (known: {', '.join(SCORES)})")
        self.scorer = LMScorer.shared(path, device, dtype)
        self.score_name = score
        self.max_response_chars = max_response_chars
        self.max_prompt_chars = max_prompt_chars
        self.name = f"lm:{path}" if score == DEFAULT_SCORE else f"lm-{score}:{path}"
        self.spec = self.name
        digest = hashlib.sha256((PROMPT_CONTEXT + "\0" + NULL_CONTEXT).encode()).hexdigest()[:16]
        self.cache_id = (f"lm-{score}:{path}|contexts:{digest}|max_response_chars={max_response_chars}"
                         f"|max_prompt_chars={max_prompt_chars}")

    def close(self) -> None:
        """Drop this judge's shared scorer (and its model): a run frees the judge's memory before it trains again."""
        for key, scorer in list(_SCORERS.items()):
            if scorer is self.scorer:
                del _SCORERS[key]
        self.scorer = None

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        responses = [r[:self.max_response_chars] for r in responses]
        contexts = [PROMPT_CONTEXT.replace("{instruction}", p[:self.max_prompt_chars]) for p in prompts]
        with_prompt = self.scorer.logprobs(list(zip(contexts, responses)))
        if self.score_name in ("surprisal", "fluency"):  # no pass without the prompt needed
            return [float("-inf") if n == 0 else (-c / n if self.score_name == "surprisal" else c / n)
                    for c, n in with_prompt]
        without = self.scorer.logprobs([(NULL_CONTEXT, r) for r in responses])
        out = []
        for (c, n), (u, _) in zip(with_prompt, without):
            out.append(float("-inf") if n == 0 else
                       {"pmi": (c - u) / n, "pmi-sum": c - u, "mix": (2 * c - u) / n}[self.score_name])
        return out

    def prefer(self, prompts, a, b, references=None) -> list[float]:
        if not (len(prompts) == len(a) == len(b)):
            raise ValueError("prompts, a and b must have the same length")
        both = self.scores(list(prompts) * 2, list(a) + list(b))  # one set of batches for both sides
        sa, sb = both[:len(a)], both[len(a):]
        out = []
        for x, y, u, v in zip(a, b, sa, sb):
            if x == y or u == v or abs(u - v) < TIE_EPS:
                out.append(0.5)
            else:
                out.append(1.0 if u > v else 0.0)
        return out
