"""Datasets in the formats people have → ``Record``s (prompt messages + optional reference response).

Accepted: JSONL, JSON (a list, or an object holding one list), Parquet, HF dataset directories (``save_to_disk``) and
hub names. Row shapes: conversational ``messages`` (the last assistant turn is the reference, the turns before it the
prompt), ``prompt``/``response``, ``instruction``/``output`` (an optional ``input`` is appended to the instruction),
``prompt``/``chosen``/``rejected`` for preference data. Embedded sources (shipped in a package, offline):
``sgpo:arena-hard-v2`` (questions with o3-mini answers) and ``sgpo:alpaca-eval`` (instructions with GPT-4 Turbo outputs).

A malformed row raises ``DataError`` naming file, line and field, or is skipped and counted (``on_error="skip"``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sgpo.core.files import JsonlError, iter_jsonl, jsonl_lines
from sgpo.core.text import cut_reference  # noqa: F401  (the cut of references: imported from here by the run's parts)


class DataError(Exception):
    """A data problem; the message names the file, line and field (one line). ``reason``: the kind, for counts."""

    def __init__(self, message: str, reason: str | None = None):
        message = " ".join(str(message).split("\n"))
        super().__init__(message)
        self.reason = reason or message.split(": ", 1)[-1].split(" (")[0]


def _show(name: Any, limit: int = 40) -> str:
    """A field name from the data, safe to put in a one-line message."""
    s = repr(name) if not isinstance(name, str) or not name.isprintable() else name
    return s if len(s) <= limit else s[:limit] + "…"


def _check_text(v: str, where: str, name: str) -> str:
    """Strings from JSON may hold lone surrogates (\\ud800), which no tokenizer or file can encode."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: field '{name}' holds invalid Unicode (a lone surrogate escape)",
                        "invalid Unicode") from None
    return v


@dataclass(frozen=True)
class Record:
    id: str
    prompt: tuple[tuple[str, str], ...]  # ((role, content), ...) ending with a user turn
    reference: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    fields: dict = field(default_factory=dict, hash=False)
    """The row's other columns (JSON values), e.g. a verifiable instruction's constraints: what a judge that reads the
    row receives (``row()``), beside the reference."""

    @property
    def prompt_text(self) -> str:
        """The last user turn (what a judge or an improver instruction shows as 'the request')."""
        return self.prompt[-1][1]

    def messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt]

    def row(self) -> dict:
        """What a judge that reads rows is given: the row's fields, the request (``prompt``) and the ``reference``."""
        return {**self.fields, "prompt": self.prompt_text, "reference": self.reference}


CONSUMED = frozenset({"prompt", "response", "completion", "messages", "instruction", "input", "output", "chosen",
                      "rejected"})
"""The columns a record is made of; any other column of a row is kept in ``Record.fields``."""


def _fields(row: dict) -> dict:
    """A row's other columns whose values JSON can hold (what reaches a judge and the stage's input hash)."""
    return {k: v for k, v in row.items() if isinstance(k, str) and k not in CONSUMED and _is_json(v)}


def _is_json(v: Any) -> bool:
    if v is None or isinstance(v, (str, bool, int, float)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_json(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_json(x) for k, x in v.items())
    return False


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        s = f"{self.source}: {self.loaded} records"
        if self.skipped:
            s += " (skipped " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) + ")"
        return s


def record_id(prompt: tuple) -> str:
    return hashlib.sha256(json.dumps(prompt, ensure_ascii=False).encode()).hexdigest()[:16]


def _text(row: dict, name: str, where: str, required: bool = True) -> str | None:
    if name not in row or row[name] is None:
        if required:
            raise DataError(f"{where}: missing field '{name}'")
        return None
    v = row[name]
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(v).__name__}",
                        f"field '{name}' is not a string")
    if required and not v.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return _check_text(v, where, name)


def _message_text(content: Any, where: str, name: str = "messages") -> str:
    if isinstance(content, str):
        return _check_text(content, where, name)
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        parts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if parts:
            return _check_text("".join(parts), where, name)
    raise DataError(f"{where}: field '{name}' is not text (a string, or a list of {{type: text, text}} parts), "
                    f"got {type(content).__name__}", "a message whose 'content' is not text")


_ROLES = ("system", "user", "assistant")


def _conversation(msgs: Any, where: str, name: str = "messages") -> tuple[tuple[tuple[str, str], ...], str | None]:
    """A list of {role, content} messages → (prompt turns ending with a user turn, the final assistant reply or None).

    ``name`` is the row's field the messages come from, for error messages."""
    if not isinstance(msgs, list) or not msgs:
        got = "an empty list" if isinstance(msgs, list) else type(msgs).__name__
        raise DataError(f"{where}: field '{name}' must be a non-empty list of {{role, content}} messages, got {got}",
                        f"field '{name}' is not a list of messages")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: field '{name}[{i}]' needs 'role' and 'content'",
                            "a message without 'role' or 'content'")
        if not isinstance(m["role"], str) or m["role"] not in _ROLES:
            raise DataError(f"{where}: field '{name}[{i}].role' must be one of {', '.join(_ROLES)}, "
                            f"got {repr(m['role'])[:40]}", "a message with an unknown role")
        turns.append((m["role"], _message_text(m["content"], where, f"{name}[{i}].content")))
    reference = None
    if turns[-1][0] == "assistant":
        reference = turns.pop()[1]
    if not turns:
        raise DataError(f"{where}: field '{name}' holds only an assistant message; the user's request must come "
                        f"before it", "no user message")
    role, text = turns[-1]
    if role != "user":
        if reference is None:
            raise DataError(f"{where}: the conversation in '{name}' ends with a '{role}' message; the last message "
                            f"must be the user's request or the assistant's reply to it", "no user message")
        raise DataError(f"{where}: in '{name}' the assistant's reply follows a message from '{role}'; it must "
                        f"follow the user's request", "no user message")
    if not text.strip():
        raise DataError(f"{where}: field '{name}[{len(turns) - 1}].content' is empty (the user's request"
                        f"{' before the reply' if reference is not None else ''})", "empty user message")
    return tuple(turns), reference


def parse_row(row: Any, where: str) -> Record:
    """One row of any accepted shape → Record (its other columns in ``fields``); ``where`` is 'file:line' for error
    messages."""
    rec = _parse_row(row, where)
    extra = _fields(row)
    return dataclasses.replace(rec, fields=extra) if extra else rec


def _parse_row(row: Any, where: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}", "a row is not an object")
    if "chosen" in row and "rejected" in row and "prompt" not in row and isinstance(row["chosen"], list):
        # conversational preference rows with an implicit prompt: the turns before the last one of ``chosen``
        if len(row["chosen"]) < 2:
            raise DataError(f"{where}: field 'chosen' holds {len(row['chosen'])} message(s) and there is no field "
                            f"'prompt'; without 'prompt', 'chosen' must hold the prompt turns and then the reply",
                            "missing field 'prompt'")
        prompt, _ = _conversation(row["chosen"][:-1], where, "chosen")
        return _preference(prompt, row, where)
    if "messages" in row and row["messages"] is not None and not ("prompt" in row and "chosen" in row):
        prompt, reference = _conversation(row["messages"], where)
        return Record(record_id(prompt), prompt, reference or None)
    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, list):  # conversational preference data: prompt as messages
            if "chosen" not in row and "rejected" not in row:
                raise DataError(f"{where}: field 'prompt' is a list of messages, the shape of preference data, but "
                                f"the row has no 'chosen' and 'rejected'; give a conversation as 'messages' instead",
                                "missing field 'chosen'")
            return _preference(_conversation(p, where, "prompt")[0], row, where)
        text = _text(row, "prompt", where)
        prompt = (("user", text),)
        if "chosen" in row or "rejected" in row:
            return _preference(prompt, row, where)
        ref = _text(row, "response", where, required=False)
        if ref is None:
            ref = _text(row, "completion", where, required=False)
        return Record(record_id(prompt), prompt, ref or None)
    if "instruction" in row:
        text = _text(row, "instruction", where)
        extra = _text(row, "input", where, required=False)
        if extra and extra.strip():
            text = f"{text}\n\n{extra}"
        prompt = (("user", text),)
        return Record(record_id(prompt), prompt, _text(row, "output", where, required=False) or None)
    found = sorted(map(_show, row))
    raise DataError(f"{where}: missing field 'prompt' (or 'messages', or 'instruction'); found fields: "
                    f"{', '.join(found[:10]) + (', …' if len(found) > 10 else '') or 'none'}",
                    "missing field 'prompt'")


def _preference(prompt: tuple, row: dict, where: str) -> Record:
    def side(name):
        v = row.get(name)
        if isinstance(v, list):  # conversational side: the last assistant message
            if not v:
                raise DataError(f"{where}: field '{name}' is an empty list; it must end with the assistant's reply",
                                f"field '{name}' is empty")
            last = v[-1]
            if not isinstance(last, dict) or "content" not in last:
                raise DataError(f"{where}: field '{name}[{len(v) - 1}]' must be a message with 'role' and 'content' "
                                f"(the assistant's reply)", "a message without 'role' or 'content'")
            role = last.get("role", "assistant")
            if role != "assistant":
                raise DataError(f"{where}: field '{name}' ends with a '{_show(role)}' message; its last message "
                                f"must be the assistant's reply", f"field '{name}' does not end with a reply")
            text = _message_text(last["content"], where, f"{name}[{len(v) - 1}].content")
            if not text.strip():
                raise DataError(f"{where}: field '{name}[{len(v) - 1}].content' is empty (the assistant's reply)",
                                f"field '{name}' is empty")
            return text
        if v is not None and not isinstance(v, str):
            raise DataError(f"{where}: field '{name}' must be a string or a list of messages, got "
                            f"{type(v).__name__}", f"field '{name}' is not a string")
        return _text(row, name, where)

    return Record(record_id(prompt), prompt, None, side("chosen"), side("rejected"))


def _no_reference(row: Any, rec: Record, where: str) -> DataError:
    """Why a row that parsed gives no reference response (``need="reference"``), said in the row's own terms."""
    reason = "no reference response"
    if rec.chosen is not None:
        return DataError(f"{where}: a preference row (prompt/chosen/rejected) has no reference response; SFT data "
                         f"needs 'response', 'output' or 'messages' ending with the assistant's reply", reason)
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
        last = row["messages"][-1]
        role = last.get("role") if isinstance(last, dict) else None
        if role == "assistant":
            return DataError(f"{where}: the assistant's reply (the last message of 'messages', the SFT reference) "
                             f"is empty", reason)
        return DataError(f"{where}: the conversation ends with a '{_show(role)}' message; the last message must be "
                         f"the assistant's reply (the SFT reference)", reason)
    if isinstance(row, dict) and "prompt" not in row and "instruction" in row:
        names = ("output",)
    else:
        names = ("response", "completion")
    for name in names:
        if isinstance(row, dict) and row.get(name) is not None:
            return DataError(f"{where}: field '{name}' is empty (SFT data needs a reference response)", reason)
    return DataError(f"{where}: missing field '{names[0]}' (SFT data needs a reference response)", reason)


def _iter_file(path: Path) -> Iterator[tuple[Any, str]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for where, row in jsonl_lines(path):
            yield (DataError(str(row), row.reason) if isinstance(row, JsonlError) else row), where
    elif suffix == ".json":
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        data = _json_or_error(text, str(path))
        if isinstance(data, DataError):
            raise data
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: a JSON file must hold a list of rows (or an object with one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: a JSON file must hold a list of rows")
        for i, row in enumerate(data):
            yield row, f"{path}[{i}]"
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        for i, row in enumerate(table.to_pylist()):
            yield row, f"{path}:row {i}"
    else:
        raise DataError(f"{path}: unknown file type '{suffix}' (use .jsonl, .json or .parquet)")


def _json_or_error(text: str, where: str) -> Any:
    """Parsed JSON, or a ``DataError`` (returned, not raised) saying why not."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = f":{e.lineno}" if "\n" in text.strip() else ""
        return DataError(f"{where}{line}: invalid JSON ({e.msg} at column {e.colno})", "invalid JSON")
    except RecursionError:
        return DataError(f"{where}: invalid JSON (nested too deeply)", "invalid JSON")
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        return DataError(f"{where}: invalid JSON ({str(e).splitlines()[0][:80]})", "invalid JSON")


def renamed(row: Any, fields: dict | None, where: str) -> Any:
    """``row`` with its columns under the accepted names ``fields`` maps them from (``{"prompt": "question"}``: the
    row's ``question`` is read as its ``prompt``); a mapped column the row lacks is an error naming it."""
    if not fields or not isinstance(row, dict):
        return row
    out = dict(row)
    for name, column in fields.items():
        if column not in row:
            found = ", ".join(sorted(map(_show, row))[:10])
            raise DataError(f"{where}: missing field '{column}' (data.fields reads it as '{name}'); found fields: "
                            f"{found or 'none'}", f"missing field '{column}'")
        del out[column]
        out[name] = row[column]
    return out


def _named_as_in_source(e: DataError, fields: dict | None) -> DataError:
    """An error about a renamed field names the source's column too."""
    if not fields:
        return e
    msg = str(e)
    for name, column in fields.items():
        msg = msg.replace(f"field '{name}'", f"field '{column}' (read as '{name}')")
    return e if msg == str(e) else DataError(msg, e.reason)


def _iter_hf(name: str, split: str, subset: str = "") -> Iterator[tuple[Any, str]]:
    import datasets

    try:
        saved = Path(name) / "dataset_info.json", Path(name) / "dataset_dict.json"
        if any(p.exists() for p in saved):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, subset or None, split=split)
    except Exception as e:
        what = ("cannot load dataset" if Path(name).exists()
                else "no local file or folder of that name, and as a hub dataset it cannot be loaded")
        raise DataError(f"{name}: {what} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split '{split}' (has {', '.join(ds)})")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield row, f"{name}[{split}]:row {i}"


def package_data_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{package}' is not installed (run scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def _iter_embedded(name: str) -> Iterator[tuple[Any, str]]:
    tasks = package_data_dir("eval_framework") / "tasks"
    if name == "sgpo:alpaca-eval":
        path = tasks / "alpaca_eval" / "data" / "alpaca_eval_gpt4_baseline.json"
        for i, row in enumerate(json.loads(path.read_text())):
            yield {"instruction": row["instruction"], "output": row["output"]}, f"{path}[{i}]"
    elif name == "sgpo:arena-hard-v2":
        base = tasks / "arena_hard" / "data" / "arena-hard-v2.0"
        answers = {a["uid"]: a["messages"][-1]["content"]["answer"]
                   for _, a in iter_jsonl(base / "model_answer" / "o3-mini-2025-01-31.jsonl", "answers file")}
        for where, q in iter_jsonl(base / "question.jsonl", "questions file"):
            yield {"prompt": q["prompt"], "response": answers.get(q["uid"])}, where
    elif name == "sgpo:verifiable-instructions":
        from sgpo.data.verifiable import iter_rows

        yield from iter_rows(tasks / "alpaca_eval" / "data" / "alpaca_eval_gpt4_baseline.json")
    else:
        raise DataError(f"unknown embedded dataset '{name}' (known: {', '.join(EMBEDDED)})")


EMBEDDED = ("sgpo:alpaca-eval", "sgpo:arena-hard-v2", "sgpo:verifiable-instructions")
"""The data sources shipped in packages (offline)."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is shaped as a Hugging Face hub id (``name`` or ``owner/name``), by the hub's own rule."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def source_kind(source: str) -> str:
    """How a run reads a data source: ``embedded`` (``sgpo:``), ``file``, ``folder`` (an HF dataset directory),
    ``hub`` (no such path, and shaped as a hub dataset id: ``name`` or ``owner/name`` without a file suffix) or
    ``missing`` (no such path, and not a hub dataset id: it can only have meant a file). A dry run applies the same
    rule."""
    path = Path(source)
    if source.startswith("sgpo:"):
        return "embedded"
    if path.is_file():
        return "file"
    if path.is_dir():
        return "folder"
    return "hub" if not path.suffix and is_hub_id(source) else "missing"


def missing_source(source: str, key: str = "") -> DataError:
    """The error for a ``missing`` source (``source_kind``), naming the config key when given."""
    return DataError(f"{key + ': ' if key else ''}{source}: no such file (looked for as a local file, from "
                     f"{Path.cwd()}; not a hub dataset id, which is 'name' or 'owner/name' without a file suffix)")


def load_records(source: str, *, split: str = "train", on_error: str = "raise", need: str = "prompt",
                 fields: dict | None = None, subset: str = "") -> tuple[list[Record], LoadReport]:
    """Load ``source`` into records. ``need``: 'prompt', 'reference' (SFT data) or 'preference' (chosen/rejected).
    ``fields`` maps the accepted field names to the source's own columns (``{"prompt": "question"}``); ``subset`` is
    a hub dataset's configuration name.

    Duplicate prompts are kept once (counted as skipped 'duplicate prompt').
    """
    kind = source_kind(source)
    if kind == "missing":
        raise missing_source(source)
    rows = (_iter_embedded(source) if kind == "embedded" else _iter_file(Path(source)) if kind == "file"
            else _iter_hf(source, split, subset))
    report = LoadReport(source)
    records, seen = [], set()
    for row, where in rows:
        try:
            if isinstance(row, DataError):
                raise row
            rec = parse_row(renamed(row, fields, where), where)
            if need == "reference" and not (rec.reference and rec.reference.strip()):
                raise _no_reference(row, rec, where)
            if need == "preference" and rec.chosen is None:
                raise DataError(f"{where}: missing field 'chosen' (preference data needs prompt/chosen/rejected)",
                                "missing field 'chosen'")
        except DataError as e:
            e = _named_as_in_source(e, fields)
            if on_error == "raise":
                raise e from None
            report.skipped[e.reason] += 1
            continue
        if rec.id in seen:
            report.skipped["duplicate prompt"] += 1
            continue
        seen.add(rec.id)
        records.append(rec)
    report.loaded = len(records)
    if not records:
        raise DataError(f"{source}: no usable records" + (f" ({report.summary()})" if report.skipped else ""))
    return records, report


def split_dev(records: list[Record], dev_size: int, seed: int, test_size: int = 0) -> tuple[list[Record], ...]:
    """A fixed split by seed: (training pool, development slice), or with ``test_size`` (training pool, development
    slice, test slice). One seeded shuffle: the test slice comes first, then the development slice, so a change of
    ``dev_size`` never moves a prompt into or out of the test split. At least one record stays in the pool."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    test_size = min(test_size, max(len(records) - 1, 0))
    dev_size = min(dev_size, max(len(records) - 1 - test_size, 0))
    test = [records[i] for i in order[:test_size]]
    dev = [records[i] for i in order[test_size:test_size + dev_size]]
    train = [records[i] for i in order[test_size + dev_size:]]
    return (train, dev, test) if test_size else (train, dev)
