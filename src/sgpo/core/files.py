"""Files that survive a kill: atomic writes (file or directory), append-only JSONL shards, one writer process."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

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
