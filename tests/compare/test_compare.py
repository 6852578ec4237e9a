"""``sgpo compare``: one table for several methods, failures recorded without stopping the others, re-runs skip
what is finished; paper-scale configs validate and dry-run."""
import json
import logging
from pathlib import Path

import pytest
import torch

from sgpo.compare import runs as compare_mod
from sgpo.config import schema as config
from sgpo.run import recipe
from sgpo.cli.main import main

REPO = Path(__file__).resolve().parents[2]
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
        calls.append((cfg.method, cfg.seed))
        if cfg.method in fail:
            raise RuntimeError(f"{cfg.method} exploded")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config.dump(cfg))
        (out / "manifest.json").write_text(json.dumps({"stages": {"round_0": {"status": "done", "seconds": 30},
                                                                  "round_1": {"status": "done", "seconds": 60}}}))
        score = {"spin": 0.6, "sgpo": 0.7, "dpo": 0.55}[cfg.method] + 0.01 * cfg.seed
        summary = {"eval/test/length_final": 40.0, "eval/test/finished_final": 0.8}
        for judge, x in (("reference", score), ("lm_gemma", score - 0.2)):
            k = f"eval/test/{judge}/win_rate_vs_start"
            summary.update({k: x, k + "_ci_low": x - 0.1, k + "_ci_high": x + 0.1, k + "_n": 200,
                            k + "_length_matched": x, k + "_length_matched_ci_low": x - 0.2,
                            k + "_length_matched_ci_high": x + 0.2, k + "_length_matched_n": 50})
        (out / "summary.json").write_text(json.dumps(summary))
        (out / "round_1").mkdir(exist_ok=True)
        (out / "round_1" / "metrics.json").write_text(json.dumps({"pairs/kept": 3, "dpo/steps": 2,
                                                                  "rewards/margins": 0.1}))
        (out / "round_1" / "policy.jsonl").write_text(json.dumps({"id": "a", "text": "x", "token_ids": [1, 2, 3]})
                                                      + "\n")
        (out / "round_1" / "dev_policy.jsonl").write_text(json.dumps({"id": "a", "text": "x", "token_ids": [1]})
                                                          + "\n")
        return {}
    return run


def private_cache(tmp_path, monkeypatch) -> None:
    """A cache of the test's own (answers, verdicts) that shares the converted models (a conversion takes a minute)."""
    from sgpo.models.loading import cache_dir

    models = cache_dir() / "models"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(models)
    monkeypatch.setenv("SGPO_CACHE", str(tmp_path / "cache"))


def rows_of(md: Path) -> dict:
    return {tuple(c.strip() for c in line.split("|")[1:3]): line for line in md.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| method")}


def plan_of(methods, seeds=(0,), overrides=()):
    return compare_mod.Plan(str(SMOKE), list(methods), list(seeds), ["test"], list(overrides))


def test_failed_method_is_reported_and_the_rerun_only_redoes_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "run", fake_run(calls, fail={"dpo"}))
    out = tmp_path / "cmp"
    md = compare_mod.compare(plan_of(["spin", "dpo", "sgpo"]), out)
    assert calls == [("spin", 0), ("dpo", 0), ("sgpo", 0)]  # the failure did not stop sgpo
    rows = rows_of(md)
    assert "failed: RuntimeError: dpo exploded" in rows[("dpo", "0")]
    assert "60.0% [50.0–70.0]" in rows[("spin", "0")] and "70.0% [60.0–80.0]" in rows[("sgpo", "0")]
    assert "50.0% [30.0–70.0], n=50" in rows[("sgpo", "0")]  # the second judge's length-matched rate
    assert "| 2 | 3 | 3 | 1.5 | done" in rows[("spin", "0")]  # DPO steps, pairs, tokens (not dev's), minutes
    assert (out / "comparison.png").stat().st_size > 0 and (out / "rounds.png").stat().st_size > 0
    state = json.loads((out / "compare.json").read_text())
    assert state["runs"]["dpo@0"]["status"] == "failed" and state["runs"]["spin@0"]["status"] == "done"

    calls.clear()
    monkeypatch.setattr(recipe, "run", fake_run(calls, fail=set()))
    md = compare_mod.compare(plan_of(["spin", "dpo", "sgpo"]), out)
    assert calls == [("dpo", 0)]  # finished runs are skipped
    assert "failed" not in md.read_text() and "55.0% [45.0–65.0]" in md.read_text()

    # a changed config is not "finished": that method runs again
    calls.clear()
    compare_mod.compare(plan_of(["spin", "dpo"], overrides=["dpo.beta=0.2"]), out)
    assert calls == [("spin", 0), ("dpo", 0)]


def test_seeds_run_apart_and_their_spread_is_reported(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "run", fake_run(calls, fail=set()))
    out = tmp_path / "cmp"
    md = compare_mod.compare(plan_of(["spin", "sgpo"], seeds=[1, 3]), out)
    assert calls == [("spin", 1), ("spin", 3), ("sgpo", 1), ("sgpo", 3)]
    assert (out / "sgpo" / "seed_3" / "summary.json").exists()
    rows = rows_of(md)
    assert "73.0% [63.0–83.0]" in rows[("sgpo", "3")] and "71.0% [61.0–81.0]" in rows[("sgpo", "1")]
    text = md.read_text()
    assert "sgpo, reference: mean 72.0% over 2 seeds, spread 2.0 points" in text
    assert "spin, lm_gemma: mean 42.0% over 2 seeds" in text


def test_a_second_seed_for_some_methods_only_reuses_the_finished_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "run", fake_run(calls, fail=set()))
    out = tmp_path / "cmp"
    compare_mod.compare(plan_of(["spin", "sgpo"], seeds=[1]), out)
    calls.clear()
    plan = compare_mod.Plan(str(SMOKE), ["spin", "sgpo"], [1], ["test"], extra=compare_mod.parse_runs("sgpo@3"))
    md = compare_mod.compare(plan, out)
    assert calls == [("sgpo", 3)]
    assert list(rows_of(md)) == [("spin", "1"), ("sgpo", "1"), ("sgpo", "3")]
    text = md.read_text()
    assert "sgpo, reference: mean 72.0% over 2 seeds" in text and "spin, reference: mean" not in text
    with pytest.raises(ValueError, match="METHOD@SEED"):
        compare_mod.parse_runs("sgpo@two")


def test_sgpo_is_paired_with_each_method_of_its_seed_over_the_same_start_answers(tmp_path, monkeypatch):
    """SGPO's final answers are the references (the reference judge prefers them to every start answer), spin's repeat
    the start answers (ties): SGPO − spin is exactly +50 points; with other start answers nothing is paired."""
    from sgpo.compare.paired import paired_figures
    from sgpo.models.loading import load_tokenizer, resolve
    from sgpo.data.splits import prepare_splits

    private_cache(tmp_path, monkeypatch)
    cfg = config.load(str(SMOKE))
    test = prepare_splits(cfg, load_tokenizer(resolve(cfg.model.name))).test
    calls, plain = [], fake_run([], fail=set())

    def run(cfg, out, **kw):
        plain(cfg, out)
        calls.append(cfg.method)
        (Path(out) / "test").mkdir(exist_ok=True)
        for label in ("start", "final"):
            rows = [{"id": r.id, "text": r.reference if (label, cfg.method) == ("final", "sgpo") else f"start {i}"}
                    for i, r in enumerate(test)]
            (Path(out) / "test" / f"answers_{label}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        return {}

    monkeypatch.setattr(recipe, "run", run)
    out = tmp_path / "cmp"
    md = compare_mod.compare(plan_of(["spin", "sgpo"]), out)
    paired = json.loads((out / "compare.json").read_text())["paired"]
    d = paired["spin@0"]["reference"]
    assert (d["diff"], d["ci_low"], d["ci_high"], d["n"]) == (0.5, 0.5, 0.5, len(test))
    assert paired["spin@0"]["lm_tiny-random"]["n"] == len(test)  # the second judge too
    assert list(paired) == ["spin@0"] and "- sgpo − spin, seed 0: reference +50.0 [+50.0, +50.0]" in md.read_text()

    answers = out / "spin" / "seed_0" / "test" / "answers_start.jsonl"
    answers.write_text(answers.read_text().replace("start 0", "another start"))
    assert paired_figures(out, [("spin", 0), ("sgpo", 0)], cfg) == {}


def test_a_scorer_judge_s_own_scores_are_tabled_and_paired(tmp_path, monkeypatch):
    """Under a judge that is a program (a scorer: ifeval, python:...) each run's row shows its final model's mean
    score, recomputed from the saved answers (the summary's own figure is not read: a run made before a figure
    existed gets it too), and SGPO − spin is also paired on the final answers' own scores: here the scorer gives 1 to
    an answer that is the reference, SGPO answers with the references and spin with a fixed sentence but for one
    prompt, so the paired score difference is (n − 1)/n; then a further judge of the saved answers
    (``--test-judge reference``) adds its figures and pairs to the finished runs without running them again."""
    from sgpo.eval.held_out import judge_name
    from sgpo.models.loading import load_tokenizer, resolve
    from sgpo.data.splits import prepare_splits

    (tmp_path / "exact_scorer.py").write_text(
        "def is_reference(prompt, response, row):\n    return float(response == row['reference'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    private_cache(tmp_path, monkeypatch)
    sets = ["eval.judge=python:exact_scorer:is_reference", "eval.second_judge="]
    cfg = config.load(str(SMOKE), sets)
    test, name = prepare_splits(cfg, load_tokenizer(resolve(cfg.model.name))).test, judge_name(cfg.eval.judge)
    plain = fake_run([], fail=set())

    def run(cfg, out, **kw):
        plain(cfg, out)
        summary, k = json.loads((Path(out) / "summary.json").read_text()), f"eval/test/{name}/"
        summary = {key: x for key, x in summary.items() if "/reference/" not in key}  # this run has no reference judge
        for key, x in (("win_rate_vs_start", 0.5), ("score_final", 0.25)):  # score_final: recomputed, not read
            summary.update({k + key: x, k + key + "_ci_low": x / 2, k + key + "_ci_high": x * 1.5,
                            k + key + "_n": len(test)})
        (Path(out) / "summary.json").write_text(json.dumps(summary))
        (Path(out) / "test").mkdir(exist_ok=True)
        for label in ("start", "final"):
            rows = [{"id": r.id, "text": r.reference if (label, cfg.method) == ("final", "sgpo") or i == 0
                     else "A sentence."} for i, r in enumerate(test)]
            (Path(out) / "test" / f"answers_{label}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        return {}

    calls = []
    monkeypatch.setattr(recipe, "run", lambda cfg, out, **kw: calls.append(cfg.method) or run(cfg, out))
    out = tmp_path / "cmp"
    md = compare_mod.compare(plan_of(["spin", "sgpo"], overrides=sets), out).read_text()
    state = json.loads((out / "compare.json").read_text())
    d = state["paired"]["spin@0"][f"{name} score"]
    assert d["n"] == len(test) > 1 and d["diff"] == pytest.approx((len(test) - 1) / len(test))
    assert state["paired"]["spin@0"][f"{name} all met"]["diff"] == pytest.approx(d["diff"])
    spin = state["runs"]["spin@0"]["eval"]["test"]["judges"][name]
    assert spin["score_final"]["score"] == spin["score_start"]["score"] == pytest.approx(1 / len(test))
    assert f"{name}: mean score" in md and "100.0% [100.0–100.0]" in md and f"{name}: all met" in md
    assert f"sgpo − spin, seed 0: {name} +" in md and f"{name} score {100 * d['diff']:+.1f}" in md
    assert "reference" not in state["runs"]["spin@0"]["eval"]["test"]["judges"] and calls == ["spin", "sgpo"]

    plan = plan_of(["spin", "sgpo"], overrides=sets)
    plan.test_judges = ["reference"]
    md = compare_mod.compare(plan, out).read_text()
    state = json.loads((out / "compare.json").read_text())
    assert calls == ["spin", "sgpo"]  # nothing ran again
    sgpo_ref = state["runs"]["sgpo@0"]["eval"]["test"]["judges"]["reference"]
    # sgpo's final answers are the references (and tie with the start answer that is one): the reference judge
    # prefers them on every other prompt
    assert sgpo_ref["n"] == len(test) and sgpo_ref["score"] == pytest.approx(1 - 0.5 / len(test))
    # spin's final answers are its start answers: ties, 50%
    assert state["paired"]["spin@0"]["reference"]["diff"] == pytest.approx(sgpo_ref["score"] - 0.5)
    assert "reference: vs start" in md and "sgpo − spin, seed 0: reference +" in md


def test_unknown_benchmark_or_method_fails_before_anything_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "run", fake_run(calls, fail=set()))
    bad = compare_mod.Plan(str(SMOKE), ["spin"], [0], ["mmlu"])
    with pytest.raises(ValueError, match="unknown benchmark"):
        compare_mod.compare(bad, tmp_path / "a")
    with pytest.raises(Exception, match="method"):
        compare_mod.compare(plan_of(["spin", "ppo"]), tmp_path / "b")
    assert calls == []


@pytest.mark.slow
def test_compare_end_to_end_resumes_after_a_failure(tmp_path, monkeypatch, caplog):
    """Real runs on the tiny model: dpo fails on a malformed preference file, spin finishes; after the file is
    fixed, a re-run resumes dpo only and evaluates it on the same prompts with the same judges; the start model's
    IFEval answers are generated once for both."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Tell me about {t}.", "response": f"{t.title()} are common."})
                           + "\n" for t in ["cats", "dogs", "cars", "cups", "hats", "pens", "keys", "maps", "cows"]))
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello."}) + "\n")  # no 'rejected': an error
    sets = [f"data.sft={sft}", f"data.preference={pref}", "data.dev_size=2", "data.test_size=2",
            "data.improver_size=1", "data.round_size=2", "rounds=1", "generation.max_new_tokens=4",
            "dpo.batch_size=2", "train.batch_size=2", "eval.head_to_head_size=2", "eval.improver_size=0"]
    ran = []
    real_run = recipe.run

    def spy(cfg, out, **kw):
        ran.append(cfg.method)
        return real_run(cfg, out, **kw)
    monkeypatch.setattr(recipe, "run", spy)
    out = tmp_path / "cmp"
    args = ["compare", str(SMOKE), "--methods", "spin,dpo", "--eval", "test,ifeval,dev", "--limit", "2",
            "--output", str(out)] + [x for s in sets for x in ("--set", s)]
    assert main(args) == 0
    state = json.loads((out / "compare.json").read_text())
    assert state["runs"]["spin@0"]["status"] == "done"
    assert state["runs"]["dpo@0"]["status"] == "failed" and "rejected" in state["runs"]["dpo@0"]["error"]
    spin = state["runs"]["spin@0"]["eval"]
    assert spin["dev"]["n"] == 2 and spin["ifeval"]["n"] == 2
    assert {"reference", "lm_tiny-random"} <= set(spin["test"]["judges"])
    assert all(j["n"] == 2 and 0 <= j["ci_low"] <= j["score"] <= j["ci_high"] <= 1
               for j in spin["test"]["judges"].values())
    assert state["runs"]["spin@0"]["generated_tokens"] > 0

    pref.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}) + "\n"
                    + json.dumps({"prompt": "Bye?", "chosen": "Goodbye.", "rejected": "No."}) + "\n")
    ran.clear()
    with caplog.at_level(logging.INFO, logger="sgpo"):
        assert main(args) == 0
    assert ran == ["dpo"]
    # dpo's SFT is spin's (same data, seed and settings): taken, not trained again, and its pre-rounds test answers
    # come from the answer cache
    assert json.loads((out / "dpo" / "seed_0" / "sft" / "metrics.json").read_text())["sft/reused"] == 1
    cached = [r.getMessage() for r in caplog.records if "answers come from the cache" in r.getMessage()]
    assert any("pre_rounds model" in m for m in cached) and any("start model" in m for m in cached), cached
    state = json.loads((out / "compare.json").read_text())
    assert all(state["runs"][k]["status"] == "done" for k in ("spin@0", "dpo@0"))
    assert state["runs"]["dpo@0"]["pairs"] == 2 and state["runs"]["dpo@0"]["dpo_steps"] == 1
    # the start model's IFEval answers: one file, shared by both runs; each final model has its own
    generations = sorted((out / "eval" / "ifeval").glob("generations-*.jsonl"))
    assert len(generations) == 3
    table = (out / "comparison.md").read_text()
    assert "| spin | 0 |" in table and "| dpo | 0 |" in table and "failed" not in table
    assert "IFEval prompt strict (Δ vs start)" in table and "IFEval instruction loose (Δ vs start)" in table
    assert "comparison.png" in table


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_configs_validate(path):
    cfg = config.load(path)  # validates every key and value
    assert cfg.model.dtype == "bfloat16" and cfg.model.name in ("Qwen/Qwen2.5-7B", "meta-llama/Meta-Llama-3-8B")
    assert cfg.method == path.stem.split("-")[0]
    text = path.read_text()
    assert "configs/accelerate/zero3.yaml" in text  # how to launch it: DeepSpeed ZeRO-3 through accelerate
    if cfg.method == "dpo":
        assert cfg.data.preference == "HuggingFaceH4/ultrafeedback_binarized"
    # the dry run of every shipped config is tests/run/test_dry_run.py



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


def test_each_run_may_take_its_sft_from_the_other_runs_of_its_seed_and_from_the_comparisons_named(tmp_path,
                                                                                                   monkeypatch):
    """What ``recipe.run`` is offered as ``sft_from`` (it takes one only when the SFT is identical: test_sft_reuse)."""
    offered, calls = {}, []
    inner = fake_run(calls, fail=set())

    def run(cfg, out, **kw):
        offered[(cfg.method, cfg.seed)] = [str(p.relative_to(tmp_path)) for p in kw["sft_from"]]
        return inner(cfg, out, **kw)
    monkeypatch.setattr(recipe, "run", run)
    for d in ("a/sgpo/seed_1", "a/sgpo/seed_2"):
        (tmp_path / d).mkdir(parents=True)
    plan = compare_mod.Plan(str(SMOKE), ["spin", "sgpo"], [1, 2], ["test"], sft_from=[str(tmp_path / "a")])
    compare_mod.compare(plan, tmp_path / "b")
    assert offered[("spin", 1)] == ["b/sgpo/seed_1", "a/sgpo/seed_1"]
    assert offered[("sgpo", 2)] == ["b/spin/seed_2", "a/sgpo/seed_2"]
