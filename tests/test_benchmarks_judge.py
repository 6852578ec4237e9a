"""The LM-judge speed benchmark runs in its quick mode: both ways give the same scores (no timing checks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a script in a subprocess

REPO = Path(__file__).resolve().parents[1]


def test_quick_judge_benchmark_agrees_with_itself():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "judge_speed.py"), "--quick"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["items"] == 8 and result["single_s"] > 0 and result["batched_s"] > 0
    assert result["max_abs_diff"] < 1e-2
