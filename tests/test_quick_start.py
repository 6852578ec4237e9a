"""The README's quick start, as written, through the real CLI: its YAML is read out of the README; only the model
(the tiny random one instead of a hub model), the API judge (a local OpenAI-compatible stub server instead of the
OpenAI API), the data file (written here in the columns the YAML maps) and the sizes (so that it runs in seconds) are
replaced. The front door cannot rot without this test failing."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from eval.test_judge_openai import ChatServer, chat_reply
from cli_runs import REPO, cli_env

pytestmark = pytest.mark.slow  # runs the CLI

SMALL = ["data.dev_size=4", "data.test_size=4", "data.sft_size=4", "data.improver_size=4", "data.round_size=6",
         "eval.improver_size=2", "eval.head_to_head_size=2", "eval.second_judge=", "generation.max_new_tokens=8",
         "generation.batch_size=8", "train.batch_size=4", "dpo.batch_size=4", "rounds=1"]


def quick_start_yaml() -> dict:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return yaml.safe_load(block)


def test_the_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    cfg = quick_start_yaml()
    fields = cfg["data"]["fields"]
    assert cfg["eval"]["judge"].startswith("openai:") and set(fields) == {"prompt", "response"}
    data = tmp_path / "my_sft.jsonl"  # in the user's own column names, as the YAML maps them
    data.write_text("".join(json.dumps({fields["prompt"]: f"Question {i}: what is {i} plus {i}?",
                                        fields["response"]: f"It is {2 * i}."}) + "\n" for i in range(40)))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with ChatServer(lambda body, n: (200, chat_reply("A", {"A": -0.1, "B": -2.5}), {}), max_requests=2000) as api:
        cfg["model"]["name"] = "sgpo:tiny-random"
        cfg["data"]["sft"] = str(data)
        cfg["eval"]["judge"] = f"{cfg['eval']['judge']}@{api.base_url}"
        (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "sgpo", "run", str(tmp_path / "my.yaml"), "-o", str(tmp_path / "run")]
        cmd += [x for s in SMALL for x in ("--set", s)]
        env = {**cli_env(), "OPENAI_API_KEY": "sk-test", "NO_PROXY": "127.0.0.1,localhost"}
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert api.requests and api.requests[0]["headers"].get("Authorization") == "Bearer sk-test"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval/test/openai_v1/win_rate_vs_start_n"] == 4  # the test figures are the API judge's
    # where the time went: every stage's phases and the rest add up to its wall time; the totals are in the summary
    round_1 = json.loads((tmp_path / "run" / "round_1" / "metrics.json").read_text())
    phases = {k: v for k, v in round_1.items() if k.startswith("time/round_1/")}
    assert {"time/round_1/generation_s", "time/round_1/training_s", "time/round_1/reference_pass_s"} <= set(phases)
    assert abs(sum(phases.values()) - round_1["time/round_1_s"]) < 0.1
    assert summary["time/total/generation_s"] > 0 and summary["time/total/judging_s"] >= 0
    assert "time by phase, all stages: " in p.stderr
    assert (tmp_path / "run" / "final" / "config.json").exists()
