"""What a run says about its input: prompts cut, prompts reused, no development set, bad settings."""
import json
import logging

import pytest

from sgpo import config
from sgpo.config import ConfigError, GenerationConfig
from sgpo.data import Record
from sgpo.rollout import Sampler
from sgpo.splits import Splits, deal, prepare_splits


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
    assert any("has 5 prompts but the improver slice (2), 2 rounds of 3 and the SFT slice (2) ask for 10: 5 prompts "
               "are used more than once" in m for m in msg), msg
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
