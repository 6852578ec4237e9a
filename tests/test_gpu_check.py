"""The prepared GPU check runs end to end on a CPU with a tiny model (``--device cpu --shape tiny``), so that it does
not rot between the sessions that have a GPU to run it on. What it measures there is checked for sense only."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_resume import REPO, cli_env

pytestmark = pytest.mark.slow  # five short runs of the CLI


def test_the_gpu_check_runs_every_step_on_a_cpu(tmp_path):
    carry, out = tmp_path / "carry", tmp_path / "out"
    for cmd in ([str(REPO / "benchmarks" / "gpu_prepare.py"), "--out", str(carry), "--no-wheels", "--prompts", "64"],
                [str(REPO / "benchmarks" / "gpu_check.py"), "--carry", str(carry), "--out", str(out),
                 "--device", "cpu", "--shape", "tiny"]):
        p = subprocess.run([sys.executable, *cmd], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])  # one JSON line
    for run in ("run", "fsdp_vllm_worker", "lora"):
        r = result[run]
        assert r["rc"] == 0, (run, r)
        assert all(r[f"changed/{s}"] > 0 for s in ("sft", "improver", "round_1")), (run, r)  # every training moved
        assert r["pairs/kept"] > 0 and r["dpo/steps"] > 0 and r["tokenizer_with_model"], (run, r)
    assert result["lora"]["changed/sft"] < result["run"]["changed/sft"]  # an adapter moves fewer weights, merged
    assert result["reference_pass"]["budget_s"] > 0 and result["reference_pass"]["uncut_s"] > 0
    assert result["generation"]["ratio"] > 0
    # what comes back from a GPU machine is small: the results and the runs' logs, not the models
    assert {f.name for f in out.iterdir()} == {"results.json", "run.log", "fsdp.log", "lora.log"}
