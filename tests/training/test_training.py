import pytest
import torch

from sgpo.training.batching import collate, position_slices, token_logps
from sgpo.config.schema import DPOConfig, TrainConfig
from sgpo.training.dpo import TokenPair, reference_logps, train_dpo
from sgpo.training.loop import Job
from sgpo.training.losses import LogRatios, preference_loss
from sgpo.training.sft import NLLExample, nll_step, train_nll


def test_collate_puts_loss_only_on_completion_tokens():
    b = collate([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [0, 6, 7, 8, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert b.keep == 4
    assert b.targets.tolist() == [[0, 4, 5], [7, 8, 9]]
    assert b.target_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert b.position_ids[1].tolist() == [0, 0, 1, 2, 3]


def test_token_logps_match_a_plain_forward(tiny_model):
    torch.manual_seed(0)
    seqs = [([5, 6, 7, 8], [9, 10]), ([11, 12], [13, 14, 15])]
    b = collate(seqs, pad_id=0)
    got = token_logps(tiny_model, b).sum(-1)
    for i, (p, c) in enumerate(seqs):
        ids = torch.tensor([p + c])
        logits = tiny_model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        want = logits[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum()
        assert torch.allclose(got[i], want, atol=1e-4)


def _pairs(n=4):
    return [TokenPair([20 + i, 21, 22], [30, 31, 32, 2], [40 + i, 41, 2]) for i in range(n)]


def _log_ratio(model, pairs):
    b = collate([(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs], 0)
    with torch.no_grad():
        lp = token_logps(model, b).sum(-1)
    return (lp[:len(pairs)] - lp[len(pairs):]).mean().item()


def test_dpo_moves_the_policy_towards_chosen(tiny_path):
    from sgpo.models.loading import load_model

    for swap in (False, True):
        model = load_model(tiny_path, device="cpu", dtype="float32")
        pairs = _pairs()
        if swap:
            pairs = [TokenPair(p.prompt_ids, p.rejected_ids, p.chosen_ids) for p in pairs]
        reference_logps(model, pairs, pad_id=0, show_progress=False)
        ref = [TokenPair(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in _pairs()]
        before = _log_ratio(model, ref)
        m = train_dpo(model, pairs, DPOConfig(beta=0.5, batch_size=4, epochs=6, lr=3e-3), Job(0, 0))
        after = _log_ratio(model, ref)
        if swap:
            assert after < before - 0.5
        else:
            assert after > before + 0.5
        assert m["rewards/accuracies_last"] == 1.0 and m["dpo/steps"] == 6


def test_dpo_loss_at_equal_policy_and_reference_is_log2():
    z = torch.zeros(3)
    loss, m = preference_loss("sigmoid", LogRatios(z - z, z - z, z + 1, z + 1), beta=0.1)
    assert abs(loss.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6 and m["rewards/margins"] == 0


def test_nll_training_lowers_the_loss_on_its_examples(tiny_model):
    ex = [NLLExample((20, 21, 22), (30, 31, 2)), NLLExample((23, 24), (32, 33, 34, 2))]
    first = train_nll(tiny_model, ex, TrainConfig(batch_size=2, epochs=1, lr=1e-2), Job(0, 0))["nll/loss"]
    for _ in range(5):
        last = train_nll(tiny_model, ex, TrainConfig(batch_size=2, epochs=1, lr=1e-2), Job(0, 0))["nll/loss"]
    assert last < first - 0.5


def test_position_slices_bound_the_padded_size():
    assert position_slices([3, 3, 3, 3], None) == [slice(0, 4)]
    assert position_slices([3, 3, 3, 3], 6) == [slice(0, 2), slice(2, 4)]
    assert position_slices([2, 5, 2], 8) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # 2 rows of 5 = 10 > 8
    assert position_slices([9, 1], 4) == [slice(0, 1), slice(1, 2)]  # a row longer than the limit still runs


def test_nll_micro_batches_give_the_whole_batch_loss_and_gradient(tiny_model):
    """NLL over a batch cut into micro-batches (back-propagated one by one) equals the whole batch's."""
    ex = [NLLExample((20, 21, 22), (30, 31, 2)), NLLExample((23, 24), (32, 33, 34, 2)),
          NLLExample((25,), (35, 2))]
    results = []
    for max_positions in (None, 1):  # 1: every example is its own micro-batch
        tiny_model.zero_grad(set_to_none=True)
        step = nll_step(0, max_positions, torch.Tensor.backward if max_positions else None)
        loss, _ = step(tiny_model, ex)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads))
    (l1, g1), (l2, g2) = results
    assert abs(l1 - l2) < 1e-5
    for name in g1:
        scale = g1[name].abs().max().clamp(min=1e-6)
        assert float((g1[name] - g2[name]).abs().max() / scale) < 1e-4, name


def test_a_sharded_export_is_a_whole_model_folder(tmp_path, tiny_model, tiny_tokenizer):
    """What sharded training exports is what the next rollout loads (vLLM included): weights and tokenizer."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgpo.training.loop import _export

    from accelerate.utils import DistributedType

    acc = SimpleNamespace(get_state_dict=lambda m: m.state_dict(), is_main_process=True, unwrap_model=lambda m: m,
                          wait_for_everyone=lambda: None, distributed_type=DistributedType.FSDP)
    _export(acc, tiny_model, tmp_path / "weights", tiny_tokenizer)
    tok = AutoTokenizer.from_pretrained(tmp_path / "weights")
    assert tok("hello").input_ids == tiny_tokenizer("hello").input_ids
    assert tok.chat_template == tiny_tokenizer.chat_template
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "weights")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), tiny_model.state_dict().values()))


def test_low_precision_logits_are_reduced_in_fp32_chunk_by_chunk(monkeypatch):
    from sgpo.training import batching

    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50) * 4).to(torch.bfloat16)
    want = torch.logsumexp(logits.float(), dim=-1)
    monkeypatch.setattr(batching, "LSE_CHUNK", 4)  # 21 positions in chunks of 4
    got = batching.logsumexp_fp32(logits)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(batching.logsumexp_fp32(logits.float()), want)


def test_checkpoints_by_elapsed_minutes_as_well_as_steps(tmp_path, tiny_model, monkeypatch):
    from sgpo.training import loop

    steps = []
    monkeypatch.setattr(loop.Checkpoints, "save", lambda self, step, *a: steps.append(step))
    examples = [NLLExample((5, 6, 7), (8, 9)) for _ in range(6)]
    for minutes, want in ((0.0, [3]), (1e-9, [1, 2, 3])):  # off: after the last step only; due: after every step
        steps.clear()
        cfg = TrainConfig(lr=1e-4, batch_size=2, checkpoint_every=0, checkpoint_minutes=minutes)
        train_nll(tiny_model, examples, cfg, Job(pad_id=0, seed=0, show_progress=False,
                                                 checkpoint_dir=tmp_path / f"ck{minutes}"))
        assert steps == want, minutes


def test_a_model_already_on_disk_is_moved_or_copied_not_loaded_to_be_saved(tmp_path, tiny_model, tiny_tokenizer):
    from types import SimpleNamespace

    from sgpo.config.schema import ModelConfig
    from sgpo.models.policy import Policy, save_model
    from sgpo.run.stages import RunDir

    run = RunDir(tmp_path / "run")
    export = run.path("round_1", "checkpoints", "dpo", "weights")
    save_model(tiny_model, tiny_tokenizer, export)
    policy = Policy(ModelConfig(name=str(export)), tiny_tokenizer, "cpu", run, SimpleNamespace(current="round_1"),
                    SimpleNamespace(barrier=lambda: None))
    policy.load = lambda path: pytest.fail("the model was loaded to be saved")
    policy.trained(exported=export)  # what sharded training leaves: the export is the current model
    policy.save("round_1")
    assert not export.exists() and (run.path("round_1", "model") / "model.safetensors").exists()
    policy.save("final")  # unchanged since: a copy of round_1/model
    assert (run.path("final") / "tokenizer.json").exists() and (run.path("round_1", "model") / "config.json").exists()
    assert policy.path == str(run.path("final"))
