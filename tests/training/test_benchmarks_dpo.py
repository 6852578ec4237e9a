"""The DPO and round benchmarks run end to end in their quick modes and end with their JSON summary.

Correctness of the scripts only: no timing is checked (timings belong to the benchmark runs, not to tests).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the CLI / a script in a subprocess

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> tuple[dict, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1]), proc.stdout


def test_dpo_benchmark_quick():
    result, out = _run("dpo.py", "--quick")
    for key in ("pairs_per_s", "ratio_vs_trl", "ratio_vs_trl_precompute", "peak_rss_gb"):
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, key
    for mode in ("sgpo", "trl", "trl_precompute"):
        assert mode in out
    assert "ratio sgpo / trl" in out and "layout: packed" in out


def test_round_benchmark_quick():
    result, out = _run("round.py", "--quick")
    assert result["pairs"] > 0
    for key in ("generation_s", "reference_s", "dpo_s", "peak_rss_gb"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert "generation" in out and "reference" in out and "dpo" in out
