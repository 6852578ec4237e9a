import torch

from sgpo.config.schema import ModelConfig, TrainConfig
from sgpo.training.adapters import trainable
from sgpo.training.loop import Job
from sgpo.training.sft import NLLExample, train_nll


def test_lora_trains_only_the_adapter_and_merges_into_the_weights(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ex = [NLLExample((20, 21, 22), (30, 31, 2)), NLLExample((23, 24), (32, 33, 34, 2))]
    x = torch.tensor([[20, 21, 22]])
    with torch.no_grad():
        ref = tiny_model(input_ids=x).logits
    with trainable(tiny_model, ModelConfig(lora_r=4, lora_alpha=8)) as m:
        assert m is not tiny_model
        n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert 0 < n_train < sum(p.numel() for p in tiny_model.parameters()) / 4
        train_nll(m, ex, TrainConfig(batch_size=2, epochs=3, lr=5e-2), Job(0, 0))
        with torch.no_grad(), m.disable_adapter():  # adapter disabled = the stage-start model, after training too
            assert torch.allclose(m(input_ids=x).logits, ref, atol=1e-6)
    after = tiny_model.state_dict()
    assert set(after) == set(before)  # a plain model again, no adapter keys
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)
    with torch.no_grad():
        assert not torch.allclose(tiny_model(input_ids=x).logits, ref)


def test_gradient_checkpointing_is_switched_back_off(tiny_model):
    with trainable(tiny_model, ModelConfig(gradient_checkpointing=True)) as m:
        assert m.is_gradient_checkpointing
        train_nll(m, [NLLExample((20, 21), (30, 2))], TrainConfig(batch_size=1, epochs=1, lr=1e-3), Job(0, 0))
    assert not tiny_model.is_gradient_checkpointing and tiny_model.config.use_cache
