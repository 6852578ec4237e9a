"""The generation benchmark runs end to end in its quick mode and ends with its JSON summary (no timing checks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the CLI / a script in a subprocess

REPO = Path(__file__).resolve().parents[2]
KEYS = {"tokens_per_s", "ratio_vs_sequential", "ratio_vs_padded", "matmul_ceiling_tokens_per_s",
        "decode_ceiling_tokens_per_s"}


def test_quick_benchmark_prints_json_last():
    """With the vllm column: vLLM really runs (a missing vLLM fails the benchmark, and so this test)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "generation.py"), "--quick", "--vllm"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    assert KEYS <= set(result)
    for key in KEYS:
        assert isinstance(result[key], (int, float)) and result[key] > 0
    assert result["greedy_identical"] is True
    assert result["vllm_tokens_per_s"] > 0 and result["vllm_start_s"] > 0 and result["ratio_vllm_vs_engine"] > 0
    assert "engine" in proc.stdout and "ceiling" in proc.stdout
    # the batch sweep: the engine's best batch among those timed, and its ratio to vLLM there and at the default's
    assert str(result["best_batch"]) in result["sweep_tokens_per_s"]
    assert result["best_tokens_per_s"] == max(result["sweep_tokens_per_s"].values())
    assert result["engine_vs_vllm_best_batch"] >= result["engine_vs_vllm_default_batch"] > 0
    assert 0 < result["best_matmul_ceiling_fraction"]
