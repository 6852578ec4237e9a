"""SynPO's separate improver trains through the same path as every training call: killed mid-training, the
``prepare`` stage resumes from its checkpoint and ends with the weights of an uninterrupted run."""
import signal
import subprocess
import time

import pytest
import torch

from cli_runs import REPO, checkpoints, cli_env, command, load_weights, run_to_end, stage_status, write_data

pytestmark = pytest.mark.slow
SYNPO = ["--method", "synpo", "--set", "rounds=1"]


def test_synpo_separate_improver_resumes_after_a_kill(tmp_path):
    data = write_data(tmp_path / "train.jsonl")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(straight, data, SYNPO)
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(command(killed, data, SYNPO), cwd=REPO, env=cli_env(), stdout=log, stderr=log)
        while proc.poll() is None and not checkpoints(killed, "prepare"):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=600)
    assert rc == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
    assert stage_status(killed, "prepare") == "running"
    step = checkpoints(killed, "prepare")[0]
    assert step.parent.name == "separate_improver"
    run_to_end(killed, data, SYNPO)
    assert stage_status(killed, "prepare") == "done"
    a = load_weights(killed / "prepare" / "improver_model")
    b = load_weights(straight / "prepare" / "improver_model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert (killed / "round_1" / "pairs.jsonl").read_bytes() == (straight / "round_1" / "pairs.jsonl").read_bytes()
