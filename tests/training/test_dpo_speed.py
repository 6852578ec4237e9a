"""The fast DPO path computes the same thing as the plain one, and as TRL's DPOTrainer, on a fixed batch.

* The packed layout (one row per pair, the prompt computed once, rejected tokens masked from the chosen ones) and the
  stacked layout (chosen and rejected as separate sequences) give the log-probabilities of separate, unpadded
  ``prompt + response`` forwards (float64: to 1e-9), and the same DPO loss and gradients (float32: loss to 1e-5).
* TRL's ``DPOTrainer`` tokenises the same pairs to the same ids, and its loss on the same batch (policy ≠ reference)
  equals ours to 1e-5.
* The reference pass: at the start of training the policy is the reference, so the first loss is log 2; a PEFT model's
  reference is the model with its adapter disabled; training refuses pairs without reference log-probs.
"""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from sgpo.models import templates
from sgpo.models.loading import TINY_RANDOM, load_model, load_tokenizer
from sgpo.training.batching import collate_pairs, pair_logps
from sgpo.config.schema import DPOConfig
from sgpo.training.dpo import TokenPair, dpo_step, pair_batch, reference_logps, resolve_layout, train_dpo
from sgpo.training.loop import Job
from sgpo.training.losses import LogRatios, preference_loss

BETA = 0.1
TEXTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I think it is Lyon, maybe."),
    ("Write a haiku about autumn leaves falling.",
     "Red leaves drift and fall,\nwhispering to the cold ground,\nautumn says goodbye.", "Leaves."),
    ("Explain in two sentences why the sky is blue, for a child who keeps asking.",
     "Sunlight is made of many colours.", "Because air scatters blue light more than red light, so blue light "
     "comes at us from every direction of the sky, which looks blue."),
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_RANDOM)


@pytest.fixture(scope="module")
def ref_model():
    return load_model(TINY_RANDOM, device="cpu", dtype="float32").eval()


def _policy(ref, seed: int = 1, scale: float = 0.05):
    """A policy that differs from the reference, so the DPO loss is not trivially log 2."""
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return policy


def _token_pairs(tok) -> list[TokenPair]:
    return [TokenPair(templates.policy_ids(tok, (("user", q),)), templates.completion_ids(tok, c),
                      templates.completion_ids(tok, r)) for q, c, r in TEXTS]


def _separate_logps(model, pairs: list[TokenPair]) -> torch.Tensor:
    """Each response in its own unpadded forward, full logits: the definition the fast paths must match."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            resp = getattr(p, side)
            logits = model(input_ids=torch.tensor([p.prompt_ids + resp])).logits[0].double()
            lp = logits.log_softmax(-1)
            out.append(sum(lp[len(p.prompt_ids) - 1 + j, t] for j, t in enumerate(resp)))
    return torch.stack(out)


def _triples(pairs):
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]


def test_layouts_match_separate_forwards_in_float64(tok, ref_model):
    model = _policy(ref_model).double()
    pairs = _token_pairs(tok)
    with torch.no_grad():
        want = _separate_logps(model, pairs)
        for layout in ("packed", "stacked"):
            got = pair_logps(model, collate_pairs(_triples(pairs), tok.pad_token_id, layout))
            assert torch.allclose(got, want, rtol=0, atol=1e-9), (layout, (got - want).abs().max())


def test_packed_row_hides_chosen_from_rejected(tok, ref_model):
    """Changing the chosen tokens must not change the rejected log-prob (and vice versa for the prompt)."""
    model = _policy(ref_model).double()
    p = _token_pairs(tok)[1]
    other = TokenPair(p.prompt_ids, list(reversed(p.chosen_ids)) + [5, 6, 7], p.rejected_ids)
    with torch.no_grad():
        a = pair_logps(model, collate_pairs(_triples([p, other]), tok.pad_token_id, "packed"))
    assert abs(float(a[2] - a[3])) < 1e-9  # same prompt and rejected response, different chosen
    assert abs(float(a[0] - a[1])) > 1e-3


def _our_loss(policy, pairs, pad_id, layout):
    policy.zero_grad(set_to_none=True)
    loss, metrics = dpo_step(pad_id, DPOConfig(beta=BETA), layout=layout)(policy, pairs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return loss.detach(), metrics, grads


def test_same_loss_and_gradients_packed_vs_stacked(tok, ref_model):
    pairs = _token_pairs(tok)
    reference_logps(ref_model, pairs, pad_id=tok.pad_token_id, batch_size=2, show_progress=False)
    policy = _policy(ref_model).train()
    loss_p, m_p, g_p = _our_loss(policy, pairs, tok.pad_token_id, "packed")
    loss_s, m_s, g_s = _our_loss(policy, pairs, tok.pad_token_id, "stacked")
    assert abs(float(loss_p) - math.log(2)) > 1e-3  # a real loss, not the trivial log 2
    assert abs(float(loss_p - loss_s)) < 1e-5
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(m_p[k] - m_s[k])) < 1e-5, k
    assert g_p.keys() == g_s.keys()
    for name in g_p:
        scale = g_s[name].abs().max().clamp(min=1e-6)
        assert float((g_p[name] - g_s[name]).abs().max() / scale) < 1e-3, name


def test_reference_layout_does_not_matter(tok, ref_model):
    a, b = _token_pairs(tok), _token_pairs(tok)
    reference_logps(ref_model, a, pad_id=tok.pad_token_id, batch_size=3, show_progress=False, layout="packed")
    reference_logps(ref_model, b, pad_id=tok.pad_token_id, batch_size=1, show_progress=False, layout="stacked")
    for x, y in zip(a, b):
        assert x.ref_chosen == pytest.approx(y.ref_chosen, abs=1e-4)
        assert x.ref_rejected == pytest.approx(y.ref_rejected, abs=1e-4)
        assert isinstance(x.ref_chosen, float)


def test_same_loss_as_trl(tok, ref_model, tmp_path):
    """TRL's DPOTrainer on the same pairs: same token ids, same loss to 1e-5 (policy ≠ reference)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    pairs = _token_pairs(tok)
    reference_logps(ref_model, pairs, pad_id=tok.pad_token_id, batch_size=8, show_progress=False)
    policy = _policy(ref_model).train()
    ours, _, _ = _our_loss(policy, pairs, tok.pad_token_id, "packed")

    eos = tok.eos_token
    rows = [{"prompt": tok.apply_chat_template(templates.policy_messages((("user", q),)), add_generation_prompt=True,
                                               tokenize=False),
             "chosen": c + eos, "rejected": r + eos} for q, c, r in TEXTS]
    config = trl.DPOConfig(output_dir=str(tmp_path), beta=BETA, bf16=False, fp16=False, gradient_checkpointing=False,
                           use_cpu=True, report_to="none", max_length=None, per_device_train_batch_size=len(rows))
    trainer = trl.DPOTrainer(model=policy, ref_model=copy.deepcopy(ref_model), args=config,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    ds = trainer.train_dataset
    examples = [{"prompt_ids": ds[i]["prompt_ids"], "chosen_ids": ds[i]["chosen_ids"],
                 "rejected_ids": ds[i]["rejected_ids"]} for i in range(len(rows))]
    for ex, p in zip(examples, pairs):
        assert (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) == (p.prompt_ids, p.chosen_ids,
                                                                            p.rejected_ids)
    policy.train()
    with torch.no_grad():
        theirs = trainer.compute_loss(policy, trainer.data_collator(examples))
    assert abs(float(theirs) - float(ours)) < 1e-5, (float(theirs), float(ours))


def test_first_step_loss_is_log2_when_policy_is_reference(tok, ref_model):
    model = copy.deepcopy(ref_model)
    pairs = _token_pairs(tok)
    reference_logps(model, pairs, pad_id=tok.pad_token_id, show_progress=False)
    model.train()
    loss, metrics = dpo_step(tok.pad_token_id, DPOConfig(beta=BETA), layout=resolve_layout(model, pairs))(model, pairs)
    assert abs(float(loss.detach()) - math.log(2)) < 1e-6
    assert abs(float(metrics["rewards/margins"])) < 1e-5


def test_peft_reference_is_adapter_disabled(tok, ref_model):
    peft = pytest.importorskip("peft")
    base_pairs, lora_pairs = _token_pairs(tok), _token_pairs(tok)
    reference_logps(ref_model, base_pairs, pad_id=tok.pad_token_id, show_progress=False)
    lora = peft.get_peft_model(copy.deepcopy(ref_model),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))  # a non-zero adapter
    reference_logps(lora, lora_pairs, pad_id=tok.pad_token_id, show_progress=False)
    for a, b in zip(base_pairs, lora_pairs):
        assert a.ref_chosen == pytest.approx(b.ref_chosen, abs=1e-4)
        assert a.ref_rejected == pytest.approx(b.ref_rejected, abs=1e-4)
    # and training the adapter runs on the packed layout, moving only the adapter weights
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    out = train_dpo(lora, lora_pairs, DPOConfig(beta=BETA, batch_size=2, epochs=1, lr=1e-2),
                    Job(tok.pad_token_id, 0, show_progress=False))
    assert out["dpo/steps"] == 2 and math.isfinite(out["dpo/loss"])
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_train_dpo_needs_reference_logps(tok, ref_model):
    with pytest.raises(ValueError, match="reference log-probs"):
        train_dpo(copy.deepcopy(ref_model), _token_pairs(tok), DPOConfig(beta=BETA, batch_size=2, epochs=1, lr=1e-5),
                  Job(tok.pad_token_id, 0, show_progress=False))


def test_empty_response_scores_zero(tok, ref_model):
    p = _token_pairs(tok)[0]
    with torch.no_grad():
        got = pair_logps(ref_model, collate_pairs([(p.prompt_ids, p.chosen_ids, [])], tok.pad_token_id, "packed"))
        want = pair_logps(ref_model, collate_pairs([(p.prompt_ids, p.chosen_ids, p.rejected_ids)], tok.pad_token_id,
                                                   "packed"))
    assert float(got[1]) == 0.0
    assert float(got[0]) == pytest.approx(float(want[0]), abs=1e-4)


def test_random_pairs_packed_equals_stacked(ref_model):
    """Many random shapes in one batch (padding on every row): both layouts agree in float64."""
    model = copy.deepcopy(ref_model).double()
    rng = random.Random(0)
    triples = [([rng.randrange(10, 1000) for _ in range(rng.randrange(1, 40))],
                [rng.randrange(10, 1000) for _ in range(rng.randrange(1, 20))],
                [rng.randrange(10, 1000) for _ in range(rng.randrange(1, 20))]) for _ in range(6)]
    with torch.no_grad():
        a = pair_logps(model, collate_pairs(triples, 0, "packed"))
        b = pair_logps(model, collate_pairs(triples, 0, "stacked"))
    assert torch.allclose(a, b, rtol=0, atol=1e-9)


def test_dpo_loss_formula():
    one = torch.tensor([1.0])
    loss, m = preference_loss("sigmoid", LogRatios(torch.tensor([-1.0]) - torch.tensor([-2.0]),
                                                   torch.tensor([-3.0]) - torch.tensor([-2.0]), one, one), 0.5)
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert float(m["rewards/margins"]) == pytest.approx(1.0)


def test_micro_batches_give_the_whole_batch_gradient(tok, ref_model):
    """A batch cut into micro-batches (back-propagated one by one) gives the loss and gradient of the whole batch."""
    pairs = _token_pairs(tok)
    for p in pairs:
        p.improver_prompt_ids = templates.policy_ids(tok, (("user", "Improve: " + tok.decode(p.rejected_ids)),))
    reference_logps(ref_model, pairs, pad_id=tok.pad_token_id, show_progress=False)
    policy = _policy(ref_model).train()
    results = []
    for max_positions in (None, 1):  # 1: every pair is its own micro-batch
        policy.zero_grad(set_to_none=True)
        step = dpo_step(tok.pad_token_id, DPOConfig(beta=BETA, improver_nll_coef=0.5), "packed", max_positions,
                        torch.Tensor.backward if max_positions else None)
        loss, metrics = step(policy, pairs)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), {k: float(v) for k, v in metrics.items()}, grads))
    (l1, m1, g1), (l2, m2, g2) = results
    assert abs(l1 - l2) < 1e-5
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], abs=1e-5), k
    for name in g1:
        scale = g1[name].abs().max().clamp(min=1e-6)
        assert float((g1[name] - g2[name]).abs().max() / scale) < 1e-4, name



def test_nll_chosen_is_the_chosen_sides_mean_nll(tok, ref_model):
    """``nll/chosen``, logged every DPO step: the chosen sides' mean per-token NLL under the policy (it shows DPO
    lowering the chosen side's likelihood along with the rejected one's when it rises over a round)."""
    pairs = _token_pairs(tok)
    reference_logps(ref_model, pairs, pad_id=tok.pad_token_id, show_progress=False)
    policy = _policy(ref_model).train()
    _, m = dpo_step(tok.pad_token_id, DPOConfig(beta=BETA), "packed")(policy, pairs)
    with torch.no_grad():
        logp = pair_logps(policy, pair_batch(pairs, tok.pad_token_id, "packed"))
    mean_nll = -float(logp[:len(pairs)].sum()) / sum(len(p.chosen_ids) for p in pairs)
    assert float(m["nll/chosen"]) == pytest.approx(mean_nll, rel=1e-5)
