"""Kill the CLI with SIGKILL at several points, resume, and compare with an uninterrupted run.

A shrunken smoke config (tiny random model, a 16-row data file, no dev figures) keeps each run to seconds. One run goes
through uninterrupted; another is killed during generation, during improver training, between stages and during DPO
training, each time resumed with the same command, and must end with byte-identical pairs and the same final weights.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cli_runs import (REPO, checkpoints, cli_env, command, lines, load_weights, run_and_kill, run_to_end, stage_status,
                      write_data)

PROCESS_HISTORY = ("time/", "memory/")
"""Stage metrics a resumed run cannot reproduce, because they measure the processes rather than what they computed:
wall seconds (``time/<stage>_s``, ``time/<stage>/<phase>_s``) and the peak RSS so far (``memory/<stage>/peak_rss_gb``,
the high-water mark of whichever process ran the stage: a resumed process loaded other things, or fewer, before it)."""


def computed(metrics: dict) -> dict:
    """The metrics a resumed run must reproduce: all but those in ``PROCESS_HISTORY``."""
    return {k: v for k, v in metrics.items() if not k.startswith(PROCESS_HISTORY)}


def shard_rows(path: Path) -> dict:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            rows[d["id"]] = d
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    run_to_end(out, data)
    return out


@pytest.mark.slow
def test_kill_anywhere_then_resume_reproduces_the_run(tmp_path, data, uninterrupted):
    import torch

    out, log = tmp_path / "killed", tmp_path / "log.txt"
    # 1. during generation: the first batch of the improver drafts is on disk, the second is not
    run_and_kill(out, data, lambda: lines(out / "improver" / "drafts.jsonl") >= 2, "during generation", log)
    assert stage_status(out, "improver") == "running"
    assert lines(out / "improver" / "drafts.jsonl") < 4
    # 2. during improver training: a mid-training checkpoint exists, the stage is not done
    run_and_kill(out, data, lambda: bool(checkpoints(out, "improver")), "during training", log)
    assert stage_status(out, "improver") == "running"
    # 3. between stages: the improver stage has just been recorded as done
    run_and_kill(out, data, lambda: stage_status(out, "improver") == "done", "between stages", log)
    # 4. during DPO: the round's pairs (with their reference log-probs) are written, training has begun
    run_and_kill(out, data, lambda: bool(checkpoints(out, "round_1")), "during DPO training", log)
    assert stage_status(out, "round_1") == "running" and (out / "round_1" / "pairs.jsonl").exists()
    # 5. resume to the end
    p = run_to_end(out, data)
    assert "done earlier, skipped" in p.stderr

    # byte-identical pairs, the same generations, the same metrics, the same weights
    assert (out / "round_1" / "pairs.jsonl").read_bytes() == (uninterrupted / "round_1" / "pairs.jsonl").read_bytes()
    for shard in ("improver/drafts.jsonl", "round_1/policy.jsonl", "round_1/improver.jsonl"):
        assert shard_rows(out / shard) == shard_rows(uninterrupted / shard), shard
    for stage in ("improver", "round_1"):
        a = json.loads((out / stage / "metrics.json").read_text())
        b = json.loads((uninterrupted / stage / "metrics.json").read_text())
        assert computed(a) == computed(b), stage
        assert {"improver": "nll/loss", "round_1": "dpo/loss"}[stage] in computed(a)  # the filter keeps what counts
    wa, wb = load_weights(out / "final"), load_weights(uninterrupted / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    # finished runs leave no training checkpoints or temporary files behind
    assert not list(out.glob("*/checkpoints")), list(out.glob("*/checkpoints"))
    assert not [p for p in out.rglob(".*tmp*")]
    # a finished run re-run is a no-op that skips every stage
    again = run_to_end(out, data)
    assert again.stderr.count("done earlier, skipped") >= 3


def test_a_resumed_runs_peak_memory_covers_the_stages_other_processes_ran(tmp_path, data, uninterrupted):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    m = json.loads((out / "improver" / "metrics.json").read_text())
    m["memory/improver/peak_rss_gb"] = 99.0  # as if the process that ran that stage had peaked there
    (out / "improver" / "metrics.json").write_text(json.dumps(m))
    run_to_end(out, data)  # every stage done: this process trains nothing
    assert json.loads((out / "summary.json").read_text())["memory/peak_rss_gb"] == 99.0


@pytest.mark.slow
def test_changed_config_on_resume_names_the_keys(tmp_path, data, uninterrupted):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    p = subprocess.run(command(out, data, ["--set", "dpo.beta=0.25", "--set", "seed=3"]), cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("sgpo: error:") and "dpo.beta" in err[-1] and "seed" in err[-1]
    assert "--force-restart" in err[-1]
    assert "Traceback" not in p.stderr
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing was touched


@pytest.mark.slow
def test_changed_data_on_resume_is_refused(tmp_path, data, uninterrupted):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    changed = tmp_path / "train.jsonl"  # same path in the config would hide it; the content is what counts
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    changed.write_text("".join(json.dumps({**r, "response": "Indeed, " + r["response"]}) + "\n" for r in rows))
    cfg = (out / "config.yaml").read_text().replace(str(data), str(changed))
    (out / "config.yaml").write_text(cfg)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    p = subprocess.run(command(out, changed), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    last = [x for x in p.stderr.splitlines() if x.startswith("sgpo: error:")][-1]
    assert "stage 'round_0' was done with different inputs" in last and "Traceback" not in p.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_force_restart_forgets_the_run_but_nothing_else(tmp_path):
    from sgpo.config import schema as config
    from sgpo.run.stages import check_resume
    from sgpo.run.stages import RunDir

    out = tmp_path / "run"
    run = RunDir(out)
    for stage in ("round_0", "improver"):
        (out / stage).mkdir()
        (out / stage / "drafts.jsonl").write_text("{}\n")
        run.manifest["stages"][stage] = {"status": "done"}
    run.save_manifest()
    (out / "config.yaml").write_text(config.dump(config.load(None, ["seed=1"])))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="changed: seed"):
        check_resume(RunDir(out), config.load(None, ["seed=2"]), False)
    run = RunDir(out)
    check_resume(run, config.load(None, ["seed=2"]), True)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]
    assert run.manifest["stages"] == {}


def test_resume_ignores_keys_a_later_sgpo_removed(tmp_path, caplog):
    import yaml

    from sgpo.config import schema as config
    from sgpo.run.stages import RunDir, check_resume

    out = tmp_path / "run"
    run = RunDir(out)
    run.manifest["stages"]["round_0"] = {"status": "done"}
    run.save_manifest()
    saved = yaml.safe_load(config.dump(config.load(None, ["seed=1"])))
    saved["improver"]["experimental"]["guided_min_gain"] = 0.02  # a key of an older sgpo
    del saved["eval"]["head_to_head_size"]  # a key added since: taken at its default
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    with caplog.at_level("INFO", logger="sgpo"):
        check_resume(RunDir(out), config.load(None, ["seed=1"]), False)
    assert "improver.experimental.guided_min_gain" in caplog.text
    with pytest.raises(Exception, match=r"changed: seed\)"):
        check_resume(RunDir(out), config.load(None, ["seed=2"]), False)


def test_a_column_mapping_survives_resume_and_its_change_is_named(tmp_path):
    """``data.fields`` is a mapping-valued key, not a section: a run with one resumes, and changing it is refused."""
    from sgpo.config import schema as config
    from sgpo.run.stages import RunDir, check_resume

    out = tmp_path / "run"
    run = RunDir(out)
    run.manifest["stages"]["round_0"] = {"status": "done"}
    run.save_manifest()
    cfg = config.load(None, ["data.fields.prompt=question"])
    (out / "config.yaml").write_text(config.dump(cfg))
    check_resume(RunDir(out), cfg, False)
    with pytest.raises(Exception, match=r"changed: data.fields.prompt\)"):
        check_resume(RunDir(out), config.load(None, ["data.fields.prompt=query"]), False)


def _finished_run(out: Path, sets: list[str]) -> None:
    from sgpo.config import schema as config
    from sgpo.run.stages import RunDir

    run = RunDir(out)
    for st in ("round_0", "improver", "round_1", "final", "test", "test_second_judge"):
        run.manifest["stages"][st] = {"status": "done", "inputs": st}
    run.save_manifest()
    (out / "config.yaml").write_text(config.dump(config.load(None, sets)))


def test_resume_recomputes_the_figures_after_an_evaluation_change_and_keeps_the_training(tmp_path, caplog):
    from sgpo.config import schema as config
    from sgpo.run.stages import RunDir, check_resume

    out = tmp_path / "run"
    _finished_run(out, ["rounds=1"])
    with caplog.at_level("INFO", logger="sgpo"):
        check_resume(RunDir(out), config.load(None, ["rounds=1", "eval.second_judge=reference",
                                                     "eval.agreement_size=50"]), False)
    stages = RunDir(out).manifest["stages"]
    assert set(stages) == {"round_0", "improver", "round_1", "final"}  # only the test figures are redone
    assert "eval.agreement_size, eval.second_judge" in caplog.text and "training is kept" in caplog.text


def test_machine_settings_may_change_on_resume_and_redo_nothing(tmp_path, caplog):
    """A run made before ``generation.vllm_gpu_memory``'s default changed (0.5 → 0, the strategy's share) resumes:
    the memory share and the collective timeout change how the run uses the machine, not what it computes."""
    from sgpo.config import schema as config
    from sgpo.core.files import RunError
    from sgpo.run.stages import RunDir, check_resume

    out = tmp_path / "run"
    _finished_run(out, ["rounds=1", "generation.vllm_gpu_memory=0.5"])
    with caplog.at_level("INFO", logger="sgpo"):
        check_resume(RunDir(out), config.load(None, ["rounds=1", "collective_timeout_minutes=30"]), False)
    assert set(RunDir(out).manifest["stages"]) == {"round_0", "improver", "round_1", "final", "test",
                                                   "test_second_judge"}  # nothing redone, the figures kept
    assert "generation.vllm_gpu_memory" in caplog.text and "nothing is redone" in caplog.text
    with pytest.raises(RunError, match=r"changed: dpo.beta\)"):  # beside a training key: the training key refused
        check_resume(RunDir(out), config.load(None, ["rounds=1", "dpo.beta=0.2"]), False)


def test_more_rounds_continue_without_an_sft_step_and_are_refused_with_a_way_on_with_one(tmp_path):
    from sgpo.config import schema as config
    from sgpo.core.files import RunError
    from sgpo.run.stages import RunDir, check_resume

    out = tmp_path / "run"
    _finished_run(out, ["rounds=1", "sft=false"])
    (out / "test").mkdir()
    (out / "test" / "answers_final.jsonl").write_text('{"id": "a", "text": "of the one-round model"}\n')
    check_resume(RunDir(out), config.load(None, ["rounds=3", "sft=false"]), False)
    assert set(RunDir(out).manifest["stages"]) == {"round_0", "improver", "round_1"}  # rounds 2, 3 and the rest follow
    assert not (out / "test").exists()  # the old final model's test answers are not reused
    _finished_run(out, ["rounds=1"])
    with pytest.raises(RunError, match=r"rounds 1 → 3 would change finished work.*--set model.name=.*final "
                                       r"--set sft=false --set rounds=2"):
        check_resume(RunDir(out), config.load(None, ["rounds=3"]), False)
    with pytest.raises(RunError, match=r"changed: rounds\)"):  # fewer rounds: other finished work
        check_resume(RunDir(out), config.load(None, ["rounds=0"]), False)
    with pytest.raises(RunError, match=r"changed: dpo.beta, eval.judge\)"):  # with a training key: refused, all named
        check_resume(RunDir(out), config.load(None, ["rounds=1", "dpo.beta=0.2", "eval.judge=lm:sgpo:tiny-random"]),
                     False)
