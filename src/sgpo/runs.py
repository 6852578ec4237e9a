"""The run directory: atomic writes, the manifest of stages, append-only shards, resume.

Layout::

    RUN/config.yaml          the resolved config
    RUN/manifest.json        stages with status (pending/running/done), input hash, wall time
    RUN/<stage files>        e.g. improver/drafts.jsonl, round_1/pairs.jsonl, round_1/metrics.json
    RUN/final/               the last model in HF format
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable


class RunError(Exception):
    """A run-directory problem (unwritable, changed config on resume, corrupted file); the message says which."""


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync and rename: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file; a torn last line (a kill during an append) is ignored, any other bad line is an error."""
    rows = []
    lines = Path(path).read_bytes().split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if n == len(lines):  # unterminated last line
                break
            raise RunError(f"{path}:{n}: corrupted line (delete the file to redo its stage)") from None
    return rows


class Shard:
    """An append-only JSONL file: each ``append`` writes whole lines, flushes and fsyncs (per batch)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop a torn tail left by a kill, so appends start on a fresh line
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                with open(self.path, "r+b") as f:
                    f.truncate(cut)

    def rows(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []

    def append(self, rows: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunDir:
    """A run directory with a manifest of stages. Only the main process writes (``writer=False`` elsewhere)."""

    def __init__(self, root: str | Path, writer: bool = True):
        self.root = Path(root)
        self.writer = writer
        if writer:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".write-test{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise RunError(f"output directory {self.root} is not writable: {e.strerror or e}") from None
        self.manifest_path = self.root / "manifest.json"
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"stages": {}}
        try:
            return json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{self.manifest_path} is corrupted; use a new --output or --force-restart") from None

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def save_manifest(self) -> None:
        if self.writer:
            atomic_write_json(self.manifest_path, self.manifest)

    def done(self, stage: str, inputs_hash: str | None = None) -> bool:
        s = self.manifest["stages"].get(stage)
        return bool(s and s.get("status") == "done" and (inputs_hash is None or s.get("inputs") == inputs_hash))

    @contextmanager
    def stage(self, name: str, inputs_hash: str | None = None):
        """Mark a stage running, then done with its wall time (``time/<name>_s``); a failure leaves it 'running'."""
        entry = self.manifest["stages"].setdefault(name, {})
        entry.update(status="running", inputs=inputs_hash, started=time.time())
        self.save_manifest()
        t0 = time.perf_counter()
        yield entry
        entry.update(status="done", seconds=round(time.perf_counter() - t0, 2), finished=time.time())
        self.save_manifest()

    def seconds(self, stage: str) -> float:
        return float(self.manifest["stages"].get(stage, {}).get("seconds", 0.0))
