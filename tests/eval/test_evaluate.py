"""sgpo eval / sgpo metrics through the real CLI on the tiny model."""
import json

import pytest

from cli_runs import sgpo

pytestmark = pytest.mark.slow  # runs the CLI / a script in a subprocess


@pytest.fixture
def prompt_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Name three things about topic {i}.", "response": f"Topic {i} has three facts."}
            for i in range(4)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_head_to_head_and_cache_reuse(tmp_path, prompt_file, tiny_path):
    out = tmp_path / "h2h"
    args = ["eval", "--model", tiny_path, "--versus", tiny_path, "--prompts", str(prompt_file), "--judge",
            "reference", "--max-new-tokens", "6", "-o", str(out)]
    res = sgpo(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((out / "head_to_head.json").read_text())
    assert r["n"] == 4 and r["win_rate"] == 0.5  # the same model, greedy: identical answers tie
    gens = list(out.glob("generations-*.jsonl"))
    assert len(gens) == 1 and len(gens[0].read_text().splitlines()) == 4
    before = gens[0].read_bytes()
    res = sgpo(*args)
    assert res.returncode == 0 and gens[0].read_bytes() == before  # nothing regenerated


def test_ifeval_with_limit(tmp_path, tiny_path):
    out = tmp_path / "ife"
    res = sgpo("eval", "--model", tiny_path, "--benchmark", "ifeval", "--limit", "3", "--max-new-tokens", "8",
               "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads((out / "leaderboard_row.json").read_text())
    assert row["n"] == 3 and 0 <= row["prompt_strict"] <= row["prompt_loose"] <= 1


def test_ifeval_versus_gives_the_paired_difference(tmp_path, tiny_path):
    out = tmp_path / "ifev"
    res = sgpo("eval", "--model", tiny_path, "--benchmark", "ifeval", "--versus", tiny_path, "--limit", "4",
               "--max-new-tokens", "8", "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((out / "ifeval_versus.json").read_text())
    assert r["n"] == 4 and r["a"] == r["b"]  # the same model, greedy: the same answers
    for key in ("prompt_strict_diff", "prompt_loose_diff", "instruction_strict_diff", "instruction_loose_diff"):
        assert r[key]["diff"] == r[key]["ci_low"] == r[key]["ci_high"] == 0 and r[key]["n"] == 4
    assert "paired bootstrap" in res.stderr


def test_reference_judge_cannot_judge_against_a_benchmark_baseline(tmp_path, tiny_path):
    res = sgpo("eval", "--model", tiny_path, "--benchmark", "alpaca_eval", "--limit", "2", "--max-new-tokens", "4",
               "-o", str(tmp_path / "a"))
    assert res.returncode == 2 and "cannot judge a model against" in res.stderr


def test_metrics_alpaca_eval_cli(shared_data):
    res = sgpo("metrics", "alpaca-eval", str(shared_data / "alpaca_eval" / "claude-2.1.annotations.json"),
               "--data-dir", str(shared_data / "alpaca_eval"))
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout)
    for k in ("win_rate", "standard_error", "discrete_win_rate", "length_controlled_winrate", "lc_standard_error",
              "n_total", "avg_length"):
        assert k in m
    assert m["n_total"] == 805
