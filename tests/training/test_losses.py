"""Preference losses: each against its formula, and sigmoid/ipo/hinge/norm against TRL 1.16's own code.

TRL 1.16 has no standalone loss function: the loss is inlined in ``DPOTrainer._compute_loss`` (trl/trainer/
dpo_trainer.py), which runs the model, sums per-token log-probs, reads the reference log-probs from the batch when
``precompute_ref_logps`` is set, and branches on ``self.loss_types``. We call that unbound method with a
``SimpleNamespace`` self (the attributes it reads) and a fake model whose per-token log-probs sum to the log-probs
we want, so TRL's real branch is what we compare to, no trainer or model built.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sgpo.training.losses import LOSSES, LogRatios, preference_loss

DT = torch.float64
POLICY_C = torch.tensor([-10.0, -20.5, -3.2, -40.0], dtype=DT)
POLICY_R = torch.tensor([-12.0, -18.0, -9.0, -35.5], dtype=DT)
REF_C = torch.tensor([-11.0, -19.0, -4.0, -42.0], dtype=DT)
REF_R = torch.tensor([-11.5, -19.5, -8.0, -36.0], dtype=DT)
LEN_C = torch.tensor([3.0, 5.0, 2.0, 7.0], dtype=DT)
LEN_R = torch.tensor([4.0, 1.0, 6.0, 3.0], dtype=DT)
# log-ratios: chosen [1.0, -1.5, 0.8, 2.0], rejected [-0.5, 1.5, -1.0, 0.5]; margins [1.5, -3.0, 1.8, 1.5]


def ratios(chosen_len=LEN_C, rejected_len=LEN_R, requires_grad=False):
    c = (POLICY_C - REF_C).clone().requires_grad_(requires_grad)
    return LogRatios(c, POLICY_R - REF_R, chosen_len, rejected_len)


def expected(name, beta):
    c, r = POLICY_C - REF_C, POLICY_R - REF_R
    ca, ra = c / LEN_C, r / LEN_R
    return {"sigmoid": -F.logsigmoid(beta * (c - r)), "hinge": torch.relu(1 - beta * (c - r)),
            "ipo": (ca - ra - 1 / (2 * beta)) ** 2, "norm": -F.logsigmoid(beta * (ca - ra))}[name]


@pytest.mark.parametrize("beta", [0.1, 0.5, 5.0])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "norm"])
def test_each_loss_matches_its_formula(name, beta):
    per_pair = LOSSES.get(name)(ratios(), beta)
    assert per_pair.shape == (4,)
    torch.testing.assert_close(per_pair, expected(name, beta), atol=1e-6, rtol=0)
    loss, metrics = preference_loss(name, ratios(), beta)
    torch.testing.assert_close(loss, expected(name, beta).mean(), atol=1e-6, rtol=0)
    assert metrics["loss"] == loss


def trl_loss(loss_type, beta):
    """TRL 1.16 ``DPOTrainer._compute_loss`` on our batch: rows [chosen..., rejected...], one prompt token then the
    completion; the fake model puts each sequence's log-prob evenly over its completion positions (TRL sums
    ``log_probs`` over all positions, which the real fused head zeroes outside the completion)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    lengths = torch.cat([LEN_C, LEN_R]).long()
    logps = torch.cat([POLICY_C, POLICY_R])
    width = int(lengths.max()) + 1
    completion_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, 1:1 + n] = 1
    shift_mask = completion_mask[:, 1:].to(DT)
    per_token = shift_mask * (logps / lengths.to(DT)).unsqueeze(1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(shift_mask).bool())
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    self = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": REF_C, "ref_rejected_logps": REF_R}
    loss = DPOTrainer._compute_loss(self, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, self._metrics["train"]


@pytest.mark.parametrize("beta", [0.1, 0.5, 5.0])
@pytest.mark.parametrize("ours, theirs", [("sigmoid", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge"),
                                          ("norm", "sigmoid_norm")])
def test_matches_trl(ours, theirs, beta):
    """ipo in TRL 1.16 is length-averaged (c/|c| - r/|r|); ``sigmoid_norm`` is TRL's name for dpo_norm."""
    ref_loss, trl_metrics = trl_loss(theirs, beta)
    loss, metrics = preference_loss(ours, ratios(), beta)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key][0], abs=1e-5), key


def test_default_sigmoid_matches_trl_default():
    import dataclasses

    from trl import DPOConfig

    # read the field's default (instantiating DPOConfig on a CPU-only machine fails on its bf16 default)
    default = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").default_factory()
    assert default == ["sigmoid"]
    torch.testing.assert_close(preference_loss("sigmoid", ratios(), 0.1)[0], trl_loss(default[0], 0.1)[0],
                               atol=1e-5, rtol=0)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as err:
        preference_loss("nope", ratios(), 0.1)
    assert all(name in str(err.value) for name in ("sigmoid", "ipo", "hinge", "norm"))


def test_metrics_keys_values_and_detached():
    _, metrics = preference_loss("ipo", ratios(requires_grad=True), 0.5)
    assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert not any(v.requires_grad for v in metrics.values())
    c, r = 0.5 * (POLICY_C - REF_C), 0.5 * (POLICY_R - REF_R)  # summed log-ratios, even for ipo
    torch.testing.assert_close(metrics["rewards/chosen"], c.mean())
    torch.testing.assert_close(metrics["rewards/margins"], (c - r).mean())
    assert metrics["rewards/accuracies"].item() == 0.75


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "norm"])
def test_gradients_flow(name):
    r = ratios(requires_grad=True)
    loss, _ = preference_loss(name, r, 0.1)
    loss.backward()
    assert r.chosen.grad is not None and r.chosen.grad.abs().sum() > 0


def test_norm_vs_sigmoid():
    assert not torch.allclose(LOSSES.get("norm")(ratios(), 0.5), LOSSES.get("sigmoid")(ratios(), 0.5))
    ones = torch.ones(4, dtype=DT)
    torch.testing.assert_close(LOSSES.get("norm")(ratios(ones, ones), 0.5), LOSSES.get("sigmoid")(ratios(), 0.5))
    # equal lengths L: the length-normalised loss is the sigmoid loss with beta / L
    sevens = 7 * ones
    torch.testing.assert_close(LOSSES.get("norm")(ratios(sevens, sevens), 0.5),
                               LOSSES.get("sigmoid")(ratios(), 0.5 / 7))
