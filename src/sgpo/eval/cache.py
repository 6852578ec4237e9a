"""On-disk annotation cache: a re-run reuses annotations and an interrupted evaluation resumes where it stopped.

Records are JSON lines appended to one file and flushed as they are made; a line cut short by an interruption is
skipped when the file is read back. The key of an annotation is a hash of its content: the judge's identity (spec,
template, seed — whatever changes its answers), the prompt, both candidate texts and the reference (hashed). Failed
annotations (NaN) are not stored, so a re-run tries them again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from sgpo.core.phases import phase
from sgpo.eval.base import Judge, compare_scores, needs_rows, traits


def content_key(judge_id: str, prompt: str, a: str, b: str, reference: str | None = None, kind: str = "prefer",
                row: Mapping | None = None) -> str:
    """The cache key of one annotation: the judge, the prompt, both texts, the reference (hashed) and, for a judge
    that reads rows, the whole row (hashed; a row-less key is what it has always been)."""
    ref = None if reference is None else hashlib.sha256(reference.encode("utf-8")).hexdigest()
    parts = [kind, judge_id, prompt, a, b, ref]
    if row is not None:
        parts.append(hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest())
    payload = json.dumps(parts, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def judge_identity(judge: Judge) -> str:
    """What distinguishes one judge's annotations from another's: its ``cache_id`` when it has one, else its spec
    (set by ``make_judge``), else its name."""
    return judge.cache_id or judge.spec or judge.name or type(judge).__name__


class AnnotationCache:
    """Append-only JSONL store of ``key -> value`` (last record of a key wins)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data: dict[str, Any] = {}
        self.skipped_lines = 0
        self._lock = threading.Lock()
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                        self._data[rec["key"]] = rec["value"]
                    except (ValueError, KeyError, TypeError):
                        self.skipped_lines += 1  # a line cut short by an interruption
        self._file = None

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str, default=None):
        return self._data.get(key, default)

    def put_many(self, records: Sequence[tuple[str, Any, dict | None]]) -> None:
        """Store ``(key, value, extra)`` records; ``extra`` (e.g. the judge name) is written beside them."""
        if not records:
            return
        with self._lock:
            if self._file is None:
                # start on a fresh line if the previous writer was cut off mid-line
                needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
                self._file = open(self.path, "a", encoding="utf-8")
                if needs_newline:
                    self._file.write("\n")
            for key, value, extra in records:
                rec = {"key": key, "value": value}
                if extra:
                    rec.update({k: v for k, v in extra.items() if k not in rec})
                self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self._data[key] = value
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class CachedJudge(Judge):
    """Wraps a judge with an annotation cache: only items not yet annotated are sent to the judge, in chunks of
    ``chunk_size`` that are written to disk as soon as each is done (so an interrupted run loses at most one chunk).

    ``hits`` and ``misses`` count the items served from the cache and those sent to the judge; ``stats()`` adds them
    to the wrapped judge's own.
    """

    def __init__(self, judge: Judge, path: str | os.PathLike, chunk_size: int = 32):
        self.judge = judge
        self.cache = AnnotationCache(path)
        self.chunk_size = max(1, int(chunk_size))
        self.judge_id = judge_identity(judge)
        self.name = judge.name or self.judge_id
        self.spec = judge.spec
        self.template_name = judge.template_name
        self.gives_verdicts = judge.gives_verdicts
        self.reads_rows, self.gives_scores, self.reads_reference = traits(judge)
        self.hits = 0
        self.misses = 0

    def stats(self) -> dict:
        return {**self.judge.stats(), "hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        self.judge.close()
        self.cache.close()

    @phase("judging")
    def prefer(self, prompts, a, b, references=None, rows=None) -> list[float]:
        n = len(prompts)
        if not (len(a) == len(b) == n) or (references is not None and len(references) != n):
            raise ValueError("prompts, a, b (and references) must have the same length")
        if self.gives_scores:  # a scorer's scores are cached one response at a time, and compared
            rows = needs_rows(self, rows, n)
            return compare_scores(self.score(prompts, a, rows), self.score(prompts, b, rows))
        refs = list(references) if references is not None else [None] * n
        rows = needs_rows(self, rows, n) if self.reads_rows else [None] * n
        keys = [content_key(self.judge_id, p, x, y, r, row=w) for p, x, y, r, w in zip(prompts, a, b, refs, rows)]
        return self._annotate(keys, lambda idx: self.judge.prefer(
            [prompts[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx],
            None if references is None else [refs[i] for i in idx],
            **({"rows": [rows[i] for i in idx]} if self.reads_rows else {})))

    @phase("judging")
    def score(self, prompts, responses, rows) -> list[float]:
        """A scorer's cached scores: one annotation per (prompt, response, row)."""
        keys = [content_key(self.judge_id, p, x, "", kind="score", row=w) for p, x, w in zip(prompts, responses, rows)]
        return self._annotate(keys, lambda idx: self.judge.score(
            [prompts[i] for i in idx], [responses[i] for i in idx], [rows[i] for i in idx]))

    def _annotate(self, keys: list[str], ask) -> list[float]:
        """The value of every key: from the cache, else ``ask(indices)`` for the first item of each missing key (an
        identical item within one call is annotated once), in chunks of ``chunk_size``, each written as it is done;
        failed annotations (NaN) are not stored."""
        out: list[float] = [float("nan")] * len(keys)
        first_of: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in self.cache:
                out[i] = float(self.cache.get(k))
                self.hits += 1
            else:
                first_of.setdefault(k, i)
        unique = list(first_of.values())
        for start in range(0, len(unique), self.chunk_size):
            idx = unique[start:start + self.chunk_size]
            for i, v in zip(idx, ask(idx)):
                out[i] = float(v)
            self.misses += len(idx)
            self.cache.put_many([(keys[i], out[i], {"judge": self.judge_id}) for i in idx if not math.isnan(out[i])])
        return [out[first_of[k]] if k in first_of else v for k, v in zip(keys, out)]

    @phase("judging")
    def verdicts(self, questions, answers_a, answers_b, references=None) -> list[str | None]:
        """Cached Arena-Hard style verdicts, for judges that give them."""
        n = len(questions)
        refs = list(references) if references is not None else [None] * n
        keys = [content_key(self.judge_id, q, x, y, r, kind="verdict")
                for q, x, y, r in zip(questions, answers_a, answers_b, refs)]
        out: list[str | None] = [None] * n
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        for i, k in enumerate(keys):
            if k in self.cache:
                out[i] = self.cache.get(k)
                self.hits += 1
        for start in range(0, len(todo), self.chunk_size):
            idx = todo[start:start + self.chunk_size]
            got = self.judge.verdicts([questions[i] for i in idx], [answers_a[i] for i in idx],
                                      [answers_b[i] for i in idx],
                                      None if references is None else [refs[i] for i in idx])
            self.misses += len(idx)
            records = []
            for i, v in zip(idx, got):
                out[i] = v
                if v is not None:
                    records.append((keys[i], v, {"judge": self.judge_id}))
            self.cache.put_many(records)
        return out
