"""Two processes on the CPU (DDP over gloo, started by ``accelerate launch``) against one process.

What must hold exactly: everything generated before any training (whole batches of the fixed plan per rank), the
prompts and texts of the pairs, and that only the main process wrote (no duplicated shard rows). What holds to float
tolerance: trained weights and the reference log-probabilities of the pairs, because a gradient summed over two
half-batches and all-reduced is not bit-identical to the gradient of the whole batch.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runs import REPO, cli_env, load_weights, write_data

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]  # runs the CLI / a script in a subprocess

SETS = ["data.dev_size=2", "data.improver_size=4", "data.round_size=6", "eval.improver_size=0",
        "eval.head_to_head_size=0", "generation.max_new_tokens=8", "generation.batch_size=2", "improver.chain=1",
        # 6 NLL examples in batches of 5 → a last batch of 1 (one rank gets an empty slice);
        # 6 pairs in batches of 4 → a last batch of 2 (one pair per rank)
        "train.batch_size=5", "dpo.batch_size=4", "train.checkpoint_every=1", "rounds=1",
        "sft=false", "data.test_size=0"]  # no training before the improver drafts: they must be the same


def command(out: Path, data: Path) -> list[str]:
    cmd = ["-m", "sgpo", "run", str(REPO / "configs" / "smoke.yaml"), "-o", str(out), "--set", f"data.sft={data}"]
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    data = write_data(root / "train.jsonl")
    run([sys.executable] + command(root / "one", data))
    return root / "one", data


LAUNCHERS = {
    # accelerate's --cpu flag starts a single process (multi-CPU needs mpirun there); --multi_gpu starts the
    # processes through torch.distributed, and sgpo sets them up on the CPU over gloo when there is no GPU
    "ddp": ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"],
    # the user's own FSDP command: on CPU processes sgpo runs accelerate's FSDP2 path over gloo
    "fsdp": ["--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml")],
    # the user's own ZeRO commands: DeepSpeed's engine on CPU processes (its CPU accelerator over gloo)
    "zero2": ["--config_file", str(REPO / "configs" / "accelerate" / "zero2.yaml")],
    "zero3": ["--config_file", str(REPO / "configs" / "accelerate" / "zero3.yaml")],
}


@pytest.fixture(scope="module", params=sorted(LAUNCHERS))
def runs(request, single):
    one, data = single
    two = one.parent / request.param
    p = run([sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS[request.param], "--num_processes", "2",
             "--mixed_precision", "no"] + command(two, data))
    return one, two, p


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_two_processes_really_ran(runs):
    _, two, p = runs
    assert p.stderr.count("run directory:") == 2  # both ranks started
    assert "runs data-parallel" not in p.stderr  # FSDP was not quietly replaced by DDP
    assert ("training with FSDP on CPU processes" in p.stderr) == (two.name == "fsdp")
    assert ("training with DEEPSPEED on CPU processes" in p.stderr) == two.name.startswith("zero")
    assert (two / "final" / "model.safetensors").exists()


def test_generation_before_training_is_identical(runs):
    one, two, _ = runs
    # the same responses (a shard is appended in the order batches complete, which may differ)
    drafts = [{r["id"]: r for r in rows(run / "improver" / "drafts.jsonl")} for run in (one, two)]
    assert drafts[0] == drafts[1] and drafts[0]
    f = "improver/examples.jsonl"
    assert (one / f).read_bytes() == (two / f).read_bytes(), f


def test_only_the_main_process_wrote(runs):
    _, two, _ = runs
    for shard in ("improver/drafts.jsonl", "round_1/policy.jsonl", "round_1/improver.jsonl"):
        ids = [r["id"] for r in rows(two / shard)]
        assert len(ids) == len(set(ids)) > 0, shard  # two writers would have appended every row twice
    assert not list(two.rglob(".*tmp*")) and not list(two.glob("*/checkpoints"))
    manifest = json.loads((two / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())


def test_pairs_equal_the_single_process_run(runs):
    one, two, _ = runs
    a, b = rows(one / "round_1" / "pairs.jsonl"), rows(two / "round_1" / "pairs.jsonl")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for k in ("record_id", "prompt", "chosen", "rejected", "chosen_finished", "rejected_finished", "meta"):
            assert x[k] == y[k], k
        for k in ("ref_chosen_logp", "ref_rejected_logp"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-4), k


def test_weights_and_losses_match_to_float_tolerance(runs):
    import torch

    one, two, _ = runs
    for path in ("improver/model", "final"):
        wa, wb = load_weights(one / path), load_weights(two / path)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4, msg=f"{path}: {k}")
    for stage, key in (("improver", "nll/loss"), ("round_1", "dpo/loss"), ("round_1", "rewards/accuracies")):
        ma = json.loads((one / stage / "metrics.json").read_text())
        mb = json.loads((two / stage / "metrics.json").read_text())
        assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-5), (stage, key)
        assert mb.get("nll/steps") == ma.get("nll/steps") and mb.get("dpo/steps") == ma.get("dpo/steps")


def test_sharded_training_killed_mid_step_resumes_to_the_same_weights(runs, tmp_path):
    """A sharded checkpoint (FSDP's or ZeRO-3's, one shard per process) is written, read back and continued: a launch
    killed after the first DPO step's checkpoint ends, once re-run, with the weights of the uninterrupted launch."""
    import signal
    import time

    import torch

    one, two, _ = runs
    if two.name not in ("fsdp", "zero3"):
        pytest.skip("the kill-and-resume of a data-parallel launch is tests/run/test_resume.py's")
    data = one.parent / "train.jsonl"
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS[two.name], "--num_processes", "2",
           "--mixed_precision", "no"] + command(out, data)
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not list(out.glob("round_1/checkpoints/*/step_*")):
            time.sleep(0.02)
    finally:  # the launcher and the workers it started (theirs is another process group)
        subprocess.run(["pkill", f"-{int(signal.SIGKILL)}", "-f", str(out)], check=False)
        proc.wait()
    assert list(out.glob("round_1/checkpoints/*/step_*/accelerate")), "no sharded checkpoint was written"
    p = run(cmd)
    assert "round_1: done in" in p.stderr and "improver: done earlier, skipped" in p.stderr
    wa, wb = load_weights(two / "final"), load_weights(out / "final")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


LORA = '''
import os, sys, torch
from sgpo.core import distributed
from sgpo.core import files
from sgpo.config.schema import ModelConfig, TrainConfig
from sgpo.models.loading import load_model, load_tokenizer, tiny_random_path
from sgpo.training import sft
from sgpo.training.adapters import trainable
from sgpo.training.loop import Job

dist = distributed.setup("cpu")
files.set_writer(dist.is_main)
path = str(tiny_random_path())
model = load_model(path, device="cpu", dtype="float32")
examples = [sft.NLLExample(tuple(range(10 + i, 14 + 2 * i)), tuple(range(30, 32 + i))) for i in range(8)]
with trainable(model, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0), sharded=dist.sharded, seed=5) as m:
    sft.train_nll(m, examples, TrainConfig(lr=1e-2, batch_size=4), Job(
        pad_id=0, seed=5, accelerator=dist.accelerator, show_progress=False, checkpoint_dir=sys.argv[1],
        tokenizer=load_tokenizer(path)))
if not dist.sharded:
    torch.save(model.state_dict(), os.path.join(sys.argv[1], "merged.pt"))
dist.barrier()
'''


@pytest.mark.parametrize("launcher", ["fsdp", "zero3"])
def test_lora_under_sharding_exports_the_merged_full_model(tmp_path, launcher):
    """LoRA trained by two FSDP or ZeRO-3 processes: the export is a whole model folder (weights with the adapter merged on the
    gathered weights, tokenizer) equal to a one-process LoRA training merged in memory, and it loads and generates."""
    import torch

    from sgpo.generation.engine import Request, Settings, generate
    from sgpo.models.loading import load_model, load_tokenizer, tiny_random_path

    script = tmp_path / "lora.py"
    script.write_text(LORA)
    (tmp_path / "one").mkdir()
    run([sys.executable, str(script), str(tmp_path / "one")])
    run([sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS[launcher], "--num_processes", "2",
         "--mixed_precision", "no", str(script), str(tmp_path / "two")])
    export = tmp_path / "two" / "weights"  # written by sharded training only
    assert (export / "model.safetensors").exists() and not (tmp_path / "one" / "weights").exists()
    assert not (export / "adapter_config.json").exists()
    want, got = torch.load(tmp_path / "one" / "merged.pt"), load_weights(export)
    assert set(got) <= set(want) and len(got) >= len(want) - 1  # a tied LM head is saved once
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)
    base = load_weights(tiny_random_path())
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # the adapter was merged in
    model, tok = load_model(str(export), device="cpu", dtype="float32"), load_tokenizer(str(export))
    gens = generate(model, tok, [Request(tuple(tok.encode("Hi")), seed=1)], Settings(6, 0.0, 1.0, 1))
    assert len(gens[0].token_ids) > 0


EXPORT = '''
import json, os, sys, torch
from torch.utils._python_dispatch import TorchDispatchMode
from sgpo.core import distributed
from sgpo.core import files
from sgpo.config.schema import TrainConfig
from sgpo.models.loading import load_model, load_tokenizer, tiny_random_path
from sgpo.training import loop, sft
from sgpo.training.loop import Job

COPIES = {torch.ops.aten.clone.default, torch.ops.aten._to_copy.default}


class CopiedBytes(TorchDispatchMode):  # the bytes of every tensor copy made while the export runs
    bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in COPIES and isinstance(out, torch.Tensor):
            CopiedBytes.bytes += out.numel() * out.element_size()
        return out


real = loop._export


def counted(*args, **kwargs):
    with CopiedBytes():
        return real(*args, **kwargs)


loop._export = counted
dist = distributed.setup("cpu")
files.set_writer(dist.is_main)
path = str(tiny_random_path())
model = load_model(path, device="cpu", dtype=sys.argv[2])
size = sum(p.numel() * p.element_size() for p in model.parameters())
examples = [sft.NLLExample(tuple(range(10 + i, 14 + 2 * i)), tuple(range(30, 32 + i))) for i in range(8)]
sft.train_nll(model, examples, TrainConfig(lr=1e-2, batch_size=4), Job(
    pad_id=0, seed=5, accelerator=dist.accelerator, show_progress=False, checkpoint_dir=sys.argv[1],
    tokenizer=load_tokenizer(path)))
with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as f:
    json.dump({"copied": CopiedBytes.bytes, "model_bytes": size}, f)
dist.barrier()
'''


def export_dtypes(folder: Path) -> set[str]:
    """The dtypes of the tensors in a saved model folder, read from the safetensors header."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_an_fsdp_export_is_in_the_model_s_dtype(tmp_path):
    """bf16 weights trained by FSDP2 under mixed precision bf16 (accelerate upcasts the shards to fp32, and gathers
    them so) are exported in bf16: the dtype the model was loaded in, what every later load and vLLM read. (DeepSpeed's
    bf16 mode is not run on CPU processes: sgpo sets it up there without mixed precision.)"""
    script = tmp_path / "export.py"
    script.write_text(EXPORT)
    run([sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS["fsdp"], "--num_processes", "2",
         "--mixed_precision", "bf16", str(script), str(tmp_path / "out"), "bfloat16"])
    assert export_dtypes(tmp_path / "out" / "weights") == {"BF16"}


def test_a_zero2_export_is_copied_on_the_main_process_only(tmp_path):
    """Under ZeRO-2 every process holds the whole weights: only the main process, which saves them, copies them
    (the others would each hold a CPU copy of the model for nothing: 16 GB per process at 8B)."""
    script = tmp_path / "export.py"
    script.write_text(EXPORT)
    run([sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS["zero2"], "--num_processes", "2",
         "--mixed_precision", "no", str(script), str(tmp_path / "out"), "float32"])
    main, other = (json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["copied"] >= main["model_bytes"] > 0  # the main process copied the weights it saved
    assert other["copied"] == 0
    assert export_dtypes(tmp_path / "out" / "weights") == {"F32"}


LOADS = '''
import json, os, sys
from sgpo.cli import main as cli
from sgpo.models import policy

loaded = []
real = policy.Policy.load
policy.Policy.load = lambda self, path: loaded.append(str(path)) or real(self, path)
code = cli.main(sys.argv[2:])
with open(os.path.join(sys.argv[1], f"loads{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump(loaded, f)
sys.exit(code)
'''


def test_synpo_s_sharded_improver_export_is_saved_without_a_load_on_any_process(tmp_path):
    """SynPO's separate improver, trained by two FSDP processes: its export is the saved improver model, put in place
    by the main process; no process loads the export to save it (every process did, for the main one to save it)."""
    data = write_data(tmp_path / "train.jsonl")
    script = tmp_path / "loads.py"
    script.write_text(LOADS)
    out = tmp_path / "synpo"
    p = run([sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS["fsdp"], "--num_processes", "2",
             "--mixed_precision", "no", str(script), str(tmp_path), *command(out, data)[2:], "--method", "synpo"])
    assert "training with FSDP on CPU processes" in p.stderr
    loads = [json.loads((tmp_path / f"loads{r}.json").read_text()) for r in (0, 1)]
    assert all(loads) and not [x for ranks in loads for x in ranks if "separate_improver" in x], loads
    improver = out / "prepare" / "improver_model"
    assert (improver / "model.safetensors").exists() and (improver / "tokenizer_config.json").exists()
    assert json.loads((out / "manifest.json").read_text())["stages"]["round_1"]["status"] == "done"
