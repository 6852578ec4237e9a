"""What a run says about its input: prompts cut, prompts reused, no development set, bad settings."""
import json
import logging

import pytest

from sgpo.config import schema as config
from sgpo.config.schema import ConfigError, GenerationConfig
from sgpo.data.records import Record
from sgpo.generation.rollout import Sampler
from sgpo.data.splits import Splits, deal, prepare_splits


def test_negative_temperature_and_other_out_of_range_values_name_the_key():
    with pytest.raises(ConfigError, match="generation.temperature: must be ≥ 0"):
        config.load(None, ["generation.temperature=-0.5"])
    with pytest.raises(ConfigError, match="generation.top_p"):
        config.load(None, ["generation.top_p=0"])
    with pytest.raises(ConfigError, match="dpo.beta"):
        config.load(None, ["dpo.beta=0"])
    with pytest.raises(ConfigError, match="dpo.loss: 'kto' is not one of sigmoid, ipo, hinge, norm"):
        config.load(None, ["dpo.loss=kto"])


def _data(tmp_path, n=6, long_every=3):
    rows = []
    for i in range(n):
        words = 120 if i % long_every == 0 else 4
        rows.append({"prompt": f"Question {i}: " + " ".join(["word"] * words) + "?", "response": f"Answer {i}."})
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_long_prompts_are_counted_with_how_much_was_cut(tmp_path, tiny_tokenizer, caplog):
    cfg = config.load(None, [f"data.sft={_data(tmp_path)}", "data.max_prompt_tokens=40", "data.dev_size=1",
                             "data.improver_size=1", "data.round_size=2", "rounds=1", "data.test_size=0"])
    with caplog.at_level(logging.INFO, logger="sgpo"):
        s = prepare_splits(cfg, tiny_tokenizer)
    msg = [r.getMessage() for r in caplog.records if "max_prompt_tokens" in r.getMessage()]
    assert msg and msg[0].startswith("data: 2 of 6 prompts are longer than data.max_prompt_tokens=40")
    assert "lose their start" in msg[0] and "at most" in msg[0]
    assert len(s.train) + len(s.dev) == 6  # truncate keeps them
    skip = config.load(None, [f"data.sft={_data(tmp_path)}", "data.max_prompt_tokens=40", "data.dev_size=1",
                              "data.on_long_prompt=skip", "data.test_size=0"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sgpo"):
        s = prepare_splits(skip, tiny_tokenizer)
    assert len(s.train) + len(s.dev) == 4
    assert any("skipped 2 of 6 prompts longer" in r.getMessage() for r in caplog.records)


def test_generation_inputs_cut_are_counted(tiny_tokenizer, caplog):
    recs = [Record("a", (("user", "word " * 200),)), Record("b", (("user", "hi"),))]
    with caplog.at_level(logging.INFO, logger="sgpo"):
        reqs = Sampler(tiny_tokenizer, GenerationConfig(), 0, 32).requests(recs, "policy", 1)
    assert [len(r.prompt_ids) <= 32 for r in reqs] == [True, True]
    assert any("policy: 1 of 2 inputs longer than data.max_prompt_tokens=32" in r.getMessage()
               for r in caplog.records)


def test_a_small_pool_is_reused_and_says_so(caplog):
    pool = [Record(str(i), (("user", f"q{i}"),), "r") for i in range(5)]
    cfg = config.load(None, ["data.improver_size=2", "data.round_size=3", "rounds=2", "data.sft_size=2"])
    with caplog.at_level(logging.WARNING, logger="sgpo"):
        s = deal(Splits(pool, []), cfg)
    assert [r.id for r in s.improver] == ["0", "1"]
    assert [[r.id for r in x] for x in s.rounds] == [["2", "3", "4"], ["0", "1", "2"]]
    msg = [r.getMessage() for r in caplog.records]
    assert [r.id for r in s.sft] == ["3", "4"]  # the SFT slice comes after the rounds
    assert any("has 5 prompts but its slices take 10 (asked → got: the improver slice (data.improver_size) 2 → 2, "
               "2 rounds (data.round_size) 3 → 3 each, the SFT slice (data.sft_size) 2 → 2; a slice is at most the "
               "whole pool): 5 prompts are used more than once" in m for m in msg), msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sgpo"):
        deal(Splits([Record(str(i), (("user", f"q{i}"),), "r") for i in range(10)], []), cfg)
    assert not caplog.records


def test_no_development_prompts_warns_that_no_figures_follow(tmp_path, tiny_tokenizer, caplog):
    cfg = config.load(None, [f"data.sft={_data(tmp_path)}", "data.dev_size=0"])
    with caplog.at_level(logging.WARNING, logger="sgpo"):
        s = prepare_splits(cfg, tiny_tokenizer)
    assert s.dev == []
    assert any("no development prompts" in r.getMessage() and "no head-to-head" in r.getMessage()
               for r in caplog.records)


def test_the_reuse_warning_says_what_each_slice_asked_for_and_got(caplog):
    pool = [Record(str(i), (("user", f"q{i}"),), "r") for i in range(5)]
    cfg = config.load(None, ["data.improver_size=48", "data.round_size=7", "rounds=2", "data.sft_size=128"])
    with caplog.at_level(logging.WARNING, logger="sgpo"):
        deal(Splits(pool, []), cfg)
    assert ("its slices take 20 (asked → got: the improver slice (data.improver_size) 48 → 5, 2 rounds "
            "(data.round_size) 7 → 5 each, the SFT slice (data.sft_size) 128 → 5; a slice is at most the whole pool): "
            "15 prompts are used more than once") in caplog.text, caplog.text


def test_held_out_splits_that_take_most_of_the_data_warn_naming_the_keys(tmp_path, caplog):
    rows = tmp_path / "ten.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(10)))
    with caplog.at_level(logging.WARNING, logger="sgpo"):
        s = prepare_splits(config.load(None, [f"data.sft={rows}"]), None)  # the defaults: test 200, dev 48
    assert (len(s.train), len(s.dev), len(s.test)) == (1, 0, 9)
    warned = [r.getMessage() for r in caplog.records if "take 9 of the 10 records" in r.getMessage()]
    assert warned and "data.test_size=200, got 9" in warned[0] and "data.dev_size=48, got 0" in warned[0], caplog.text
    assert "leaving 1 for training where the run's slices ask for 272 prompts" in warned[0]  # 48 + 2 × 48 + 128
    assert "--set data.test_size=1 --set data.dev_size=1" in warned[0]
    caplog.clear()
    small = ["data.improver_size=1", "data.round_size=1", "data.sft_size=1"]
    with caplog.at_level(logging.WARNING, logger="sgpo"):
        prepare_splits(config.load(None, [f"data.sft={rows}", "data.test_size=1", "data.dev_size=1"]), None)
        prepare_splits(config.load(None, [f"data.sft={rows}", "data.test_size=3", "data.dev_size=2"]), None)
        # most of it held out by choice, the rest enough for the slices (configs/verifiable.yaml): no warning either
        prepare_splits(config.load(None, [f"data.sft={rows}", "data.test_size=5", "data.dev_size=1", *small]), None)
    assert "records (test:" not in caplog.text


def test_the_readme_quick_start_names_the_held_out_sizes():
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    data = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])["data"]
    assert {"test_size", "dev_size"} <= set(data)
    assert config.load(None, [f"data.{k}={v}" for k, v in data.items() if k.endswith("_size")])  # valid keys
