"""The annotation cache: a re-run reuses annotations, an interrupted evaluation resumes, failures are retried."""
import json
import math

import pytest

from sgpo.eval.cache import AnnotationCache, CachedJudge, content_key
from sgpo.eval.judges import Judge, make_judge


class CountingJudge(Judge):
    """Prefers the longer text; counts the items it is asked about."""

    def __init__(self, name="counting", fail_on=()):
        self.name = name
        self.calls = 0
        self.items = 0
        self.fail_on = set(fail_on)

    def prefer(self, prompts, a, b, references=None):
        self.calls += 1
        self.items += len(prompts)
        return [math.nan if p in self.fail_on else (1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5)
                for p, x, y in zip(prompts, a, b)]


P = [f"prompt {i}" for i in range(7)]
A = [f"answer {'x' * i}" for i in range(7)]
B = ["answer xxx"] * 7


def test_rerun_reuses_annotations(tmp_path):
    path = tmp_path / "ann.jsonl"
    inner = CountingJudge()
    first = CachedJudge(inner, path, chunk_size=3).prefer(P, A, B)
    assert inner.items == 7 and inner.calls == 3  # chunks of 3, 3, 1
    assert first == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]

    again = CountingJudge()
    cached = CachedJudge(again, path)
    assert cached.prefer(P, A, B) == first
    assert again.calls == 0 and cached.hits == 7 and cached.misses == 0
    # one new item: only it goes to the judge
    assert cached.prefer(P + ["new"], A + ["a long new answer"], B + ["b"])[:7] == first
    assert again.items == 1
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 8 and all(r["judge"] == "counting" for r in lines)


def test_key_covers_judge_texts_and_reference(tmp_path):
    path = tmp_path / "ann.jsonl"
    CachedJudge(CountingJudge(), path).prefer(P[:2], A[:2], B[:2], references=["r0", "r1"])
    other = CountingJudge()
    cj = CachedJudge(other, path)
    cj.prefer(P[:2], A[:2], B[:2], references=["r0", "changed"])
    assert other.items == 1  # the changed reference is a new annotation
    cj.prefer(P[:2], B[:2], A[:2], references=["r0", "r1"])
    assert other.items == 3  # swapped candidates are new annotations
    named = CountingJudge(name="another-judge")
    CachedJudge(named, path).prefer(P[:2], A[:2], B[:2], references=["r0", "r1"])
    assert named.items == 2  # another judge does not reuse these
    k = content_key("j", "p", "a", "b", "ref")
    assert k != content_key("j", "p", "a", "b", None) and k != content_key("j2", "p", "a", "b", "ref")


def test_interrupted_file_resumes_and_failures_are_retried(tmp_path):
    path = tmp_path / "ann.jsonl"
    flaky = CountingJudge(fail_on={"prompt 2"})
    out = CachedJudge(flaky, path).prefer(P, A, B)
    assert math.isnan(out[2]) and sum(math.isnan(v) for v in out) == 1
    with open(path, "a") as f:
        f.write('{"key": "cut-short-by-a-kill')  # an interrupted write
    healed = CountingJudge()
    cj = CachedJudge(healed, path)
    assert cj.cache.skipped_lines == 1
    out2 = cj.prefer(P, A, B)
    assert healed.items == 1 and out2[2] == 0.0  # only the failed one is asked again
    reread = AnnotationCache(path)
    assert len(reread) == 7 and reread.skipped_lines == 1  # the new record starts on a line of its own


def test_duplicates_within_a_call_are_annotated_once(tmp_path):
    inner = CountingJudge()
    out = CachedJudge(inner, tmp_path / "c.jsonl").prefer(["p", "p", "q"], ["aa", "aa", "a"], ["b", "b", "bb"])
    assert out == [1.0, 1.0, 0.0] and inner.items == 2


def test_make_judge_wraps_with_cache(tmp_path, monkeypatch):
    import sgpo.eval.judges as judges

    class Fake(Judge):
        def __init__(self, model_path=None, **kw):
            self.name = "reference"
            self.calls = 0

        def prefer(self, prompts, a, b, references=None):
            self.calls += 1
            return [0.5] * len(prompts)

    monkeypatch.setattr(judges, "ReferenceJudge", Fake)
    judge = make_judge("reference", cache=str(tmp_path / "ref.jsonl"))
    assert isinstance(judge, CachedJudge) and judge.judge_id == "reference"
    judge.prefer(["p"], ["a"], ["b"], ["r"])
    judge.prefer(["p"], ["a"], ["b"], ["r"])
    assert judge.judge.calls == 1
    with pytest.raises(ValueError):
        judge.prefer(["p", "q"], ["a"], ["b"])
