"""A judge behind any OpenAI-compatible chat-completions endpoint (the OpenAI API, vLLM, llama.cpp server, ...).

Spec: ``openai:MODEL`` or ``openai:MODEL@BASE_URL`` (e.g. ``openai:gpt-4-1106-preview`` or
``openai:my-judge@http://localhost:8000/v1``). Without a base URL, ``OPENAI_BASE_URL`` or the OpenAI API is used.
The key comes from ``OPENAI_API_KEY`` (optional: local servers usually need none). Plain HTTP through the standard
library; no SDK needed.

``prefer`` is AlpacaEval-style weighted judging: the judge is asked for the single label token of the better output;
when the server returns top log-probabilities, the preference is p(label of A) / (p(label of A) + p(label of B)), else
the text label decides (1 or 0). Identical outputs are a tie (0.5) without a request. The two outputs are shown in a random order per item, drawn from an RNG seeded by
(seed, prompt, both texts) -- so the order of an item never depends on its batch or on a resumed run -- and the
preference is mapped back to A. The prompt is AlpacaEval's official weighted template when ``alpaca-eval`` is
installed (``template_name`` says which was used), otherwise this project's own.

``verdict``/``verdicts`` give Arena-Hard style labels (``A>>B``, ``A>B``, ``A=B``, ``B>A``, ``B>>A``) for games
(question, answer_a, answer_b) in the order given; the caller plays the swapped game.

Transient errors (HTTP 408/409/425/429/5xx, timeouts, refused or dropped connections) are retried with exponential
backoff (``max_retries`` times, honouring ``Retry-After`` up to ``backoff_max``). A reply that cannot be used -- not
JSON, no label, an error that persists -- is a failed annotation: NaN from ``prefer``, ``None`` from ``verdicts``,
counted in ``stats()["failed"]`` and described in ``failures``. Only errors that would fail every request (401, 403,
404: wrong key, model or URL) raise ``APIError`` (a ``JudgeError`` naming the URL and the status). ``probe`` sends one
minimal request: a run asks it of every API judge before its first stage (``eval/preflight.py``).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from sgpo.eval.base import Judge, JudgeError
from sgpo.eval.judge_templates import ARENA_TEMPLATE_NAME, arena_verdict_messages, pairwise_template, parse_verdict

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = {408, 409, 425, 429} | set(range(500, 600))
FATAL_STATUS = {401, 403, 404}


class APIError(JudgeError):
    """The server refused a request (``status``: its HTTP status; None when nothing answered)."""

    def __init__(self, url: str, status: int | None, detail: str):
        self.url, self.status, self.detail = url, status, detail
        super().__init__(f"{url} answered HTTP {status}: {detail}" if status else f"no answer from {url}: {detail}")


def one_line(text: str) -> str:
    """``text`` with its whitespace runs (newlines among them) as single spaces: a server's error body in a message."""
    return " ".join(str(text).split())


def error_detail(raw: bytes) -> str:
    """A server's error body in one line: the ``error.message`` of an OpenAI-style error body, else the body itself;
    at most 300 characters."""
    text = raw.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        text = error["message"]
    elif isinstance(error, str):
        text = error
    return one_line(text)[:300]


def parse_openai_spec(arg: str) -> tuple[str, str | None]:
    """``MODEL[@BASE_URL]`` -> (model, base_url or None)."""
    model, sep, base_url = arg.partition("@")
    if not model:
        raise ValueError("an openai judge spec needs a model name: openai:MODEL[@BASE_URL]")
    return model, (base_url or None) if sep else None


def from_spec(arg: str, **kwargs) -> OpenAIJudge:
    """The judge of spec ``openai:ARG`` (``ARG`` = ``MODEL[@BASE_URL]``)."""
    model, base_url = parse_openai_spec(arg)
    return OpenAIJudge(model, base_url, **kwargs)


def _logsumexp(values: Sequence[float]) -> float:
    values = [v for v in values if v != -math.inf]
    if not values:
        return -math.inf
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def swap_order(seed: int, prompt: str, a: str, b: str) -> bool:
    """Whether an item is shown as (b, a): a fair coin from an RNG seeded by the seed and the item's content."""
    digest = hashlib.sha256(json.dumps([seed, prompt, a, b], ensure_ascii=False).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).random() < 0.5


@dataclass
class OpenAISettings:
    """How an ``OpenAIJudge`` asks: sampling, reading of the answer, retries and concurrency."""
    seed: int = 0                 # decides which items are shown in swapped order (position bias cancels out)
    temperature: float = 0.0
    top_logprobs: int = 5         # label probabilities read from the first token's top log-probabilities
    use_logprobs: bool = True     # False (or a server that refuses them): the answer's text is read instead
    max_retries: int = 6          # per request, with exponential back-off between backoff_base and backoff_max s
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    timeout: float = 120.0        # seconds per request
    concurrency: int = 32         # requests in flight at once (why 32: ``eval.judge_concurrency`` in sgpo.config.schema)
    verdict_max_tokens: int = 4096  # Arena-Hard verdicts: the judgment's length
    extra_body: dict = field(default_factory=dict)  # more fields for every request body

    def __post_init__(self):
        self.concurrency = max(1, int(self.concurrency))
        self.extra_body = dict(self.extra_body or {})


class OpenAIJudge(Judge):
    gives_verdicts = True

    def __init__(self, model: str, base_url: str | None = None, *, api_key: str | None = None,
                 template: str = "auto", **settings):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.template = pairwise_template(template)
        self.template_name = self.template.name
        self.settings = s = OpenAISettings(**settings)
        seed, temperature = s.seed, s.temperature
        self.name = f"openai:{model}"
        self.spec = f"openai:{model}@{self.base_url}"
        self.cache_id = f"{self.spec}|{self.template_name}:{self.template.digest}|seed={seed}|t={temperature}"
        self.verdict_template_name = ARENA_TEMPLATE_NAME
        self.counts = {"requests": 0, "retries": 0, "failed": 0, "by_logprobs": 0, "by_text": 0, "identical": 0}
        self.failures: list[dict] = []
        self._lock = threading.Lock()

    def stats(self) -> dict:
        """Requests, retries, failed annotations and how the answers were read, so far."""
        with self._lock:
            return dict(self.counts)

    # ---------------------------------------------------------------- HTTP
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def _fail(self, what: str, reason: str) -> None:
        with self._lock:
            self.counts["failed"] += 1
            self.failures.append({"item": what, "reason": reason})
        log.warning("judge %s: failed annotation (%s): %s", self.name, what, reason)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.settings.backoff_base * (2 ** attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(self.settings.backoff_max, delay) * (1.0 + 0.1 * random.random())

    def chat(self, messages: list[dict], **params) -> tuple[dict | None, str | None]:
        """POST one chat completion; returns (reply JSON, None) or (None, reason). Retries transient errors."""
        return self._exchange(messages, params)[:2]

    def probe(self) -> None:
        """One minimal request (a one-token reply; no cache, no template): ``APIError`` naming the URL and the HTTP
        status unless the server answers with JSON. What a run asks before its first stage."""
        reply, reason, status = self._exchange([{"role": "user", "content": "Reply with the letter m."}],
                                               {"max_tokens": 1, "temperature": 0.0})
        if reply is None:
            raise APIError(self.url, status, reason or "no reply")

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _exchange(self, messages: list[dict], params: dict) -> tuple[dict | None, str | None, int | None]:
        """``chat``'s work: (reply, None, 200) or (None, reason, the last HTTP status or None without one)."""
        body = {"model": self.model, "messages": messages, **self.settings.extra_body, **params}
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        reason, status = "no attempt", None
        for attempt in range(self.settings.max_retries + 1):
            self._count("requests")
            retry_after = None
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.settings.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw), None, 200
                except ValueError:
                    return None, f"reply is not JSON: {raw[:200]!r}", 200
            except urllib.error.HTTPError as e:
                detail = error_detail(e.read()[:4000]) if e.fp is not None else ""
                if e.code in FATAL_STATUS:
                    raise APIError(self.url, e.code, detail) from None
                reason, status = f"HTTP {e.code}: {detail}", e.code
                if e.code not in RETRY_STATUS:
                    return None, reason, status
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                    http.client.HTTPException) as e:
                reason, status = f"{type(e).__name__}: {e}", None
            if attempt < self.settings.max_retries:
                self._count("retries")
                time.sleep(self._delay(attempt, retry_after))
        return None, f"gave up after {self.settings.max_retries + 1} attempts: {reason}", status

    # ---------------------------------------------------------------- weighted preference
    def _label_probability(self, reply: dict, labels: tuple[str, str]) -> tuple[float, str]:
        """p(first shown is better) from a reply, and how it was read ('logprobs' or 'text'); NaN if unreadable."""
        try:
            choice = reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            return math.nan, "no choices in reply"
        try:
            top = choice["logprobs"]["content"][0]["top_logprobs"]
            scores = {lab: [] for lab in labels}
            for entry in top:
                token = str(entry["token"]).strip()
                if token in scores:
                    scores[token].append(float(entry["logprob"]))
            first, second = (_logsumexp(scores[lab]) for lab in labels)
            if first != -math.inf or second != -math.inf:
                total = _logsumexp([first, second])
                return math.exp(first - total), "logprobs"
        except (KeyError, IndexError, TypeError, ValueError):
            pass
        try:
            text = (choice["message"]["content"] or "").strip()
        except (KeyError, TypeError):
            return math.nan, "no message in reply"
        if text == labels[0]:
            return 1.0, "text"
        if text == labels[1]:
            return 0.0, "text"
        return math.nan, f"reply is not a label: {text[:80]!r}"

    def _prefer_one(self, i: int, prompt: str, a: str, b: str) -> float:
        if a == b:  # identical outputs are a tie, as in AlpacaEval; no request
            with self._lock:
                self.counts["identical"] += 1
            return 0.5
        swapped = swap_order(self.settings.seed, prompt, a, b)
        first, second = (b, a) if swapped else (a, b)
        params = {"max_tokens": 1, "temperature": self.settings.temperature}
        if self.settings.use_logprobs:
            params.update(logprobs=True, top_logprobs=self.settings.top_logprobs)
        reply, reason = self.chat(self.template.messages(prompt, first, second), **params)
        if reply is None and self.settings.use_logprobs and reason and reason.startswith("HTTP 400"):
            # some servers refuse log-probabilities: ask for the text label instead
            reply, reason = self.chat(self.template.messages(prompt, first, second),
                                      max_tokens=1, temperature=self.settings.temperature)
        if reply is None:
            self._fail(f"prefer #{i}", reason or "no reply")
            return math.nan
        p_first, how = self._label_probability(reply, self.template.labels)
        if math.isnan(p_first):
            self._fail(f"prefer #{i}", how)
            return math.nan
        self._count("by_logprobs" if how == "logprobs" else "by_text")
        return 1.0 - p_first if swapped else p_first

    def prefer(self, prompts, a, b, references=None) -> list[float]:
        """Preference for A over B per item in [0, 1]; NaN marks a failed annotation (see ``failures``).
        References are not shown to this judge (AlpacaEval's protocol)."""
        if not (len(prompts) == len(a) == len(b)):
            raise ValueError("prompts, a and b must have the same length")
        items = list(zip(range(len(prompts)), prompts, a, b))
        if self.settings.concurrency == 1 or len(items) <= 1:
            return [self._prefer_one(*it) for it in items]
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            return list(pool.map(lambda it: self._prefer_one(*it), items))

    # ---------------------------------------------------------------- Arena-Hard verdicts
    def verdict(self, question: str, answer_a: str, answer_b: str, reference: str | None = None,
                _item: str = "verdict") -> str | None:
        """One Arena-Hard style game: the verdict label, or ``None`` for a failed annotation."""
        messages = arena_verdict_messages(question, answer_a, answer_b, reference)
        reply, reason = self.chat(messages, max_tokens=self.settings.verdict_max_tokens, temperature=self.settings.temperature)
        if reply is None:
            self._fail(_item, reason or "no reply")
            return None
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            self._fail(_item, "no message in reply")
            return None
        label = parse_verdict(text)
        if label is None:
            self._fail(_item, f"no single verdict label in reply: {str(text)[-120:]!r}")
        else:
            self._count("by_text")
        return label

    def verdicts(self, questions, answers_a, answers_b, references=None) -> list[str | None]:
        n = len(questions)
        refs = list(references) if references is not None else [None] * n
        items = list(zip(questions, answers_a, answers_b, refs, [f"verdict #{i}" for i in range(n)]))
        if self.settings.concurrency == 1 or n <= 1:
            return [self.verdict(*it) for it in items]
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            return list(pool.map(lambda it: self.verdict(*it), items))
