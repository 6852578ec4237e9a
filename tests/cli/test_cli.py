"""The real CLI, end to end on the tiny model, and its one-line errors."""
import json
import os
from pathlib import Path

import pytest
from cli_runs import sgpo

pytestmark = pytest.mark.slow  # runs the CLI / a script in a subprocess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    res = sgpo("run", "configs/smoke.yaml", "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_smoke_run_writes_the_run_directory(smoke_run):
    out, res = smoke_run
    manifest = json.loads((out / "manifest.json").read_text())
    for stage in ("round_0", "sft", "improver", "round_1", "round_2", "final", "test", "test_second_judge"):
        assert manifest["stages"][stage]["status"] == "done", stage
    summary = json.loads((out / "summary.json").read_text())
    for judge in ("reference", "lm_tiny-random"):
        for other in ("start", "pre_rounds"):
            key = f"eval/test/{judge}/win_rate_vs_{other}"
            assert summary[key + "_n"] == 8 and summary[key + "_ci_low"] <= summary[key] <= summary[key + "_ci_high"]
            assert key + "_length_matched_n" in summary
    assert {"eval/test/length_start", "eval/test/finished_final"} <= set(summary)
    for t in (1, 2):
        rows = [json.loads(line) for line in (out / f"round_{t}" / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) >= 1, f"round {t} kept no pair"
        assert all({"prompt", "chosen", "rejected", "ref_chosen_logp", "ref_rejected_logp"} <= set(r) for r in rows)
        assert all(r["chosen"].strip() != r["rejected"].strip() for r in rows)
        m = json.loads((out / f"round_{t}" / "metrics.json").read_text())
        for key in ("pairs/kept", "lengths/chosen", "lengths/rejected", "pairs/edit_distance", "dpo/loss",
                    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "improver/changed_rate", f"time/round_{t}_s", "eval/dev/win_rate_vs_start"):
            assert key in m, key
        assert "improver/win_rate" not in m  # a round measures its improver on its own candidates
        assert m["pairs/kept"] == len(rows)
        for key in ("pairs/judge_agreement", "pairs/judge_agreement_n", "improver/template_leak_rate",
                    "improver/echo_rate", "pairs/chosen_finished_rate", "pairs/dropped/template_leak"):
            assert key in m, key
        candidates = [json.loads(line) for line in (out / f"round_{t}" / "candidates.jsonl").read_text().splitlines()]
        assert sum(c["meta"]["dropped"] is None for c in candidates) == len(rows) == m["pairs/judge_agreement_n"]
    improver = json.loads((out / "improver" / "metrics.json").read_text())
    assert {"improver/win_rate", "improver/win_rate_ci_low", "improver/win_rate_n"} <= set(improver)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 2
    assert (out / "report.md").exists() and (out / "metrics.png").exists()
    assert "final vs start" in res.stderr
    assert (out / "config.yaml").read_text().count("name: sgpo:tiny-random") == 1


def test_final_model_has_a_model_card(smoke_run):
    import yaml

    out, _ = smoke_run
    text = (out / "final" / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["library_name"] == "transformers" and "sgpo" in header["tags"]
    assert header["datasets"] == ["tatsu-lab/alpaca_eval"]  # the embedded AlpacaEval, by its hub id
    assert "base_model" not in header  # a random local model has no hub id to name
    for t in (1, 2):  # the pairs of every round, as the round's metrics say
        m = json.loads((out / f"round_{t}" / "metrics.json").read_text())
        assert f"| {t} | {m['pairs/candidates']} | {m['pairs/kept']} |" in text
    summary = json.loads((out / "summary.json").read_text())
    key = "eval/test/reference/win_rate_vs_start"
    assert (f"{100 * summary[key]:.1f}% [{100 * summary[key + '_ci_low']:.1f}–{100 * summary[key + '_ci_high']:.1f}], "
            f"n={summary[key + '_n']}") in text
    assert "| `dpo.beta` |" in text and "SGPO" in text


def test_push_fails_in_one_line_when_offline_or_not_logged_in(smoke_run, tmp_path):
    out, _ = smoke_run
    res = sgpo("push", str(out), "--repo-id", "someone/model")  # the tests run with HF_HUB_OFFLINE=1
    assert res.returncode != 0 and "the hub is offline (HF_HUB_OFFLINE=1)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
    res = sgpo("push", str(out), "--repo-id", "someone/model", env=env)
    assert res.returncode != 0 and "not logged in to the Hugging Face Hub" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = sgpo("push", str(tmp_path), "--repo-id", "someone/model")
    assert res.returncode != 0 and "no final model here" in res.stderr


def test_rerun_of_a_finished_run_skips_everything(smoke_run):
    out, _ = smoke_run
    before = (out / "round_1" / "pairs.jsonl").read_bytes()
    res = sgpo("run", "configs/smoke.yaml", "--output", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("done earlier, skipped") >= 4
    assert (out / "round_1" / "pairs.jsonl").read_bytes() == before


def test_changed_config_on_resume_names_the_keys(smoke_run):
    out, _ = smoke_run
    res = sgpo("run", "configs/smoke.yaml", "--output", str(out), "--set", "dpo.beta=0.3")
    assert res.returncode != 0 and "dpo.beta" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args, needle", [
    (["run", "--set", "roundz=1"], "unknown config key 'roundz'"),
    (["run", "configs/smoke.yaml", "--set", "model.name=/no/such/model", "-o", "{tmp}/r"], "/no/such/model"),
    (["run", "configs/smoke.yaml", "--set", "data.sft={tmp}/missing.jsonl", "-o", "{tmp}/r"], "missing.jsonl"),
])
def test_errors_are_one_line(tmp_path, args, needle):
    res = sgpo(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.returncode == 2
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("sgpo: error:")


def test_unwritable_output_directory(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/sgpo-cannot-write-here"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "run")
    res = sgpo("run", "configs/smoke.yaml", "-o", target)
    assert res.returncode == 2 and "not writable" in res.stderr and "Traceback" not in res.stderr


def test_lora_run_saves_merged_full_checkpoints(tmp_path, smoke_run):
    out = tmp_path / "lora"
    res = sgpo("run", "configs/smoke.yaml", "-o", str(out), "--set", "model.lora_r=4", "--set", "rounds=1",
               "--set", "eval.improver_size=0", "--set", "eval.head_to_head_size=0", "--set", "data.improver_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    # the start model and the test prompts are those of the smoke run: its test answers are reused, not regenerated
    assert "the start model's answers come from the cache" in res.stderr
    import torch
    from safetensors.torch import load_file

    final = load_file(out / "final" / "model.safetensors")
    start = load_file(out / "improver" / "model" / "model.safetensors")
    assert not any("lora" in k for k in final)  # merged: an ordinary checkpoint
    assert set(final) == set(start) and any(not torch.equal(final[k], start[k]) for k in final)


def test_dry_run_counts_what_the_smoke_run_did(smoke_run):
    from dry_run_check import assert_dry_run_matches

    d = assert_dry_run_matches(smoke_run[0])
    judges = {k for row in d["stages"] for k in row["judges"]}
    assert judges == {"reference", "lm:sgpo:tiny-random"}


def test_debug_is_kept_before_or_after_the_subcommand():
    from sgpo.cli.main import build_parser

    parse = build_parser().parse_args
    assert parse(["--debug", "run"]).debug and parse(["run", "--debug"]).debug
    assert not parse(["run"]).debug and parse(["--debug", "compare"]).debug and parse(["--debug", "report", "x"]).debug


def test_eval_takes_its_generation_settings_from_a_config_and_flags_win(tmp_path):
    from sgpo.cli.evaluate import _eval_spec
    from sgpo.cli.main import build_parser

    parse = build_parser().parse_args
    plain = _eval_spec(parse(["eval", "--model", "m", "--benchmark", "ifeval"]), str(tmp_path))
    assert (plain.generation.max_new_tokens, plain.generation.temperature, plain.generation.batch_size,
            plain.seed) == (256, 0.0, 16, 0)
    (tmp_path / "c.yaml").write_text("seed: 7\ngeneration:\n  max_new_tokens: 99\n  temperature: 0.5\n")
    spec = _eval_spec(parse(["eval", "--model", "m", "--benchmark", "ifeval", "--config", str(tmp_path / "c.yaml"),
                             "--set", "generation.batch_size=3", "--max-new-tokens", "12"]), str(tmp_path))
    assert (spec.generation.max_new_tokens, spec.generation.temperature, spec.generation.batch_size,
            spec.seed) == (12, 0.5, 3, 7)
