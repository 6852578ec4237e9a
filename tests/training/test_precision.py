"""Training bf16 weights keeps fp32 master copies: updates far below bf16's spacing (DPO's 5e-7, SFT's 2e-5 near
|w| = 0.02) accumulate instead of rounding away, so a bf16 run moves as many weights as an fp32 run."""
import copy

import pytest
import torch

from sgpo.config.schema import DPOConfig, TrainConfig
from sgpo.training.dpo import TokenPair, reference_logps, train_dpo
from sgpo.training.loop import Job, MasterAdamW, make_optimizer
from sgpo.training.sft import NLLExample, train_nll


def changed_at_bf16(before: dict, model) -> float:
    """The share of weights whose bf16 value moved."""
    n = moved = 0
    for k, v in model.state_dict().items():
        a, b = before[k].to(torch.bfloat16), v.detach().to(torch.bfloat16)
        n += a.numel()
        moved += (a != b).sum().item()
    return moved / n


def train(model, how: str):
    torch.manual_seed(0)
    if how == "nll":
        examples = [NLLExample(tuple(range(10 + i, 20 + i)), tuple(range(30 + i, 38 + i))) for i in range(8)]
        train_nll(model, examples, TrainConfig(lr=1e-5, batch_size=4, epochs=5), Job(pad_id=0, seed=0,
                                                                                        show_progress=False))
    else:
        pairs = [TokenPair([20 + i, 21, 22], [30, 31, 32 + i, 2], [40 + i, 41, 2]) for i in range(8)]
        reference_logps(model, pairs, pad_id=0, show_progress=False)
        train_dpo(model, pairs, DPOConfig(lr=1e-5, batch_size=4, epochs=5), Job(pad_id=0, seed=0,
                                                                                  show_progress=False))


@pytest.mark.parametrize("how", ["nll", "dpo"])
def test_bf16_training_moves_as_many_weights_as_fp32(tiny_model, how):
    fp32 = tiny_model
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    start = {k: v.detach().clone() for k, v in fp32.state_dict().items()}
    train(fp32, how)
    train(bf16, how)
    full, low = changed_at_bf16(start, fp32), changed_at_bf16(start, bf16)
    assert full > 0.3, full  # the fp32 run moved most weights at bf16 resolution
    assert low >= 0.8 * full, (low, full)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())  # the model itself stays bf16


def test_masters_travel_with_the_optimizer_state(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    opt = make_optimizer(model, 1e-3)
    assert isinstance(opt, MasterAdamW)
    assert type(make_optimizer(tiny_model, 1e-3)) is torch.optim.AdamW  # fp32 weights: plain AdamW
    assert type(make_optimizer(model, 1e-3, masters=False)) is torch.optim.AdamW  # the launcher keeps masters
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    saved = opt.state_dict()
    other = copy.deepcopy(tiny_model).to(torch.bfloat16)
    restored = make_optimizer(other, 1e-3)
    restored.load_state_dict(saved)
    for a, b in zip(opt.masters, restored.masters):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_the_reference_pass_keeps_to_its_position_budget(tiny_model, monkeypatch):
    """A reference batch whose padded rows exceed the budget is scored in parts, with the values of the whole batch;
    on an accelerator the budget applies by default (on a CPU the pass is not cut, training is)."""
    from sgpo.training import batching, dpo

    pairs = [TokenPair([20 + i, 21, 22][: 1 + i % 3], [30, 31, 32 + i, 2][: 2 + i % 3], [40 + i, 41, 2])
             for i in range(10)]
    reference_logps(tiny_model, pairs, pad_id=0, batch_size=8, show_progress=False)
    whole = [(p.ref_chosen, p.ref_rejected) for p in pairs]
    sizes = []
    real = dpo.pair_logps
    monkeypatch.setattr(dpo, "pair_logps", lambda m, b: sizes.append(b.input_ids.numel()) or real(m, b))
    monkeypatch.setattr(dpo, "default_max_positions", lambda model, training=True: 20)
    reference_logps(tiny_model, pairs, pad_id=0, batch_size=8, show_progress=False)
    assert len(sizes) > 2 and max(sizes) <= 20
    for (c, r), p in zip(whole, pairs):
        assert p.ref_chosen == pytest.approx(c, abs=1e-4) and p.ref_rejected == pytest.approx(r, abs=1e-4)
    on_gpu = torch.nn.Linear(2, 2, device="meta")  # any device but the CPU
    assert batching.default_max_positions(on_gpu, training=False) == batching.GPU_MAX_POSITIONS
    assert batching.default_max_positions(on_gpu) == batching.GPU_MAX_POSITIONS
    assert batching.default_max_positions(tiny_model, training=False) is None
    assert batching.default_max_positions(tiny_model) == batching.CPU_MAX_POSITIONS


def test_sharded_training_refuses_low_precision_weights_without_mixed_precision(tiny_model):
    """FSDP and DeepSpeed keep fp32 masters only under mixed precision: bf16 weights with ``mixed_precision: no``
    would update in bf16, so the run stops with what to do."""
    from types import SimpleNamespace

    from sgpo.core.files import RunError
    from sgpo.training.loop import check_sharded_precision

    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    with pytest.raises(RunError, match="mixed_precision bf16"):
        check_sharded_precision(SimpleNamespace(mixed_precision="no"), bf16)
    check_sharded_precision(SimpleNamespace(mixed_precision="bf16"), bf16)
    check_sharded_precision(SimpleNamespace(mixed_precision="no"), tiny_model)  # fp32 weights: nothing to lose
