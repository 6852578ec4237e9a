"""Data loading under hostile input: every case is a clean load or a one-line ``DataError`` naming file and line.

The structured generator knows which lines are good, so with ``on_error: skip`` the test also checks *what* was
loaded: the distinct good prompts, in order, with every other non-blank line counted under some reason.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgpo.data.records import DataError, load_records

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@st.composite
def good_line(draw):
    prompt, response = draw(text), draw(text)
    shape = draw(st.sampled_from(["prompt", "instruction", "messages"]))
    if shape == "prompt":
        row = {"prompt": prompt, "response": response}
    elif shape == "instruction":
        row = {"instruction": prompt, "output": response}
    else:
        row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    key = prompt
    return _line(row), ("good", key)


@st.composite
def bad_line(draw):
    kind = draw(st.sampled_from([
        "bytes", "utf8", "not_json", "wrong_shape", "missing", "null", "empty", "wrong_type", "no_reference",
        "deep", "huge_int", "surrogate", "bad_messages", "bad_role"]))
    if kind == "bytes":
        raw = draw(st.binary(min_size=1, max_size=60)).replace(b"\n", b" ")
        if not raw.strip():
            raw = b"\xff"
        try:  # random bytes may by chance be a valid row; such a line is not "bad"
            row = json.loads(raw.decode("utf-8"))
            if isinstance(row, dict) and ("prompt" in row or "messages" in row or "instruction" in row):
                raw = b"\xff" + raw
        except (UnicodeDecodeError, ValueError, RecursionError):
            pass
        return raw + b"\n", ("bad", kind)
    if kind == "utf8":
        return b'{"prompt": "caf\xe9", "response": "x"}\n', ("bad", kind)
    if kind == "not_json":
        return draw(st.sampled_from([b"{", b"{'prompt': 1}", b'{"prompt": "a",}', b"[1, 2"])) + b"\n", ("bad", kind)
    if kind == "wrong_shape":
        v = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return _line(v), ("bad", kind)
    if kind == "missing":
        d = draw(st.dictionaries(st.sampled_from(["response", "output", "foo", "\n", "id"]), json_values, max_size=3))
        return _line(d), ("bad", kind)
    if kind == "null":
        field = draw(st.sampled_from(["prompt", "response"]))
        row = {"prompt": draw(text), "response": draw(text)}
        row[field] = None
        return _line(row), ("bad", kind)
    if kind == "empty":
        row = {"prompt": draw(st.sampled_from(["", " ", "\n\t"])), "response": draw(text)}
        return _line(row), ("bad", kind)
    if kind == "wrong_type":
        return _line({"prompt": draw(st.integers() | st.dictionaries(st.text(max_size=3), st.integers())),
                      "response": "r"}), ("bad", kind)
    if kind == "no_reference":
        return _line({"prompt": draw(text), "response": draw(st.sampled_from(["", "  "]))}), ("bad", kind)
    if kind == "deep":
        n = draw(st.integers(2000, 50000))
        return b'{"prompt": ' + b"[" * n + b"]" * n + b"}\n", ("bad", kind)
    if kind == "huge_int":
        return b'{"prompt": "p", "response": ' + b"9" * 6000 + b"}\n", ("bad", kind)
    if kind == "surrogate":
        return b'{"prompt": "bad \\ud800 text", "response": "r"}\n', ("bad", kind)
    if kind == "bad_messages":
        v = draw(st.sampled_from([[], "hi", [1], [{"role": "user"}], [{"role": "assistant", "content": "x"}],
                                  [{"role": "user", "content": {"a": 1}}]]))
        return _line({"messages": v}), ("bad", kind)
    return _line({"messages": [{"role": draw(st.sampled_from([3, None, "robot"])), "content": "x"},
                               {"role": "assistant", "content": "y"}]}), ("bad", kind)


blank = st.sampled_from([b"\n", b"   \n", b"\t\n"]).map(lambda b: (b, ("blank", None)))
lines = st.lists(st.one_of(good_line(), good_line(), bad_line(), blank), min_size=0, max_size=25)


_DIR = Path(tempfile.mkdtemp(prefix="sgpo-fuzz-"))


def _write(data: bytes, suffix: str) -> Path:
    """One file per suffix, rewritten for every example (nothing piles up in the temporary directory)."""
    p = _DIR / f"data{suffix}"
    p.write_bytes(data)
    return p


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    import shutil

    shutil.rmtree(_DIR, ignore_errors=True)


def _assert_clean_error(e: DataError, path: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg
    assert str(path) in msg


@SETTINGS
@given(lines, st.booleans())
def test_jsonl_lines_load_cleanly_or_fail_with_file_and_line(items, gigantic):
    if gigantic:  # one gigantic (but valid) line
        items = items + [(_line({"prompt": "big " + "x" * 2_000_000, "response": "r"}), ("good", "big " + "x" * 2_000_000))]
    path = _write(b"".join(b for b, _ in items), ".jsonl")
    kinds = [k for _, k in items]
    good = [key for kind, key in kinds if kind == "good"]
    distinct = list(dict.fromkeys(good))
    n_bad = sum(1 for kind, _ in kinds if kind == "bad")

    # skip: the good rows (deduplicated, in order), every bad line counted by reason
    try:
        records, report = load_records(str(path), on_error="skip", need="reference")
    except DataError as e:
        _assert_clean_error(e, path)
        assert not distinct and "no usable records" in str(e)
    else:
        assert [r.prompt[-1][1] for r in records] == distinct
        assert report.loaded == len(records)
        assert report.skipped.get("duplicate prompt", 0) == len(good) - len(distinct)
        assert sum(report.skipped.values()) == n_bad + len(good) - len(distinct)
        assert "\n" not in report.summary()

    # raise: the first bad line is named with its line number
    first_bad = next((i for i, (kind, _) in enumerate(kinds) if kind == "bad"), None)
    try:
        records, report = load_records(str(path), on_error="raise", need="reference")
    except DataError as e:
        _assert_clean_error(e, path)
        if first_bad is not None:
            assert f"{path}:{first_bad + 1}:" in str(e)
        else:
            assert not distinct
    else:
        assert first_bad is None and [r.prompt[-1][1] for r in records] == distinct


def _load_in_both_modes(path) -> list:
    """``load_records`` with ``on_error`` skip and raise: each either fails with a clean error or loads at least one
    record and counts it right. Returns the records loaded (of both modes)."""
    loaded = []
    for mode in ("skip", "raise"):
        try:
            records, report = load_records(str(path), on_error=mode)
        except DataError as e:
            _assert_clean_error(e, path)
        else:
            assert report.loaded == len(records) > 0
            loaded += records
    return loaded


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([".jsonl", ".json", ".parquet"]))
def test_random_bytes_never_crash(data, suffix):
    _load_in_both_modes(_write(data, suffix))


@SETTINGS
@given(json_values | st.lists(json_values, max_size=6) | st.dictionaries(st.text(max_size=5), json_values))
def test_json_files_of_any_shape(value):
    records = _load_in_both_modes(_write(json.dumps(value).encode(), ".json"))
    assert all(r.prompt and r.prompt[-1][0] == "user" and r.prompt[-1][1].strip() for r in records)


def test_skipped_rows_are_reported_by_reason(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(_line({"prompt": "a", "response": "r"}) + b"\xff\xfe\n" + _line({"prompt": "a", "response": "s"})
                  + _line({"prompt": None, "response": "r"}) + _line([1, 2]) + b"{oops\n"
                  + _line({"prompt": "b", "response": "r"}))
    records, report = load_records(str(p), on_error="skip", need="reference")
    assert [r.prompt_text for r in records] == ["a", "b"]
    assert report.skipped == {"not valid UTF-8": 1, "duplicate prompt": 1, "missing field 'prompt'": 1,
                              "a row is not an object": 1, "invalid JSON": 1}
    s = report.summary()
    assert "1 duplicate prompt" in s and "1 invalid JSON" in s
    with pytest.raises(DataError, match=rf"^{p}:2: not valid UTF-8"):
        load_records(str(p), on_error="raise", need="reference")
    q = tmp_path / "e.jsonl"
    q.write_bytes(_line({"prompt": "a", "response": "r"}) + b"\n" + _line({"prompt": "b", "response": "r"})
                  + _line({"prompt": None, "response": "r"}))
    with pytest.raises(DataError, match=rf"^{q}:4: missing field 'prompt'"):
        load_records(str(q), on_error="raise")


def test_bom_on_the_first_line_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + _line({"prompt": "a", "response": "r"}))
    records, _ = load_records(str(p), need="reference")
    assert records[0].prompt_text == "a"
