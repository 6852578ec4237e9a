"""``--dry-run`` walks the run's own recipe with counting parts: offline for every shipped config, no model or
tokenizer loaded, no hub dataset read; and ``data.sft_size: 0`` means the whole pool, everywhere."""
import json
import logging
from pathlib import Path

import pytest

from sgpo import config
from sgpo.cli import main
from sgpo.dry_run import dry_run, format_dry_run

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [None, REPO / "configs" / "smoke.yaml", *sorted((REPO / "configs" / "paper").glob("*.yaml"))]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model, a tokenizer or a hub dataset fails the test."""
    import datasets

    from sgpo import models

    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run loaded something: {args}")

    for name in ("load_model", "load_tokenizer", "resolve"):
        monkeypatch.setattr(models, name, refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: "default" if p is None else p.stem)
def test_every_shipped_config_dry_runs_offline(path, nothing_loads, capsys):
    cfg = config.load(path)
    d = dry_run(cfg)
    names = [r["stage"] for r in d["stages"]]
    assert names[0] == "round_0" and "final" in names
    rounds = [n for n in names if n.startswith("round_") and n != "round_0"]
    assert len(rounds) == (0 if cfg.method == "sft" else cfg.rounds)
    if cfg.sft or cfg.method == "sft":
        sft = d["stages"][names.index("sft")]
        assert sft["nll_examples"] > 0 and sft["nll_steps"] > 0
    for r in d["stages"]:
        if r["stage"] in rounds:
            assert r["pairs"] > 0 and r["dpo_steps"] > 0 and r["checkpoints"] >= 1
    text = format_dry_run(d, cfg)
    assert text.startswith("dry run: method " + cfg.method) and "\ntotal" in text
    if path is None:  # the command itself
        assert main(["run", "--dry-run"]) == 0
        assert text in capsys.readouterr().out


def write_pool(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n"
                            for i in range(n)))
    return path


def tiny(data: Path, *extra: str) -> config.Config:
    return config.load(None, [f"data.sft={data}", "data.dev_size=2", "data.test_size=2", "data.improver_size=3",
                              "data.round_size=4", "rounds=2", "data.sft_size=0", "model.name=sgpo:tiny-random",
                              "eval.head_to_head_size=0", "eval.improver_size=0", *extra])


def test_sft_size_zero_is_the_whole_pool_for_every_method_and_not_a_reuse(tmp_path, caplog):
    data = write_pool(tmp_path / "pool.jsonl", 30)  # 26 training prompts: 3 + 2 × 4 for the slices
    with caplog.at_level(logging.INFO, logger="sgpo"):
        for method in ("sgpo", "spin", "sft"):
            d = {r["stage"]: r for r in dry_run(tiny(data, f"method={method}"))["stages"]}
            assert d["sft"]["nll_examples"] == 26, method
    assert "used more than once" not in caplog.text


def test_sft_alone_with_sft_size_zero_trains_on_each_prompt_once(tmp_path):
    data = write_pool(tmp_path / "pool.jsonl", 30)
    d = {r["stage"]: r for r in dry_run(tiny(data, "method=sft"))["stages"]}
    assert d["sft"]["nll_examples"] == d["sft"]["prompts"] == 26
    assert d["sft"]["nll_steps"] == -(-26 // config.Config().train.batch_size)


def test_a_pool_too_small_is_still_reported_as_reused(tmp_path, caplog):
    data = write_pool(tmp_path / "pool.jsonl", 10)  # 6 training prompts for 3 + 2 × 4
    with caplog.at_level(logging.WARNING, logger="sgpo"):
        dry_run(tiny(data))
    assert "5 prompts are used more than once" in caplog.text


def test_a_hub_pool_is_not_downloaded_and_says_so(nothing_loads, capsys):
    cfg = config.load(None, ["data.sft=someone/some-dataset", "data.sft_size=0", "model.name=someone/model"])
    d = dry_run(cfg)
    assert d["uncounted"] == ["someone/some-dataset"] and d["whole_pool_sft"]
    assert main(["run", "--set", "data.sft=someone/some-dataset", "--set", "data.sft_size=0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "whole pool" in out and "not counted" in out


def test_the_dry_run_gives_checkpoint_sizes_and_the_bytes_written(nothing_loads):
    from sgpo.models import tiny_random_path
    from sgpo.sizes import checkpoint_bytes, parameter_count

    cfg = config.load(REPO / "configs" / "paper" / "sgpo-llama-3-8b.yaml")
    d = dry_run(cfg)
    text = format_dry_run(d, cfg)
    # 8e9 bf16 weights: 16 GB; a training checkpoint adds fp32 masters and two fp32 moments: 14 bytes a parameter
    assert "8.00B parameters, read from the name; bfloat16 weights here" in text
    assert "a model folder 16.0 GB; a training checkpoint 112.0 GB" in text
    n_train = sum(r["train_checkpoints"] for r in d["stages"])
    n_models = sum(r["checkpoints"] for r in d["stages"]) - n_train
    # checkpoint_every 0: one training checkpoint per training call (SFT, improver, a DPO per round) whatever the
    # pool's size; a model folder after each of them and the final one
    assert (n_train, n_models) == (cfg.rounds + 2, cfg.rounds + 3)
    assert f"= {(n_models * 16 + n_train * 112):,.1f} GB" in text
    assert "checkpoint_minutes adds at most one" in text
    # a model on disk is counted on its config (no weights read), LoRA checkpoints hold no optimizer state to speak of
    params, how = parameter_count(str(tiny_random_path()))
    assert how == "counted from its config" and 1e6 < params < 1e7
    assert checkpoint_bytes(1000, "float32", lora=False) == (4000, 12000)
    assert checkpoint_bytes(1000, "bfloat16", lora=True) == (2000, 2000)


def test_the_second_judge_judges_at_most_agreement_size_pairs_a_round(nothing_loads):
    cfg = config.load(REPO / "configs" / "paper" / "sgpo-llama-3-8b.yaml")
    rounds = [r for r in dry_run(cfg)["stages"] if r["stage"].startswith("round_") and r["stage"] != "round_0"]
    assert all(r["pairs"] == 10_000 for r in rounds)  # an upper bound: 10,000 pairs a round …
    assert all(r["judges"]["lm:sgpo:gemma-3-270m"] == cfg.eval.agreement_size == 500 for r in rounds)  # … 500 judged
    small = dry_run(config.load(REPO / "configs" / "paper" / "sgpo-llama-3-8b.yaml", ["eval.agreement_size=20"]))
    assert small["stages"][3]["judges"]["lm:sgpo:gemma-3-270m"] == 20
