"""``sgpo improver-eval`` end to end on the tiny model, and the figures it reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgpo.eval.improver import improver_figures

REPO = Path(__file__).resolve().parents[2]


def sgpo(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "sgpo", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


class LengthJudge:
    """Prefers the longer candidate; equal lengths tie (a stand-in with known answers)."""
    name = "length"

    def prefer(self, prompts, a, b, references=None):
        return [0.5 if len(x) == len(y) else float(len(x) > len(y)) for x, y in zip(a, b)]


def test_figures_count_changes_wins_lengths_and_the_length_controlled_subset():
    drafts = ["one two three four five", "same text", "a b c d e f g h i j"]
    rewrites = ["one two three four five six", "same   text", "a b"]  # +20%, unchanged (whitespace), -80%
    f = improver_figures(LengthJudge(), ["p"] * 3, drafts, rewrites, ["r"] * 3)
    assert f["improver/changed_rate"] == pytest.approx(2 / 3)
    assert f["improver/edit_distance"] == pytest.approx((1 + 0 + 8) / 3)
    assert f["improver/length_change"] == pytest.approx((0.2 + 0 - 0.8) / 3)
    assert f["improver/win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert f["improver/win_rate_n"] == 3
    assert f["improver/win_rate_len20_n"] == 2  # the -80% rewrite is outside ±20%
    assert f["improver/win_rate_len20"] == pytest.approx(0.75)
    assert f["improver/win_rate_ci_low"] <= f["improver/win_rate"] <= f["improver/win_rate_ci_high"]
    judge_free = improver_figures(None, ["p"] * 3, drafts, rewrites, ["r"] * 3)
    assert "improver/win_rate" not in judge_free and judge_free["improver/changed_rate"] == pytest.approx(2 / 3)


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": f"Name a colour number {i}.", "response": f"Colour {i} is blue. It is calm."} for i in range(5)]
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.slow
def test_improver_eval_cli_on_the_tiny_model(tmp_path, prompts_file):
    out = tmp_path / "ie"
    args = ("improver-eval", "--model", "sgpo:tiny-random", "--prompts", str(prompts_file), "--judge", "reference",
            "--limit", "3", "--baseline", "sgpo:tiny-random", "--output", str(out),
            "--set", "generation.max_new_tokens=6", "--set", "generation.temperature=1.0")
    res = sgpo(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    figs = json.loads((out / "figures.json").read_text())
    assert figs["n"] == 3 and figs["judge"] == "reference"
    for side in ("model", "baseline"):
        f = figs[side]
        for key in ("changed_rate", "edit_distance", "length_change", "win_rate", "win_rate_ci_low",
                    "win_rate_ci_high", "win_rate_n", "win_rate_len20_n"):
            assert f"improver/{key}" in f, key
        assert 0 <= f["improver/changed_rate"] <= 1
        assert f["improver/win_rate_n"] == 3
    # the same model with the same seeds: the baseline column reproduces the model column
    assert figs["model"]["improver/win_rate"] == figs["baseline"]["improver/win_rate"]
    assert "win rate of rewrite over draft" in res.stdout and "n=3" in res.stdout
    samples = next(out.glob("model-*/samples-r1.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 3 and all({"draft", "rewrite", "reference"} <= set(r) for r in rows)
    # a second call reuses the cached generations: same samples, nothing regenerated
    before = samples.read_text()
    shard = next(out.glob("model-*/eval_improver.jsonl"))
    mtime = shard.stat().st_mtime_ns
    res2 = sgpo(*args)
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert samples.read_text() == before and shard.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_improver_eval_rejects_prompts_without_references(tmp_path):
    p = tmp_path / "noref.jsonl"
    p.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    res = sgpo("improver-eval", "--model", "sgpo:tiny-random", "--prompts", str(p), "--judge", "none",
               "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "reference" in res.stderr and "Traceback" not in res.stderr
