"""Running the real ``sgpo`` command from the tests: a shrunken smoke run (``SETS``) on a small data file, killed or run
to the end, and what its run directory holds. Imported by the tests of several rooms."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETS = ["data.dev_size=2", "data.improver_size=4", "data.round_size=4", "eval.improver_size=0",
        "eval.head_to_head_size=0", "generation.max_new_tokens=8", "generation.batch_size=2", "improver.chain=1",
        "train.batch_size=2", "dpo.batch_size=2", "train.checkpoint_every=1", "dpo.checkpoint_every=1", "rounds=1"]


def write_data(path: Path, n: int = 16) -> Path:
    rng = random.Random(0)
    words = ("the a model answer question data river mountain light quick brown fox jumps over lazy dog code test "
             "run value").split()
    with open(path, "w") as f:
        for i in range(n):
            p = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(8)) + "?"
            r = (" ".join(rng.choice(words) for _ in range(20)) + ". "
                 + " ".join(rng.choice(words) for _ in range(10)) + ".")
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def command(out: Path, data: Path, extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "sgpo", "run", str(REPO / "configs" / "smoke.yaml"), "-o", str(out),
           "--set", f"data.sft={data}"]
    for s in SETS:
        cmd += ["--set", s]
    return cmd + list(extra)


def run_to_end(out: Path, data: Path, extra=()) -> subprocess.CompletedProcess:
    p = subprocess.run(command(out, data, extra), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def run_and_kill(out: Path, data: Path, when, what: str, log: Path) -> None:
    """Start the run, SIGKILL it as soon as ``when()`` holds; fail if it ended before that."""
    with open(log, "a") as f:
        proc = subprocess.Popen(command(out, data), cwd=REPO, env=cli_env(), stdout=f, stderr=f)
        try:
            while proc.poll() is None:
                if when():
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc == -signal.SIGKILL, f"the run ended (rc={rc}) before it could be killed {what}:\n{log.read_text()[-3000:]}"


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def stage_status(out: Path, stage: str) -> str | None:
    try:
        return json.loads((out / "manifest.json").read_text())["stages"].get(stage, {}).get("status")
    except (OSError, ValueError):
        return None


def checkpoints(out: Path, stage: str) -> list[Path]:
    return list((out / stage).glob("checkpoints/*/step_*"))


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def sgpo(*args, cwd=None, env=None):
    """``python -m sgpo ARGS`` offline from the source tree, its output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "sgpo", *args], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=600)
