"""``--dry-run`` walks the run's own recipe with counting parts: offline for every shipped config, no model or
tokenizer loaded, no hub dataset read; and ``data.sft_size: 0`` means the whole pool, everywhere."""
import json
import logging
from pathlib import Path

import pytest

from sgpo.config import schema as config
from sgpo.cli.main import main
from sgpo.run.dry_run import dry_run, format_dry_run

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [None, REPO / "configs" / "smoke.yaml", *sorted((REPO / "configs" / "paper").glob("*.yaml"))]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model, a tokenizer or a hub dataset fails the test."""
    import datasets

    from sgpo.models import loading as models

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
    from sgpo.models.loading import tiny_random_path
    from sgpo.models.sizes import checkpoint_bytes, parameter_count

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


def test_a_data_path_or_model_a_run_would_refuse_is_refused_naming_it(tmp_path, nothing_loads, capsys, monkeypatch):
    """The run's own rule (``data.source_kind``): a path that is not on disk and not shaped as a hub dataset id was
    meant as a file; a model that is not an embedded one, a folder or a hub id cannot load. Refused in one line."""
    from sgpo.data.records import DataError, load_records
    from sgpo.models.loading import ModelError

    monkeypatch.chdir(tmp_path)
    data = write_pool(tmp_path / "my_sft.jsonl", 30)
    looked = f"no such file (looked for as a local file, from {tmp_path}; not a hub dataset id"
    assert main(["run", "--set", "data.sft=data/my_sfts.jsonl", "--dry-run"]) == 2  # the typo
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sgpo: error: data.sft: data/my_sfts.jsonl: {looked}"), err
    with pytest.raises(DataError, match=r"^data/my_sfts.jsonl: no such file \(looked for as a local file"):
        load_records("data/my_sfts.jsonl")  # the real run says the same of it
    for key in ("data.prompts", "data.preference"):  # the preference data is read by method dpo only
        with pytest.raises(DataError, match=rf"^{key}: /no/such/dir/x: no such file \(looked for as a local file"):
            dry_run(tiny(data, f"{key}=/no/such/dir/x", "method=dpo"))
    assert dry_run(tiny(data, "data.preference=/no/such/dir/x", "method=spin"))["method"] == "spin"
    hub = tiny(data, "data.sft=data/my_sfts")  # shaped as a hub id: planned as one, and said so
    assert "Not downloaded: data/my_sfts (looked for as hub datasets: no local file or folder of that name" in \
        format_dry_run(dry_run(hub), hub)
    assert main(["run", "--set", "model.name=/nonexistent/model", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sgpo: error: model.name: /nonexistent/model: no such folder (looked for as a local folder, from "
                   f"{tmp_path}; not a hub model id, which is 'name' or 'owner/name')"], err
    with pytest.raises(ModelError, match=r"model.name: unknown embedded model 'sgpo:nope'"):
        dry_run(tiny(data, "model.name=sgpo:nope"))
    with pytest.raises(ModelError, match=r"^model.chat_template: \./templates/chat: no such folder"):
        dry_run(tiny(data, "model.chat_template=./templates/chat"))
    with pytest.raises(ModelError, match=r"^model.chat_template: templates/chat.jinja: no such file \(looked for as a "
                                         r"Jinja file"):
        dry_run(tiny(data, "model.chat_template=templates/chat.jinja"))
    (tmp_path / "local-model").mkdir()
    assert dry_run(tiny(data, f"model.name={tmp_path / 'local-model'}"))["model"].endswith("local-model")


def test_a_tracker_that_is_not_installed_is_refused_by_the_dry_run(nothing_loads, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["run", "--set", "report_to=tensorboard,wandb", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sgpo: error: report_to: wandb is not installed (pip install wandb)"]


def test_an_api_judge_gets_estimates_of_its_tokens_cost_and_wall_time(tmp_path, nothing_loads):
    from sgpo.run.dry_run import template_tokens

    data = tmp_path / "pool.jsonl"  # every prompt 12 characters: what the judge is sent is known
    data.write_text("".join(json.dumps({"prompt": f"Question {i:02d}?", "response": f"Answer {i}."}) + "\n"
                            for i in range(30)))
    spec = "openai:gpt-4o-mini@http://127.0.0.1:9/v1"
    cfg = tiny(data, f"eval.judge={spec}", "eval.judge_price_input=1000", "eval.judge_price_output=2000",
               "eval.judge_concurrency=2", "generation.max_new_tokens=50")
    d = dry_run(cfg)
    n = sum(r["judges"].get(spec, 0) for r in d["stages"])
    assert n > 0 and d["judge_prompt_chars"][spec] == 12 * n
    frame = template_tokens()
    assert 50 < frame < 2000  # the pairwise template is a few hundred tokens
    sent = n * 12 / 4 + n * (frame + 2 * 50)
    text = format_dry_run(d, cfg)
    assert f"API judge {spec}: estimates for the {n:,} calls counted" in text
    assert f"sent ≤ {sent / 1e3:,.1f}k tokens: prompts {n * 3} (~4 characters a token)" in text, text
    assert f"received ≤ {n} tokens (one label token a call)" in text
    assert f"cost ≤ ${(sent * 1000 + n * 2000) / 1e6:,.2f} at $1000 / $2000 per million tokens" in text
    assert f"wall time {n * 3 / 2:.0f} s – {n * 8 / 2:.0f} s at 2 requests in flight (eval.judge_concurrency)" in text
    unpriced = tiny(data, f"eval.judge={spec}")
    assert "cost: set eval.judge_price_input and eval.judge_price_output" in format_dry_run(dry_run(unpriced), unpriced)
    local = tiny(data)  # the offline judges cost nothing: no such lines
    assert "API judge" not in format_dry_run(dry_run(local), local)
