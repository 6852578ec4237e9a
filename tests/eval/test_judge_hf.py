"""Local judges on tiny randomly initialised models: a causal LM read by label tokens, and a reward model."""
import math

import pytest
import torch

from sgpo.eval.judge_hf import HFJudge, RewardJudge
from sgpo.eval.judges import make_judge
from sgpo.models.loading import tiny_random_path

PROMPTS = ["Name a colour.", "What is the capital of France? Answer briefly.", "Say hi."]
A = ["Blue.", "Paris is the capital of France.", "Hello there, friend!"]
B = ["I like turtles and long walks.", "Lyon.", "hi"]


@pytest.fixture(scope="module")
def hf_judge():
    return HFJudge(str(tiny_random_path()), device="cpu", dtype="float32", batch_size=4)


def test_hf_judge_both_orders_are_symmetric(hf_judge):
    ab = hf_judge.prefer(PROMPTS, A, B)
    ba = hf_judge.prefer(PROMPTS, B, A)
    assert all(0.0 < p < 1.0 for p in ab)
    assert [x + y for x, y in zip(ab, ba)] == pytest.approx([1.0] * 3, abs=1e-6)
    assert hf_judge.prefer(PROMPTS, A, A) == pytest.approx([0.5] * 3, abs=1e-6)


def test_hf_judge_averages_the_two_orders(hf_judge):
    p_ab = hf_judge.first_position_probability(PROMPTS, A, B)
    p_ba = hf_judge.first_position_probability(PROMPTS, B, A)
    # a random model has a position bias: the single-order readings do not already mirror each other
    assert any(abs(x + y - 1.0) > 1e-4 for x, y in zip(p_ab, p_ba))
    expected = [(x + 1 - y) / 2 for x, y in zip(p_ab, p_ba)]
    assert hf_judge.prefer(PROMPTS, A, B) == pytest.approx(expected, abs=1e-6)


def test_hf_judge_reads_label_tokens_and_is_batch_independent(hf_judge):
    rendered = hf_judge.render(PROMPTS[0], A[0], B[0])
    with torch.inference_mode():
        logits = hf_judge.model(torch.tensor([rendered])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    s1 = torch.logsumexp(logp[hf_judge.label_ids[0]], -1)
    s2 = torch.logsumexp(logp[hf_judge.label_ids[1]], -1)
    by_hand = float(torch.sigmoid(s1 - s2))
    # item 0 in a padded batch of three gives what it gives alone
    assert hf_judge.first_position_probability(PROMPTS, A, B)[0] == pytest.approx(by_hand, abs=1e-5)
    assert hf_judge.label_ids[0] and hf_judge.label_ids[1]


def test_make_judge_hf_spec():
    judge = make_judge(f"hf:{tiny_random_path()}", device="cpu", dtype="float32")
    assert isinstance(judge, HFJudge) and judge.template_name == "sgpo:pairwise_label"
    with pytest.raises(ValueError):
        make_judge("hf:")
    with pytest.raises(ValueError):
        make_judge("nonsense:x")


@pytest.fixture(scope="module")
def reward_path(tmp_path_factory):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    src = tiny_random_path()
    cfg = AutoConfig.from_pretrained(src)
    cfg.num_labels = 1
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(cfg)
    out = tmp_path_factory.mktemp("tiny-reward")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


def test_reward_judge_sigmoid_of_difference(reward_path):
    judge = make_judge(f"reward:{reward_path}", device="cpu", dtype="float32", batch_size=8)
    assert isinstance(judge, RewardJudge)
    r_a = judge.rewards(PROMPTS, A)
    r_b = judge.rewards(PROMPTS, B)
    prefs = judge.prefer(PROMPTS, A, B)
    assert prefs == pytest.approx([1 / (1 + math.exp(-(x - y))) for x, y in zip(r_a, r_b)], abs=1e-6)
    back = judge.prefer(PROMPTS, B, A)
    assert [x + y for x, y in zip(prefs, back)] == pytest.approx([1.0] * 3, abs=1e-6)
    assert judge.prefer(PROMPTS, A, A) == [0.5, 0.5, 0.5]
    # rewards do not depend on the batch a text is in (left padding, read at the last real token)
    alone = [judge.rewards([p], [x])[0] for p, x in zip(PROMPTS, A)]
    assert alone == pytest.approx(r_a, abs=1e-4)
    assert len(set(round(v, 6) for v in r_a + r_b)) > 1


def test_reward_judge_hard_mode(reward_path):
    judge = RewardJudge(reward_path, device="cpu", dtype="float32", mode="hard")
    r_a = judge.rewards(PROMPTS, A)
    r_b = judge.rewards(PROMPTS, B)
    assert judge.prefer(PROMPTS, A, B) == [1.0 if x > y else 0.0 for x, y in zip(r_a, r_b)]
