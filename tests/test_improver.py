"""Improver targets: interpolation properties, chains, changed-token weights, the training-example layout."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgpo import templates
from sgpo.improver import (ImproverExample, chain, changed_spans, edit_ops, examples_from_draft, interpolate,
                           nll_example, split_units, token_weights, word_edit_distance)
from sgpo.training.batching import collate, token_logps
from sgpo.training.sft import NLLExample, nll_step

WORDS = ["alpha", "beta", "gamma", "delta", "the", "a", "of", "cat", "runs", "fast", "x", "y"]
sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(lambda ws: " ".join(ws).capitalize() + ".")
text = st.lists(sentence, min_size=1, max_size=6).map(" ".join)

DRAFT = "Paris is a city. It is in Europe. It has many cafes. The food is nice."
REFERENCE = "Paris is the capital of France. It lies on the Seine. It is known for the Eiffel Tower."


@settings(max_examples=200, deadline=None)
@given(text, text, st.floats(min_value=0.01, max_value=1.0), st.booleans())
def test_interpolation_differs_and_is_strictly_closer(draft, reference, step, split):
    if draft.strip() == reference.strip():
        return
    out = interpolate(draft, reference, step, split)
    assert out.strip() != draft.strip()
    assert word_edit_distance(out, reference) < word_edit_distance(draft, reference)


@settings(max_examples=100, deadline=None)
@given(text, text, st.booleans())
def test_step_one_reaches_the_reference(draft, reference, split):
    assert interpolate(draft, reference, 1.0, split) == reference


def test_a_small_step_is_partial_even_when_no_sentence_is_shared():
    # two independently written texts share no sentence: one block, so an unsplit step is the full jump ...
    assert interpolate(DRAFT, REFERENCE, 0.25) == REFERENCE
    # ... and a split one is a part of the way
    out = interpolate(DRAFT, REFERENCE, 0.25, split_blocks=True)
    assert out.startswith("Paris is the capital of France.")
    assert out != REFERENCE
    assert "The food is nice." in out  # the rest of the draft is kept
    assert 0 < word_edit_distance(out, REFERENCE) < word_edit_distance(DRAFT, REFERENCE)


def test_edit_ops_are_single_units_in_order():
    a, b = split_units(DRAFT), split_units(REFERENCE)
    assert len(edit_ops(a, b)) == 1
    ops = edit_ops(a, b, split_blocks=True)
    assert len(ops) == max(len(a), len(b))  # nothing shared: one operation per unit
    assert all((i2 - i1) <= 1 and (j2 - j1) <= 1 for _, i1, i2, j1, j2 in ops)
    assert [op[1] for op in ops] == sorted(op[1] for op in ops)


def test_chain_steps_each_get_closer_and_end_at_most_at_the_reference():
    seq = chain(DRAFT, REFERENCE, 0.34, 5, split_blocks=True)
    dists = [word_edit_distance(s, REFERENCE) for s in seq]
    assert dists == sorted(dists, reverse=True) and len(set(dists)) == len(dists)
    assert seq[-1] == REFERENCE  # reached within five steps of a third each, then stopped
    ex = examples_from_draft("r", DRAFT, REFERENCE, "interpolate", 0.34, 2, split_blocks=True)
    assert [(e.source, e.target) for e in ex] == [(seq[0], seq[1]), (seq[1], seq[2])]


def test_reference_target_is_the_full_jump():
    ex = examples_from_draft("r", DRAFT, REFERENCE, "reference", 0.5, 3)
    assert [(e.source, e.target) for e in ex] == [(DRAFT, REFERENCE)]
    assert examples_from_draft("r", "Same.", "Same.", "reference", 0.5, 1) == []


def test_changed_spans_cover_exactly_the_new_words():
    src = "The cat runs fast. It is black."
    tgt = "The dog runs fast. It is black."
    spans = changed_spans(src, tgt)
    assert [tgt[a:b].strip() for a, b in spans] == ["dog"]


@pytest.fixture(scope="module")
def tokenizer():
    from sgpo.models import load_tokenizer

    return load_tokenizer("sgpo:tiny-random")


def test_token_weights_mark_changed_tokens_and_match_completion_ids(tokenizer):
    src = "The cat runs fast. It is black."
    tgt = "The dog runs fast. It is black."
    ids, w = token_weights(tokenizer, src, tgt, 4.0)
    assert list(ids) == templates.completion_ids(tokenizer, tgt)
    pieces = [tokenizer.decode([t]) for t in ids[:-1]]
    heavy = [p for p, x in zip(pieces, w) if x == 4.0]
    assert "".join(heavy).strip() == "dog"
    assert w[-1] == 1.0  # same ending as the source: stopping there is copied, not changed
    _, w2 = token_weights(tokenizer, src, "The cat runs fast.", 4.0)
    assert w2[-1] == 4.0  # the target stops earlier than the source: EOS is an edit


def test_improver_example_layout_puts_loss_only_on_target_tokens(tokenizer):
    prompt = (("user", "Describe Paris."),)
    e = ImproverExample("r", DRAFT, interpolate(DRAFT, REFERENCE, 0.25, split_blocks=True))
    ex = nll_example(tokenizer, prompt, e, "Improve.\n{prompt}\n{draft}", changed_weight=3.0)
    assert list(ex.prompt_ids) == templates.improver_ids(tokenizer, prompt, DRAFT, "Improve.\n{prompt}\n{draft}")
    assert list(ex.completion_ids) == templates.completion_ids(tokenizer, e.target)
    batch = collate([(list(ex.prompt_ids), list(ex.completion_ids))], tokenizer.pad_token_id, weights=[ex.weights])
    n = len(ex.completion_ids)
    mask = batch.target_mask[0]
    assert (mask[-n:] > 0).all() and (mask[:-n] == 0).all()  # prompt positions carry no loss
    assert batch.targets[0, -n:].tolist() == list(ex.completion_ids)
    assert set(mask[-n:].tolist()) == {1.0, 3.0}
    plain = nll_example(tokenizer, prompt, e, "Improve.\n{prompt}\n{draft}")
    assert plain.weights is None


def test_weighted_nll_is_the_weighted_mean_of_token_losses(tokenizer):
    from sgpo.models import load_model

    model = load_model("sgpo:tiny-random", device="cpu", dtype="float32")
    a = NLLExample((1, 2, 3), (4, 5, 6), "improver", (1.0, 5.0, 1.0))
    b = NLLExample((7, 8), (9, 10), "policy")
    loss, _ = nll_step(tokenizer.pad_token_id)(model, [a, b])
    batch = collate([([1, 2, 3], [4, 5, 6]), ([7, 8], [9, 10])], tokenizer.pad_token_id)
    with torch.no_grad():
        lp = token_logps(model, batch)
    w = torch.tensor([[1.0, 5.0, 1.0], [0.0, 1.0, 1.0]])
    expected = -(lp * w).sum() / w.sum()
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    unweighted = -(lp * (w > 0)).sum() / (w > 0).sum()
    assert not torch.allclose(expected, unweighted)
