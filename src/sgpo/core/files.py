"""Files that survive a kill: atomic writes (file or directory), append-only JSONL shards, one writer process; and
the reader of JSON Lines files, a run's and those given to sgpo."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

# Only the main process of a multi-process run writes run files; the others call ``set_writer(False)``.
_WRITER = True


class RunError(Exception):
    """A run-directory problem (unwritable, changed config on resume, corrupted file); the message says which."""


def set_writer(flag: bool) -> None:
    """Whether this process writes run files (False on every rank but the main one)."""
    global _WRITER
    _WRITER = bool(flag)


def is_writer() -> bool:
    return _WRITER


def write_error(path, e: BaseException) -> RunError:
    """A one-line error for a failed write. Libraries that write through their own streams (torch.save,
    safetensors) report a full disk as a RuntimeError, so those are named as a failed write too."""
    if isinstance(e, OSError):
        return _os_error(path, e)
    first = (str(e).splitlines() or [""])[0][:160]
    return RunError(f"cannot write {path}: the write failed ({type(e).__name__}: {first}); is the disk full or "
                    "the output directory not writable?")


def _os_error(path, e: OSError) -> RunError:
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        why += " (no room to write: free space and run again, the run resumes)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why += " (the output directory is not writable)"
    return RunError(f"cannot write {path}: {why}")


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
    if not _WRITER:
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise _os_error(path, e) from None
    fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: Path):
    """Fill a directory atomically: yields a temporary sibling to write into; on success it replaces ``path``.

    A kill or an error while writing leaves ``path`` as it was (the temporary directory is removed on error, or
    left behind as ``.<name>.tmp*`` after a kill and cleaned up by the next ``atomic_dir`` on the same path).
    Only the writer process writes; elsewhere the temporary path is yielded and nothing happens.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if not _WRITER:
        yield tmp
        return
    try:
        for old in path.parent.glob(f".{path.name}.tmp*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise _os_error(tmp, e) from None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(path, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


class JsonlError(ValueError):
    """A line of a JSON Lines file that is not valid UTF-8, not JSON or not a JSON object; the message names the file
    and the line. ``reason``: which of those, for counts; ``torn``: the line is the file's last and has no newline
    (in a file written by appends, one cut by a kill)."""

    def __init__(self, message: str, reason: str, torn: bool = False):
        super().__init__(message)
        self.reason, self.torn = reason, torn


def jsonl_lines(path, what: str = "") -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each non-blank line of a JSON Lines file, ``where`` being ``FILE:LINE``: the line's
    JSON value, or the ``JsonlError`` saying why it has none (yielded, not raised: the reader raises it, skips the
    line or stops). A byte-order mark opening the file is dropped. ``what`` names the file in the errors
    ('judgments file'); empty, they name its line only."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where, torn = f"{path}:{n}", not raw.endswith(b"\n")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                said = f"the {what} is not valid UTF-8" if what else "not valid UTF-8"
                yield where, JsonlError(f"{where}: {said} ({e.reason} at byte {e.start})", "not valid UTF-8", torn)
                continue
            if line.strip():
                yield where, _json_line(line, where, what, torn)


def _json_line(line: str, where: str, what: str, torn: bool) -> Any:
    """The JSON value of one line, or the ``JsonlError`` saying why it has none."""
    in_the = f" in the {what}" if what else ""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        hint = "; a JSON Lines file holds one JSON object per line" if what else ""
        return JsonlError(f"{where}: invalid JSON{in_the} ({e.msg} at column {e.colno}){hint}", "invalid JSON", torn)
    except (RecursionError, ValueError) as e:  # ValueError: e.g. an integer with more digits than Python converts
        detail = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:80]
        return JsonlError(f"{where}: invalid JSON{in_the} ({detail})", "invalid JSON", torn)


def iter_jsonl(path, what: str = "file") -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each non-blank line of a JSON Lines file given to sgpo (``jsonl_lines``). A line that is
    not valid UTF-8, not valid JSON or not a JSON object raises ``JsonlError`` (a ``ValueError``) naming the file,
    the line and ``what`` the file is."""
    for where, row in jsonl_lines(path, what):
        if isinstance(row, JsonlError):
            raise row
        if not isinstance(row, dict):
            raise JsonlError(f"{where}: each line of the {what} must be a JSON object, got {type(row).__name__} "
                             "(a JSON Lines file holds one object per line)", "a row is not an object")
        yield where, row


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file of a run; a torn last line (a kill during an append) is ignored, any other bad line is an
    error."""
    rows = []
    for where, row in jsonl_lines(path):
        if isinstance(row, JsonlError):
            if row.torn:  # unterminated last line
                break
            raise RunError(f"{where}: corrupted line (delete the file to redo its stage)") from None
        rows.append(row)
    return rows


class Shard:
    """An append-only JSONL file: each ``append`` writes whole lines, flushes and fsyncs (per batch)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not _WRITER:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(self.path.parent, e) from None
        if self.path.exists():  # drop a torn tail left by a kill, so appends start on a fresh line
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                with open(self.path, "r+b") as f:
                    f.truncate(cut)

    def rows(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []

    def append(self, rows: Iterable[dict]) -> None:
        """Append whole lines and fsync. A failed write (full disk) is cut back, so the shard stays well formed."""
        if not _WRITER:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        try:
            with open(self.path, "ab") as f:
                start = f.tell()
                try:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    f.truncate(start)
                    raise
        except OSError as e:
            raise _os_error(self.path, e) from None


def content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
