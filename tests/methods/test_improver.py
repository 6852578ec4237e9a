"""Improver targets: interpolation properties, chains, the training-example layout."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgpo.models import templates
from sgpo.config.schema import ImproverConfig
from sgpo.methods.improver import ImproverExample, chain, edit_ops, examples_from_draft, interpolate, nll_example, split_units
from sgpo.core.text import word_edit_distance
from sgpo.training.batching import collate

WORDS = ["alpha", "beta", "gamma", "delta", "the", "a", "of", "cat", "runs", "fast", "x", "y"]
sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(lambda ws: " ".join(ws).capitalize() + ".")
text = st.lists(sentence, min_size=1, max_size=6).map(" ".join)

DRAFT = "Paris is a city. It is in Europe. It has many cafes. The food is nice."
REFERENCE = "Paris is the capital of France. It lies on the Seine. It is known for the Eiffel Tower."


@settings(max_examples=200, deadline=None)
@given(text, text, st.floats(min_value=0.01, max_value=1.0))
def test_interpolation_differs_and_is_strictly_closer(draft, reference, step):
    if draft.strip() == reference.strip():
        return
    out = interpolate(draft, reference, step)
    assert out.strip() != draft.strip()
    assert word_edit_distance(out, reference) < word_edit_distance(draft, reference)


@settings(max_examples=100, deadline=None)
@given(text, text)
def test_step_one_reaches_the_reference(draft, reference):
    assert interpolate(draft, reference, 1.0) == reference


def test_a_step_without_a_shared_sentence_is_the_full_jump():
    # two independently written texts share no sentence: one block, so a step is the full jump
    assert len(edit_ops(split_units(DRAFT), split_units(REFERENCE))) == 1
    assert interpolate(DRAFT, REFERENCE, 0.25) == REFERENCE


def test_chain_steps_each_get_closer_and_end_at_most_at_the_reference():
    draft = "Paris is the capital of France. It is in Europe. It has many cafes. The food is nice."
    seq = chain(draft, REFERENCE, 0.34, 5)
    dists = [word_edit_distance(s, REFERENCE) for s in seq]
    assert dists == sorted(dists, reverse=True) and len(set(dists)) == len(dists)
    assert seq[-1] == REFERENCE
    ex = examples_from_draft("r", draft, REFERENCE, ImproverConfig(target="interpolate", step=0.34, chain=2))
    assert [(e.source, e.target) for e in ex] == [(a, b) for a, b in zip(seq, seq[1:])][:2]


def test_reference_target_is_the_full_jump():
    ex = examples_from_draft("r", DRAFT, REFERENCE, ImproverConfig(target="reference", chain=3))
    assert [(e.source, e.target) for e in ex] == [(DRAFT, REFERENCE)]
    assert examples_from_draft("r", "Same.", "Same.", ImproverConfig(target="reference")) == []


@pytest.fixture(scope="module")
def tokenizer():
    from sgpo.models.loading import load_tokenizer

    return load_tokenizer("sgpo:tiny-random")


def test_improver_example_layout_puts_loss_only_on_target_tokens(tokenizer):
    prompt = (("user", "Describe Paris."),)
    e = ImproverExample("r", DRAFT, interpolate(DRAFT, REFERENCE, 0.25))
    from sgpo.data.records import Record

    ex = nll_example(tokenizer, Record("r", prompt, REFERENCE), e, "Improve.\n{prompt}\n{draft}")
    assert list(ex.prompt_ids) == templates.improver_ids(tokenizer, prompt, DRAFT, "Improve.\n{prompt}\n{draft}")
    assert list(ex.completion_ids) == templates.completion_ids(tokenizer, e.target)
    batch = collate([(list(ex.prompt_ids), list(ex.completion_ids))], tokenizer.pad_token_id)
    n = len(ex.completion_ids)
    mask = batch.target_mask[0]
    assert (mask[-n:] > 0).all() and (mask[:-n] == 0).all()  # prompt positions carry no loss
    assert batch.targets[0, -n:].tolist() == list(ex.completion_ids)
