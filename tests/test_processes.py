"""What several processes share out and gather, run with two processes over gloo: the judges judge on the main process
only and every process gets the same verdicts, even from a judge that answers differently each time it is asked (an
API judge at temperature > 0, a failing one); the reference pass deals its batches out and gathers the values a single
process computes."""
import json
import subprocess
import sys
import textwrap

import pytest

from test_resume import REPO, cli_env

pytestmark = pytest.mark.slow  # two processes over gloo

SCRIPT = textwrap.dedent('''
    import json, os, random, sys
    from sgpo import distributed
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


def two_processes(tmp_path, script: str) -> None:
    """``script`` run by two processes (torchrun) with ``tmp_path`` as its argument."""
    path = tmp_path / "script.py"
    path.write_text(script)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(path),
                        str(tmp_path)], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def test_every_process_gets_the_main_process_verdicts(tmp_path):
    two_processes(tmp_path, SCRIPT)
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["verdicts"] == other["verdicts"] and len(main["verdicts"]) == 3
    assert (main["built"], other["built"]) == (1, 0)  # the judge exists on the main process only
    assert "server went away" in main["failed"] and "server went away" in other["failed"]


REFERENCE = textwrap.dedent('''
    import json, os, sys
    from sgpo import distributed
    from sgpo.models import load_model, tiny_random_path
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
        json.dump({"calls": calls, "ref": [[p.ref_chosen, p.ref_rejected] for p in pairs]}, f)
    dist.barrier()
    import torch.distributed
    torch.distributed.destroy_process_group()
''')


def test_the_reference_pass_is_shared_out_and_gives_one_process_values(tmp_path, tiny_model):
    from sgpo.training.dpo import TokenPair, reference_logps

    two_processes(tmp_path, REFERENCE)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    pairs = [TokenPair([20 + i, 21, 22][: 1 + i % 3], [30, 31, 32 + i, 2][: 2 + i % 3], [40 + i, 41, 2])
             for i in range(10)]
    reference_logps(tiny_model, pairs, pad_id=0, batch_size=3, show_progress=False)
    one = [[p.ref_chosen, p.ref_rejected] for p in pairs]
    assert ranks[0]["ref"] == ranks[1]["ref"] == one  # the very values of one process
    assert ranks[0]["calls"] == [3, 3] and ranks[1]["calls"] == [3, 1]  # batches 0, 2 and 1, 3 of the plan


TIMEOUT = textwrap.dedent('''
    import json, os, sys
    import torch
    from sgpo import distributed

    dist = distributed.setup("cpu", timeout_minutes=77)
    group = torch.distributed.distributed_c10d._get_default_group()
    minutes = group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60
    with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as f:
        json.dump({"minutes": minutes}, f)
    dist.barrier()
    torch.distributed.destroy_process_group()
''')


def test_the_configured_timeout_is_the_process_group_s(tmp_path):
    from sgpo.config import Config

    assert Config().collective_timeout_minutes >= 60  # a rollout or a judge pass outlasts NCCL's 10 minutes
    two_processes(tmp_path, TIMEOUT)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["minutes"] for r in (0, 1)] == [77, 77]


ACCUMULATE = textwrap.dedent('''
    import os, sys
    import torch
    from sgpo import distributed
    from sgpo.config import TrainConfig
    from sgpo.models import load_model, tiny_random_path
    from sgpo.training import sft
    from sgpo.training.loop import Job

    forwards = []
    real = sft.collate
    sft.collate = lambda *a, **k: forwards.append(1) or real(*a, **k)
    dist = distributed.setup("cpu")
    examples = [sft.NLLExample(tuple(range(10 + i, 14 + 2 * i)), tuple(range(30, 32 + i))) for i in range(8)]
    out = {}
    for limit in (None, 12):  # whole slices, then slices cut into micro-batches of at most 12 positions
        model = load_model(str(tiny_random_path()), device="cpu", dtype="float32")
        forwards.clear()
        sft.train_nll(model, examples, TrainConfig(lr=1e-3, batch_size=8),
                      Job(pad_id=0, seed=0, accelerator=dist.accelerator, show_progress=False, max_positions=limit))
        out[str(limit)] = {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "forwards": len(forwards)}
    torch.save(out, os.path.join(sys.argv[1], f"rank{dist.rank}.pt"))
    dist.barrier()
    torch.distributed.destroy_process_group()
''')


def test_micro_batches_accumulate_the_whole_batch_gradient_with_one_and_two_processes(tmp_path):
    """A process's slice cut into micro-batches (backward without gradient sync but the last) trains exactly as the
    whole slice does, with two processes as with one."""
    import torch

    from sgpo.config import TrainConfig
    from sgpo.models import load_model, tiny_random_path
    from sgpo.training.loop import Job
    from sgpo.training.sft import NLLExample, train_nll

    examples = [NLLExample(tuple(range(10 + i, 14 + 2 * i)), tuple(range(30, 32 + i))) for i in range(8)]
    one = {}
    for limit in (None, 12):
        model = load_model(str(tiny_random_path()), device="cpu", dtype="float32")
        train_nll(model, examples, TrainConfig(lr=1e-3, batch_size=8), Job(pad_id=0, seed=0, show_progress=False,
                                                                           max_positions=limit))
        one[str(limit)] = model.state_dict()
    two_processes(tmp_path, ACCUMULATE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["None"]["forwards"] == 1 and r["12"]["forwards"] > 1 for r in ranks)  # micro-batches really ran
    for name, want in one["None"].items():
        torch.testing.assert_close(one["12"][name], want, rtol=0, atol=1e-6, msg=name)  # one process: exact-ish
        for r in ranks:  # two processes: the same micro-batched or not, and one process's to float tolerance
            torch.testing.assert_close(r["12"]["weights"][name], r["None"]["weights"][name], rtol=0, atol=1e-6)
            torch.testing.assert_close(r["12"]["weights"][name], want, rtol=1e-3, atol=1e-5, msg=name)
