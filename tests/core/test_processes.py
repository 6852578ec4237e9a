"""What several processes share out and gather, run with two processes over gloo: the judges judge on the main process
only and every process gets the same verdicts, even from a judge that answers differently each time it is asked (an
API judge at temperature > 0, a failing one); the reference pass deals its batches out and gathers the values a single
process computes; micro-batched training accumulates the whole batch's gradient, and ranks whose slices split into
different numbers of micro-batches make the same passes (DDP and FSDP2)."""
import json
import subprocess
import sys
import textwrap

import pytest

from cli_runs import REPO, cli_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]  # two processes over gloo

SCRIPT = textwrap.dedent('''
    import json, os, random, sys
    from sgpo.core import distributed
    from sgpo.eval.base import Judge
    from sgpo.eval.judges import MainProcessJudge

    built = []

    class Moody(Judge):  # a judge that answers differently in every process
        def __init__(self, spec):
            self.spec = self.name = spec
            built.append(os.getpid())
        def prefer(self, prompts, a, b, references=None):
            if prompts and prompts[0] == "fail":
                raise ConnectionError("the judge's server went away")
            return [random.Random(os.getpid()).random() for _ in prompts]

    dist = distributed.setup("cpu")
    judge = MainProcessJudge("moody", dist, Moody)
    verdicts = judge.prefer(["a", "b", "c"], ["x"] * 3, ["y"] * 3)
    try:
        judge.prefer(["fail"], ["x"], ["y"])
        failed = None
    except Exception as e:
        failed = str(e)
    out = {"verdicts": verdicts, "built": len(built), "failed": failed}
    with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    import torch.distributed
    torch.distributed.destroy_process_group()
''')


def two_processes(tmp_path, script: str, *args: str, timeout: float = 300) -> None:
    """``script`` run by two processes (torchrun) with ``tmp_path`` (and ``args``) as its arguments; still running
    after ``timeout`` seconds (a hang) is a failure."""
    path = tmp_path / "script.py"
    path.write_text(script)
    try:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(path),
                            str(tmp_path), *args], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the two processes were still running after {timeout}s: {str(e.stderr or '')[-3000:]}")
    assert p.returncode == 0, p.stderr[-3000:]


def test_every_process_gets_the_main_process_verdicts(tmp_path):
    two_processes(tmp_path, SCRIPT)
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["verdicts"] == other["verdicts"] and len(main["verdicts"]) == 3
    assert (main["built"], other["built"]) == (1, 0)  # the judge exists on the main process only
    assert "server went away" in main["failed"] and "server went away" in other["failed"]


REFERENCE = textwrap.dedent('''
    import json, os, sys
    import torch
    from sgpo.core import distributed
    from sgpo.models.loading import load_model, tiny_random_path
    from sgpo.training import dpo
    from sgpo.training.dpo import TokenPair, reference_logps

    calls = []
    real = dpo.pair_logps
    dpo.pair_logps = lambda model, batch: calls.append(batch.n_pairs) or real(model, batch)
    dist = distributed.setup("cpu")
    model = load_model(str(tiny_random_path()), device="cpu", dtype="float32")
    pairs = [TokenPair([20 + i, 21, 22][: 1 + i % 3], [30, 31, 32 + i, 2][: 2 + i % 3], [40 + i, 41, 2])
             for i in range(10)]
    reference_logps(model, pairs, pad_id=0, batch_size=3, show_progress=False, dist=dist)
    with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as f:
        json.dump({"calls": calls, "ref": [[p.ref_chosen, p.ref_rejected] for p in pairs],
                   "threads": torch.get_num_threads()}, f)
    dist.barrier()
    import torch.distributed
    torch.distributed.destroy_process_group()
''')


def test_the_reference_pass_is_shared_out_and_gives_one_process_values(tmp_path, tiny_model):
    import torch

    from sgpo.training.dpo import TokenPair, reference_logps

    two_processes(tmp_path, REFERENCE)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    pairs = [TokenPair([20 + i, 21, 22][: 1 + i % 3], [30, 31, 32 + i, 2][: 2 + i % 3], [40 + i, 41, 2])
             for i in range(10)]
    threads = torch.get_num_threads()
    # with the workers' number of threads (torchrun gives each one): what is compared is the batches each process
    # scores, not how a matrix product splits its sums over however many cores this machine has
    torch.set_num_threads(ranks[0]["threads"])
    try:
        reference_logps(tiny_model, pairs, pad_id=0, batch_size=3, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    one = [[p.ref_chosen, p.ref_rejected] for p in pairs]
    assert ranks[0]["ref"] == ranks[1]["ref"] == one  # the very values of one process
    assert ranks[0]["calls"] == [3, 3] and ranks[1]["calls"] == [3, 1]  # batches 0, 2 and 1, 3 of the plan


TIMEOUT = textwrap.dedent('''
    import json, os, sys
    import torch
    from sgpo.core import distributed

    dist = distributed.setup("cpu", timeout_minutes=77)
    group = torch.distributed.distributed_c10d._get_default_group()
    minutes = group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60
    with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as f:
        json.dump({"minutes": minutes}, f)
    dist.barrier()
    torch.distributed.destroy_process_group()
''')


def test_the_configured_timeout_is_the_process_group_s(tmp_path):
    from sgpo.config.schema import Config

    assert Config().collective_timeout_minutes >= 60  # a rollout or a judge pass outlasts NCCL's 10 minutes
    two_processes(tmp_path, TIMEOUT)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["minutes"] for r in (0, 1)] == [77, 77]


ACCUMULATE = textwrap.dedent('''
    import os, sys
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from sgpo.core import distributed
    from sgpo.config.schema import TrainConfig
    from sgpo.models.loading import load_model, tiny_random_path
    from sgpo.training import sft
    from sgpo.training.loop import Job

    forwards, grads, names = [], {}, {}
    real = sft.collate
    sft.collate = lambda *a, **k: forwards.append(1) or real(*a, **k)

    def capture(opt, args, kwargs):  # what the (only) optimizer step is given: accumulated, synchronised, clipped
        if not grads:
            grads.update({names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]})

    register_optimizer_step_pre_hook(capture)
    dist = distributed.setup("cpu")
    examples = [sft.NLLExample(tuple(range(10 + i, 14 + 2 * i)), tuple(range(30, 32 + i))) for i in range(8)]
    out = {}
    for limit in (None, 12):  # whole slices, then slices cut into micro-batches of at most 12 positions
        model = load_model(str(tiny_random_path()), device="cpu", dtype="float32")
        for box in (names, grads, forwards):
            box.clear()
        names.update({id(p): n for n, p in model.named_parameters()})
        sft.train_nll(model, examples, TrainConfig(lr=1e-3, batch_size=8),
                      Job(pad_id=0, seed=0, accelerator=dist.accelerator, show_progress=False, max_positions=limit))
        out[str(limit)] = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "grads": dict(grads),
                           "forwards": len(forwards)}
    torch.save(out, os.path.join(sys.argv[1], f"rank{dist.rank}.pt"))
    if dist.active:
        dist.barrier()
        torch.distributed.destroy_process_group()
''')
ACCUMULATE_LR = 1e-3  # the script's learning rate
ACCUMULATE_POSITIONS = sum((4 + i) + (2 + i) for i in range(8))  # the script's examples: prompt + completion tokens
FP32_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which make_optimizer keeps


def same_gradient(got: dict, want: dict, positions: int = ACCUMULATE_POSITIONS) -> None:
    """Two fp32 gradients of the same loss summed in another order (micro-batches added one after another, other
    matrix shapes, an all-reduce): every entry is a sum over the batch's positions, whose rounding is bounded by
    eps × (number of terms) × the terms' magnitude. Entries cancel (a sum far smaller than its terms), so the bound is
    taken relative to the tensor's scale (its largest entry), not to each entry: atol = positions × eps × max|g|
    (the ACCUMULATE script: 104 × 1.2e-7 ≈ 1.2e-5 of the scale; measured: at most 32 eps on an AMD EPYC). A
    micro-batch's loss scaled wrongly by 1e-3 moves the gradient by 7.5 times that."""
    assert got.keys() == want.keys() and want
    import torch

    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=positions * FP32_EPS * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def same_adam_step(got: dict, want: dict, lr: float = ACCUMULATE_LR) -> None:
    """``got``, ``want``: a run's weights and gradients after its one AdamW step from the same start. That step moves a
    weight by lr·u(g), u(g) = g / (|g| + ε) (m̂ = g, v̂ = g² at step 1): Adam normalises the gradient away, so for an
    entry near ε (the tiny model has many) a rounding difference δ of the gradient becomes up to lr·δ/ε of the weight
    (8.4e-6 at lr 1e-3 on an AMD EPYC, against an atol of 1e-6 this test had). The weights may differ by what their
    gradients' difference makes of it, lr·|u(g₁) − u(g₂)|, plus a few fp32 roundings of the update (≤ lr) and of
    w − update (allowed: 16 eps × (lr + |w|); measured: at most 2.4)."""
    for name, g in want["grads"].items():
        u = lambda x: x.double() / (x.double().abs() + ADAM_EPS)  # noqa: E731
        w_got, w_want = got["weights"][name].double(), want["weights"][name].double()
        bound = lr * (u(got["grads"][name]) - u(g)).abs() + 16 * FP32_EPS * (lr + w_want.abs())
        excess = (w_got - w_want).abs() - bound
        assert (excess <= 0).all(), (name, float(excess.max()))


def test_micro_batches_accumulate_the_whole_batch_gradient_with_one_and_two_processes(tmp_path):
    """A process's slice cut into micro-batches (no gradient sync but for the last) accumulates the whole slice's
    gradient, with two processes as with one: the gradient the optimizer step is given is the whole batch's (to the
    rounding of another summation order), and the weights after the step differ only by what Adam makes of that."""
    import torch

    script = tmp_path / "accumulate.py"
    script.write_text(ACCUMULATE)
    (tmp_path / "one").mkdir()
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    two_processes(tmp_path, ACCUMULATE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["None"]["forwards"] == 1 and r["12"]["forwards"] > 1 for r in ranks + [one])  # micro-batches ran
    want = one["None"]
    for run in [one["12"]] + [r[k] for r in ranks for k in ("None", "12")]:
        same_gradient(run["grads"], want["grads"])
        same_adam_step(run, want)


SKEWED = textwrap.dedent('''
    import os, sys
    if sys.argv[2] == "fsdp":  # what accelerate launch sets for configs/accelerate/fsdp.yaml (without bf16)
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                          FSDP_RESHARD_AFTER_FORWARD="true", FSDP_OFFLOAD_PARAMS="false",
                          FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT", FSDP_CPU_RAM_EFFICIENT_LOADING="false",
                          FSDP_ACTIVATION_CHECKPOINTING="false")
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from sgpo.core import distributed
    from sgpo.config.schema import DPOConfig, TrainConfig
    from sgpo.models.loading import load_model, tiny_random_path
    from sgpo.training import dpo, sft
    from sgpo.training.loop import Job

    LENGTHS = (5, 5, 5, 5, 5, 12, 12, 40)  # rank 0 gets 5, 5, 5, 12 and rank 1 5, 5, 12, 40 of the sorted batch
    forwards, grads, reduces, current = [], {}, [], []
    for module, name in ((sft, "collate"), (dpo, "pair_batch")):  # one call per forward pass
        real = getattr(module, name)
        setattr(module, name, lambda *a, real=real, **k: forwards.append(1) or real(*a, **k))

    def full(t):  # a sharded (FSDP2) tensor gathered whole: a collective, every rank in the same order
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    def capture(opt, args, kwargs):  # what the (only) optimizer step is given: accumulated, synchronised, clipped
        if not grads:
            names = {id(p): n for n, p in current[0].named_parameters()}
            grads.update({names[id(p)]: full(p.grad) for g in opt.param_groups for p in g["params"]})

    register_optimizer_step_pre_hook(capture)
    dist = distributed.setup("cpu", timeout_minutes=1)  # a collective that waits longer than that: a hang
    if dist.active and not dist.sharded:  # count DDP's gradient all-reduces (one per bucket and synchronised pass)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        prepare = dist.accelerator.prepare

        def counted(*args):
            out = prepare(*args)
            out[0].register_comm_hook(None, lambda state, bucket: reduces.append(1) or allreduce_hook(state, bucket))
            return out

        dist.accelerator.prepare = counted


    def train(kind, limit):
        model = load_model(str(tiny_random_path()), device="cpu", dtype="float32")
        current[:] = [model]
        job = Job(pad_id=0, seed=0, accelerator=dist.accelerator, show_progress=False, max_positions=limit)
        if kind == "nll":
            examples = [sft.NLLExample(tuple(range(10 + i, 8 + i + n - i % 2)),  # n tokens, 2 or 3 of them completion
                                       tuple(range(300 + i, 302 + i + i % 2))) for i, n in enumerate(LENGTHS)]
            sft.train_nll(model, examples, TrainConfig(lr=1e-3, batch_size=8), job)
        else:  # dponll: the improver NLL term too, the longest pair's chosen side 12 tokens (rank 1: 18, rank 0: 8)
            nll = kind == "dponll"
            pairs = [dpo.TokenPair(list(range(10 + i, 6 + i + n)), [300 + i] * (11 if nll and n == 40 else 1) + [2],
                                   [400 + i, 2], improver_prompt_ids=list(range(50 + i, 55 + i)) if nll else None)
                     for i, n in enumerate(LENGTHS)]
            dpo.reference_logps(model, pairs, pad_id=0, show_progress=False, dist=dist)
            forwards.clear()  # the training's passes only
            metrics.update(dpo.train_dpo(model, pairs, DPOConfig(lr=1e-3, batch_size=8, improver_nll_coef=0.5), job))
        return model


    out, metrics = {}, {}
    for kind in ("nll", "dpo", "dponll"):
        for limit in (None, 24):  # whole slices; micro-batches of at most 24 positions: 2 passes on rank 0, 3 on 1
            for box in (forwards, grads, reduces, metrics):
                box.clear()
            model = train(kind, limit)
            out[f"{kind}{limit}"] = {"forwards": len(forwards), "reduces": len(reduces), "grads": dict(grads),
                                     "weights": {k: full(v) for k, v in model.state_dict().items()},
                                     "metrics": dict(metrics)}
    out["sharded"] = dist.sharded
    torch.save(out, os.path.join(sys.argv[1], f"rank{dist.rank}.pt"))
    if dist.active:
        dist.barrier()
        torch.distributed.destroy_process_group()
''')
SKEWED_POSITIONS = 5 * 5 + 2 * 12 + 40  # the positions of the script's batch (LENGTHS)


@pytest.mark.parametrize("launcher", ["ddp", "fsdp"])
def test_ranks_whose_slices_split_differently_make_the_same_passes(tmp_path, launcher):
    """Two ranks whose slices of a batch need 2 and 3 micro-batches (NLL and DPO alike) make the same number of
    forward/backward passes, the one with fewer padding with a zero-weight pass, so their collectives match: under
    DDP only the step's last pass all-reduces (as often as a whole slice's step: the forwards of the others run
    without gradient sync too), and the step's gradient and weights are a single process's to float tolerance — with
    DPO's improver NLL term too, whose tokens fall unevenly between the ranks."""
    import torch

    script = tmp_path / "skewed.py"
    script.write_text(SKEWED)
    (tmp_path / "one").mkdir()
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "one"], cwd=REPO, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    two_processes(tmp_path, SKEWED, launcher, timeout=240)  # a hang ends in a minute (the collective timeout)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["sharded"] for r in ranks] == [launcher == "fsdp"] * 2  # FSDP2 really ran (or DDP)
    for kind in ("nll", "dpo"):
        whole, micro = (f"{kind}None", f"{kind}24")
        assert [r[whole]["forwards"] for r in ranks] == [1, 1], kind
        assert [r[micro]["forwards"] for r in ranks] == [3, 3], kind  # rank 0: 2 micro-batches and a pad
        if launcher == "ddp":
            assert ranks[0][whole]["reduces"] == ranks[0][micro]["reduces"] > 0, kind
        for run in [r[k] for r in ranks for k in (whole, micro)]:
            same_gradient(run["grads"], one[whole]["grads"], SKEWED_POSITIONS)
            same_adam_step(run, one[whole], lr=1e-3)
    # The improver NLL term is a mean over the whole batch's chosen tokens, though the ranks hold 8 and 18 of them
    # for 4 pairs each: a rank weighing its own token mean by its share of the pairs moves the gradient off.
    for run in [one["dponll24"]] + [r[k] for r in ranks for k in ("dponllNone", "dponll24")]:
        same_gradient(run["grads"], one["dponllNone"]["grads"], SKEWED_POSITIONS + 76)  # + the NLL pass's 66 positions
        #                                                         and the DPO pass's 10 more chosen tokens
        same_adam_step(run, one["dponllNone"], lr=1e-3)
        for name in ("improver/nll", "nll/chosen"):
            assert run["metrics"][name] == pytest.approx(one["dponllNone"]["metrics"][name], rel=1e-5), name


CACHES = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    root = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    os.environ["SGPO_CACHE"] = str(root / f"cache{rank}")  # every "machine" a cache of its own
    from sgpo.core import distributed
    from sgpo.core import files
    from sgpo.config.schema import load
    from sgpo.data.records import Record
    from sgpo.eval.evaluator import Evaluator
    from sgpo.eval.held_out import answer_key
    from sgpo.models.loading import cache_dir, load_model, load_tokenizer
    from sgpo.generation.rollout import Sampler

    class Run:
        def path(self, *parts):
            return root / "run" / Path(*parts)  # the run directory, shared

    class Current:  # the run's current model, as the evaluator sees it
        run = Run()
        def generator_at(self, path):
            return load_model(path, device="cpu", dtype="float32")

    class Stages:
        current = "test"

    dist = distributed.setup("cpu", timeout_minutes=1)
    files.set_writer(dist.is_main)
    model_path = (root / "model.txt").read_text()
    cfg = load(None, ["generation.max_new_tokens=4", "generation.batch_size=2"])
    sampler = Sampler(load_tokenizer(model_path), cfg.generation, cfg.seed, cfg.data.max_prompt_tokens, dist=dist)
    ev = Evaluator(cfg, sampler, Current(), Stages(), make_judge=None, answer_cache=cache_dir() / "answers")
    records = {name: [Record(f"{name}{i}", (("user", f"question {name} {i}"),)) for i in range(5)] for name in "ab"}
    holder = {"a": 1, "b": 0}  # the answers to ``a`` are in rank 1's cache only, those to ``b`` in rank 0's only
    for name, recs in records.items():
        if rank == holder[name]:
            shard = cache_dir() / "answers" / f"{answer_key(model_path, sampler, cfg.data.max_prompt_tokens, recs)[:24]}.jsonl"
            shard.parent.mkdir(parents=True, exist_ok=True)
            shard.write_text("".join(json.dumps({"id": r.id, "text": f"cached on rank {rank}", "finished": True})
                                     + "\\n" for r in recs))
    dist.barrier()
    out = {name: {i: g.text for i, g in ev.answers(recs, name, model_path, cached=True).items()}
           for name, recs in records.items()}
    with open(root / f"rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.barrier()
    import torch.distributed
    torch.distributed.destroy_process_group()
''')


def test_processes_with_caches_of_their_own_agree_on_what_is_cached(tmp_path, tiny_path):
    """Every machine has a cache of its own (``~/.cache/sgpo``): whether the start model's test answers come from the
    cache is the main process's cache's answer, told to every process. A cache only another process has is not
    used (all generate, together); the main process's cached answers are every process's answers."""
    (tmp_path / "model.txt").write_text(tiny_path)
    two_processes(tmp_path, CACHES)
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main == other
    assert set(main["b"].values()) == {"cached on rank 0"}  # the main process's cache
    assert "cached on rank 1" not in main["a"].values() and len(main["a"]) == 5  # generated by both processes
    assert (tmp_path / "run" / "test" / "answers_a.jsonl").exists()
