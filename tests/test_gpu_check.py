"""The prepared GPU check runs end to end on a CPU with a tiny model (``--device cpu --shape tiny``), so that it does
not rot between the sessions that have a GPU to run it on. What it measures there is checked for sense only; what it
checks (the backend each step uses, the exports' dtype, the memory estimate beside the peak) is checked here too."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from cli_runs import REPO, cli_env

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

pytestmark = pytest.mark.xdist_group("processes")  # its steps launch processes and a vLLM engine


@pytest.mark.slow  # three short runs of the CLI and the memory step
def test_the_gpu_check_runs_every_step_on_a_cpu(tmp_path):
    carry, out = tmp_path / "carry", tmp_path / "out"
    for cmd in ([str(REPO / "benchmarks" / "gpu_prepare.py"), "--out", str(carry), "--no-wheels", "--prompts", "64"],
                [str(REPO / "benchmarks" / "gpu_check.py"), "--carry", str(carry), "--out", str(out),
                 "--device", "cpu", "--shape", "tiny"]):
        p = subprocess.run([sys.executable, *cmd], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])  # one JSON line
    for run, backend, starts in (("run", "engine", 0), ("fsdp_vllm_worker", "vllm", 1), ("lora", "engine", 0)):
        r = result[run]
        assert r["rc"] == 0 and r["ok"], (run, r)
        # each step generated with what it says: the stand-in for vLLM is on the FSDP step's path only
        assert (r["generation_backend"], r["vllm_engine_starts"]) == (backend, starts), (run, r)
        assert all(r[f"changed/{s}"] > 0 for s in ("sft", "improver", "round_1")), (run, r)  # every training moved
        assert all(r[f"dtype/{s}"] == ["float32"] for s in ("sft", "improver", "round_1")), (run, r)  # fp32 on a CPU
        assert r["pairs/kept"] > 0 and r["dpo/steps"] > 0 and r["tokenizer_with_model"], (run, r)
    # the one engine got FSDP's default share of the GPU (the launcher's environment decides it) and the run's dtype
    assert result["fsdp_vllm_worker"]["engines"] == [{"dtype": "float32", "gpu_memory_utilization": 0.5,
                                                      "max_model_len": 128 + 16, "cuda_visible_devices": None}]
    assert result["lora"]["changed/sft"] < result["run"]["changed/sft"]  # an adapter moves fewer weights, merged
    assert result["reference_pass"]["budget_s"] > 0 and result["reference_pass"]["uncut_s"] > 0
    assert result["generation"]["ratio"] > 0
    memory = result["memory"]
    assert memory["ok"] and memory["positions"] == 512, memory  # the tiny shape on a CPU: seconds, not 8B
    for part in ("reference_pass", "lora_step", "full_step"):
        assert 0.9 <= memory[part]["ratio"] <= 1.5 and memory[part]["peak_gb"] > 0, (part, memory)
    # what comes back from a GPU machine is small: the results and the runs' logs, not the models
    assert {f.name for f in out.iterdir()} == {"results.json", "run.log", "fsdp.log", "lora.log"}


def test_only_the_vllm_step_has_the_stand_in_and_every_step_names_its_backend(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setenv("SGPO_VLLM_PYTHON", "/somewhere/python")  # a machine's own setting does not leak in either
    monkeypatch.setattr(gpu_check.subprocess, "run",
                        lambda cmd, env, **kw: seen.append((cmd, env)) or SimpleNamespace(returncode=1, stdout="",
                                                                                          stderr="stopped here"))
    for backend in ("engine", "vllm"):
        res = gpu_check.sgpo_run(tmp_path / "m", tmp_path, tmp_path / backend, {"backend": backend, "dtype": "bf16"})
        assert res["rc"] == 1 and not res["ok"]
    (engine_cmd, engine_env), (vllm_cmd, vllm_env) = seen
    assert "generation.backend=engine" in engine_cmd and "generation.backend=vllm" in vllm_cmd
    assert "vllm_standin" not in engine_env["PYTHONPATH"] and "SGPO_VLLM_PYTHON" not in engine_env
    assert "vllm_standin" in vllm_env["PYTHONPATH"] and vllm_env["SGPO_VLLM_PYTHON"] == sys.executable


def test_an_export_in_another_dtype_is_reported_not_rounded_away(tmp_path):
    """A start model in bf16 and an fp32 export whose weights moved by less than bf16's spacing (FSDP2 under mixed
    precision exported fp32): compared after a cast to bf16, as the check did, nothing moved and the dtype went
    unseen; now the dtype is reported and the change counted."""
    from safetensors.torch import save_file

    start, export = tmp_path / "start", tmp_path / "export"
    w = torch.full((64,), 0.02, dtype=torch.bfloat16)
    for folder, tensor in ((start, w), (export, w.float() + 1e-7)):
        folder.mkdir()
        save_file({"w": tensor}, str(folder / "model.safetensors"))
    assert gpu_check.export_dtypes(start) == ["bfloat16"] and gpu_check.export_dtypes(export) == ["float32"]
    assert ((w.float() + 1e-7).to(torch.bfloat16) == w).all()  # the bf16 cast hid the move
    assert gpu_check.changed(start, export) == 1.0
