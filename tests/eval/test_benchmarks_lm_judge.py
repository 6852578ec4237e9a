"""The LM-judge benchmark runs in its quick mode: one response per forward and the scorer's batches give the same
preferences and scores within float rounding (no timing checks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a script in a subprocess

REPO = Path(__file__).resolve().parents[2]


def test_quick_lm_judge_benchmark_gives_the_same_preferences_both_ways():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lm_judge.py"), "--quick", "--repeats", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["comparisons"] == 8 and result["positions"] == 2048
    assert result["preferences_differ"] == 0 and result["max_score_difference"] < 1e-4
    assert result["one_s"] > 0 and result["batched_s"] > 0
