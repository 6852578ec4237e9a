"""The prefill memory benchmark runs in its quick mode: both ways give the same tokens (no timing or memory checks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a script in a subprocess

REPO = Path(__file__).resolve().parents[2]


def test_quick_prefill_benchmark_gives_the_same_tokens_both_ways():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prefill_memory.py"), "--quick",
                           "--prefill-tokens", "512", "--repeats", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["prompts"] == 8 and result["same_tokens"] is True
    assert result["grouped_peak_gb"] >= 0 and result["whole_peak_gb"] >= 0
