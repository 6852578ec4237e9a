"""``sgpo compare``: one table for several methods, failures recorded without stopping the others, re-runs skip
what is finished; paper-scale configs validate and dry-run."""
import json
from pathlib import Path

import pytest
import torch

from sgpo import compare as compare_mod
from sgpo import config, recipe
from sgpo.cli import main
from sgpo.plan import plan

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
PAPER = sorted((REPO / "configs" / "paper").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fake_run(calls, fail):
    """A stand-in for recipe.run that writes what a finished run leaves behind (or fails for some methods)."""
    def run(cfg, out, **kw):
        calls.append(cfg.method)
        if cfg.method in fail:
            raise RuntimeError(f"{cfg.method} exploded")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.dump(cfg))
        (out / "manifest.json").write_text(json.dumps({"stages": {"round_0": {"status": "done", "seconds": 1.5},
                                                                  "round_1": {"status": "done", "seconds": 2.0}}}))
        score = {"spin": 0.6, "sgpo": 0.7, "dpo": 0.55}[cfg.method]
        (out / "summary.json").write_text(json.dumps({
            "eval/dev/win_rate_vs_start": score, "eval/dev/win_rate_vs_start_ci_low": score - 0.1,
            "eval/dev/win_rate_vs_start_ci_high": score + 0.1, "eval/dev/win_rate_vs_start_n": 6,
            "eval/dev/length": 12.0}))
        (out / "round_1").mkdir(exist_ok=True)
        (out / "round_1" / "metrics.json").write_text(json.dumps({"pairs/kept": 3, "dpo/steps": 2}))
        return {}
    return run


def test_failed_method_is_reported_and_the_rerun_only_redoes_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "run", fake_run(calls, fail={"dpo"}))
    out = tmp_path / "cmp"
    md = compare_mod.compare(str(SMOKE), ["spin", "dpo", "sgpo"], ["dev"], "reference", out)
    assert calls == ["spin", "dpo", "sgpo"]  # the failure did not stop sgpo
    rows = {line.split(" | ")[0].strip("| "): line for line in md.read_text().splitlines() if line.startswith("| ")}
    assert "failed: RuntimeError: dpo exploded" in rows["dpo"]
    assert "60.0 [50.0–70.0] (6)" in rows["spin"] and "70.0 [60.0–80.0] (6)" in rows["sgpo"]
    assert " 4 | 3 | 2 | done" in rows["spin"]  # wall time (1.5 + 2.0 s), pairs, DPO steps
    assert (out / "comparison.png").stat().st_size > 0
    state = json.loads((out / "compare.json").read_text())
    assert state["methods"]["dpo"]["status"] == "failed" and state["methods"]["spin"]["status"] == "done"

    calls.clear()
    monkeypatch.setattr(recipe, "run", fake_run(calls, fail=set()))
    md = compare_mod.compare(str(SMOKE), ["spin", "dpo", "sgpo"], ["dev"], "reference", out)
    assert calls == ["dpo"]  # finished methods are skipped
    text = md.read_text()
    assert "failed" not in text and "55.0 [45.0–65.0] (6)" in text

    # a changed config is not "finished": that method runs again
    calls.clear()
    compare_mod.compare(str(SMOKE), ["spin", "dpo"], ["dev"], "reference", out, overrides=["dpo.beta=0.2"])
    assert calls == ["spin", "dpo"]


def test_unknown_benchmark_or_method_fails_before_anything_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "run", fake_run(calls, fail=set()))
    with pytest.raises(ValueError, match="unknown benchmark"):
        compare_mod.compare(str(SMOKE), ["spin"], ["mmlu"], "reference", tmp_path / "a")
    with pytest.raises(Exception, match="method"):
        compare_mod.compare(str(SMOKE), ["spin", "ppo"], ["dev"], "reference", tmp_path / "b")
    assert calls == []


@pytest.mark.slow
def test_compare_end_to_end_resumes_after_a_failure(tmp_path, monkeypatch):
    """Real runs on the tiny model: dpo fails on a malformed preference file, spin finishes; after the file is
    fixed, a re-run resumes dpo only and evaluates it on the same prompts with the same judge."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Tell me about {t}.", "response": f"{t.title()} are common."})
                           + "\n" for t in ["cats", "dogs", "cars", "cups", "hats", "pens", "keys", "maps"]))
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello."}) + "\n")  # no 'rejected': an error
    sets = [f"data.sft={sft}", f"data.preference={pref}", "data.dev_size=2", "data.improver_size=1",
            "data.round_size=2", "rounds=1", "generation.max_new_tokens=4", "dpo.batch_size=2", "train.batch_size=2",
            "eval.head_to_head_size=2", "eval.improver_size=0", "data.test_size=0"]
    ran = []
    real_run = recipe.run

    def spy(cfg, out, **kw):
        ran.append(cfg.method)
        return real_run(cfg, out, **kw)
    monkeypatch.setattr(recipe, "run", spy)
    out = tmp_path / "cmp"
    args = ["compare", str(SMOKE), "--methods", "spin,dpo", "--eval", "dev,alpaca_eval", "--judge", "reference",
            "--limit", "2", "--output", str(out)] + [x for s in sets for x in ("--set", s)]
    assert main(args) == 0
    state = json.loads((out / "compare.json").read_text())
    assert state["methods"]["spin"]["status"] == "done"
    assert state["methods"]["dpo"]["status"] == "failed" and "rejected" in state["methods"]["dpo"]["error"]
    spin_eval = state["methods"]["spin"]["eval"]
    assert spin_eval["dev"]["n"] == 2 and spin_eval["alpaca_eval"]["n"] == 2
    assert 0 <= spin_eval["alpaca_eval"]["ci_low"] <= spin_eval["alpaca_eval"]["score"] <= 1

    pref.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}) + "\n"
                    + json.dumps({"prompt": "Bye?", "chosen": "Goodbye.", "rejected": "No."}) + "\n")
    ran.clear()
    assert main(args) == 0
    assert ran == ["dpo"]
    state = json.loads((out / "compare.json").read_text())
    assert all(state["methods"][m]["status"] == "done" for m in ("spin", "dpo"))
    assert state["methods"]["dpo"]["pairs"] == 2 and state["methods"]["dpo"]["dpo_steps"] == 1
    # both finals were judged against the same start-model answers
    start = [json.loads(x) for x in (out / "eval" / "alpaca_eval" / "start.jsonl").read_text().splitlines()]
    assert len(start) == 2
    table = (out / "comparison.md").read_text()
    assert "| spin |" in table and "| dpo |" in table and "failed" not in table and "comparison.png" in table


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_configs_validate_and_dry_run(path, capsys):
    cfg = config.load(path)  # validates every key and value
    assert cfg.model.dtype == "bfloat16" and cfg.model.name in ("Qwen/Qwen2.5-7B", "meta-llama/Meta-Llama-3-8B")
    assert cfg.method == path.stem.split("-")[0]
    text = path.read_text()
    assert "configs/accelerate/zero3.yaml" in text  # how to launch it: DeepSpeed ZeRO-3 through accelerate
    if cfg.method == "dpo":
        assert cfg.data.preference == "HuggingFaceH4/ultrafeedback_binarized"
    p = plan(cfg)
    assert p["pool"] is None  # a hub dataset is not downloaded for a plan
    assert p["rounds"] == (0 if cfg.method == "sft" else cfg.rounds)
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan: method " + cfg.method in out and "total:" in out


def test_paper_configs_share_budget_per_model():
    """Within a base model, the methods differ only where the method needs it: same data, rounds, sizes, DPO."""
    by_model = {}
    for path in PAPER:
        cfg = config.to_dict(config.load(path))
        by_model.setdefault(cfg["model"]["name"], []).append(cfg)
    assert len(by_model) == 2 and all(len(v) == 5 for v in by_model.values())
    for cfgs in by_model.values():
        for key in ("rounds", "seed", "sft"):
            assert len({c[key] for c in cfgs}) == 1
        for section in ("generation", "train", "dpo", "eval"):
            assert len({json.dumps(c[section], sort_keys=True) for c in cfgs}) == 1, section
        datas = [{k: v for k, v in c["data"].items() if not k.startswith("preference")} for c in cfgs]
        assert len({json.dumps(d, sort_keys=True) for d in datas}) == 1
