"""The shipped accelerate configs (``configs/accelerate/``), read by accelerate's own launcher."""
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize("name", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_on_several_machines_starts_the_same_command_on_each(name, monkeypatch, tmp_path):
    """With several machines the ZeRO configs start torchrun on every machine (the same command run on each, with its
    ``--machine_rank``), not DeepSpeed's pdsh launcher, which logs into the other machines over ssh from the first."""
    pytest.importorskip("deepspeed")
    from accelerate.commands import launch

    started = []
    monkeypatch.setattr(launch, "_run_torchrun", lambda args: started.append(("torchrun", args)))
    monkeypatch.setattr(launch, "_run_subprocess", lambda cmd, *a, **k: started.append(("command", cmd)))
    monkeypatch.chdir(tmp_path)  # DeepSpeed's own launcher would leave its environment file here
    args = launch.launch_command_parser().parse_args([
        "--config_file", str(CONFIGS / name), "--num_machines", "2", "--machine_rank", "1", "--num_processes", "16",
        "--main_process_ip", "10.0.0.1", "--main_process_port", "29500", "-m", "sgpo", "run"])
    launch.launch_command(args)
    [(how, what)] = started
    assert how == "torchrun", what  # not ``deepspeed --hostfile ... --launcher pdsh``
    assert (what.nnodes, what.node_rank, what.nproc_per_node) == ("2", 1, "8")
