"""Faults: each ends in a clear one-line error, and nothing already written is damaged.

Tried here: a full disk (file-size limit on the CLI, ENOSPC injected into atomic writes and shard appends), a
read-only output directory (EROFS injected; root ignores permission bits), an output path under a file, a missing
model, a corrupted stage model, a corrupted, foreign or truncated training checkpoint, a corrupted manifest, a config
from a newer version (given, or found in the run directory), a manifest from a newer version, bad data through the CLI.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sgpo.core.files import RunError, Shard, atomic_write_json, read_jsonl
from sgpo.run.stages import RunDir
from sgpo.training.loop import Job, Optim, run_steps

from cli_runs import REPO, cli_env, command, write_data

SMALL = ["--set", "rounds=1"]


def cli(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900, **kw)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    # progress bars redraw with carriage returns: the error is the one line that starts with "sgpo: error: "
    errors = [x[x.index("sgpo: error: "):] for x in p.stderr.replace("\r", "\n").splitlines() if "sgpo: error: " in x]
    assert len(errors) == 1, p.stderr[-2000:]
    return errors[0]


def snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("runs") / "done"
    p = cli(command(out, data))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


# -- the disk ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_disk_full_during_a_run_is_a_clear_error_and_the_run_resumes(tmp_path, data, finished):
    out = tmp_path / "full"
    limit = 2 << 20  # a file-size limit makes the first large write (a training checkpoint) fail, as a full disk

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = cli(command(out, data), preexec_fn=small_files)
    err = one_line_error(p)
    assert "cannot write" in err and str(out) in err
    # what was written before is intact and readable
    json.loads((out / "manifest.json").read_text())
    for shard in out.rglob("*.jsonl"):
        read_jsonl(shard)
    assert not list(out.rglob(".*tmp*"))
    # with room again, the same command finishes and gives the uninterrupted run's pairs
    p = cli(command(out, data))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "round_1" / "pairs.jsonl").read_bytes() == (finished / "round_1" / "pairs.jsonl").read_bytes()


def _fail_writes(monkeypatch, code: int, under: Path):
    real_open = builtins.open

    def fake_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and str(file).startswith(str(under)):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # pathlib's write_bytes/write_text


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "metrics.json"
    atomic_write_json(f, {"a": 1})
    _fail_writes(monkeypatch, errno.ENOSPC, tmp_path)
    with pytest.raises(RunError, match="no room to write") as e:
        atomic_write_json(f, {"a": 2})
    assert "\n" not in str(e.value) and str(f) in str(e.value)
    monkeypatch.undo()
    assert json.loads(f.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_shard_append_on_a_full_disk_leaves_whole_lines(tmp_path, monkeypatch):
    s = Shard(tmp_path / "drafts.jsonl")
    s.append([{"id": "a", "text": "x"}])

    real_fsync = os.fsync

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(RunError, match="no room to write"):
        s.append([{"id": "b", "text": "y" * 10000}])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert Shard(tmp_path / "drafts.jsonl").rows() == [{"id": "a", "text": "x"}]


def test_read_only_output_directory(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("mine")
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(ro)) and not self.exists():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    _fail_writes(monkeypatch, errno.EROFS, ro)
    for target in (ro, ro / "run"):
        with pytest.raises(RunError, match="not writable") as e:
            RunDir(target)
        assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert snapshot(ro) == {Path("keep.txt"): b"mine"}


@pytest.mark.slow
def test_output_path_under_a_file(tmp_path, data):
    f = tmp_path / "a-file"
    f.write_text("x")
    err = one_line_error(cli(command(f / "run", data)))
    assert "not writable" in err and str(f) in err
    assert f.read_text() == "x"


# -- models and checkpoints -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_missing_model(tmp_path, data):
    err = one_line_error(cli(command(tmp_path / "run", data, ["--set", f"model.name={tmp_path / 'no-such-model'}"])))
    assert "no-such-model" in err


@pytest.mark.slow
def test_corrupted_stage_model(tmp_path, data, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    weights = out / "improver" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])  # truncated
    m = json.loads((out / "manifest.json").read_text())
    for stage in ("round_1", "final"):  # the next stages must load it
        m["stages"].pop(stage)
    (out / "manifest.json").write_text(json.dumps(m))
    before = snapshot(out)
    err = one_line_error(cli(command(out, data)))
    assert "improver/model" in err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k.parts[0] == "improver"} == \
        {k: v for k, v in before.items() if k.parts[0] == "improver"}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1)


def _step(model, batch, whole=None):   # run_steps also passes the global batch
    x = torch.tensor([b[0] for b in batch])
    y = torch.tensor([b[1] for b in batch])
    loss = ((model.lin(x).squeeze(-1) - y) ** 2).mean()
    return loss, {"loss": loss.detach()}


BATCHES = [[([float(i), 1.0, -float(j)], float(i - j)) for j in range(3)] for i in range(6)]


def test_training_checkpoint_resume_equals_straight_run(tmp_path):
    straight = Tiny()
    h1 = run_steps(straight, BATCHES, _step, Optim(lr=0.05, warmup_steps=3), Job(0, 0, show_progress=False))

    class Killed(Exception):
        pass

    calls = {"n": 0}

    def dies_after_four(model, batch, whole=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return _step(model, batch)

    ck = tmp_path / "ck"
    with pytest.raises(Killed):
        run_steps(Tiny(), BATCHES, dies_after_four, Optim(lr=0.05, warmup_steps=3, checkpoint_every=2),
                  Job(0, 0, checkpoint_dir=ck, show_progress=False))
    assert [p.name for p in ck.iterdir()] == ["step_0000004"]
    resumed = Tiny()
    h2 = run_steps(resumed, BATCHES, _step, Optim(lr=0.05, warmup_steps=3, checkpoint_every=2),
                   Job(0, 0, checkpoint_dir=ck, show_progress=False))
    assert h2 == h1
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_corrupted_or_foreign_training_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    run_steps(Tiny(), BATCHES, _step, Optim(lr=0.05, checkpoint_every=2), Job(0, 0, checkpoint_dir=ck, show_progress=False))
    step = next(ck.glob("step_*"))
    # other training data: refused, not silently mixed in
    with pytest.raises(RunError, match="belongs to other training data"):
        run_steps(Tiny(), BATCHES[:5], _step, Optim(lr=0.05), Job(0, 0, checkpoint_dir=ck, show_progress=False))
    with pytest.raises(RunError, match="belongs to other training data"):
        run_steps(Tiny(), BATCHES, _step, Optim(lr=0.01), Job(0, 0, checkpoint_dir=ck, show_progress=False))
    state = (step / "state.pt").read_bytes()
    (step / "state.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(RunError, match="corrupted") as e:
        run_steps(Tiny(), BATCHES, _step, Optim(lr=0.05), Job(0, 0, checkpoint_dir=ck, show_progress=False))
    assert str(step) in str(e.value) and "\n" not in str(e.value)
    (step / "meta.json").write_text("{not json")
    with pytest.raises(RunError, match="corrupted"):
        run_steps(Tiny(), BATCHES, _step, Optim(lr=0.05), Job(0, 0, checkpoint_dir=ck, show_progress=False))


# -- run directory and config -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_corrupted_manifest(tmp_path, data, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "manifest.json").write_bytes(b"\x00garbage")
    before = snapshot(out)
    err = one_line_error(cli(command(out, data)))
    assert "manifest.json is corrupted" in err and "--force-restart" in err
    assert snapshot(out) == before


@pytest.mark.slow
def test_newer_versions(tmp_path, data, finished):
    err = one_line_error(cli(command(tmp_path / "new", data, ["--set", "version=99"])))
    assert "newer sgpo" in err and "version" in err
    assert not (tmp_path / "new").exists()
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    cfg = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(cfg.replace("version: 1", "version: 7"))
    before = snapshot(out)
    err = one_line_error(cli(command(out, data)))
    assert "newer sgpo" in err and str(out) in err
    assert snapshot(out) == before
    (out / "config.yaml").write_text(cfg)
    m = json.loads((out / "manifest.json").read_text())
    m["format"] = 5
    (out / "manifest.json").write_text(json.dumps(m))
    before = snapshot(out)
    err = one_line_error(cli(command(out, data)))
    assert "newer sgpo" in err and "manifest" in err
    assert snapshot(out) == before


@pytest.mark.slow
def test_bad_data_through_the_cli(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": ' + b"[" * 100000 + b"\n")
    err = one_line_error(cli(command(tmp_path / "run", bad)))
    assert f"{bad}:2:" in err and "invalid JSON" in err
