"""The generation engine: same text as plain greedy decoding, per-request seeds, EOS handling, the batch plan."""
from __future__ import annotations

import copy

import pytest
import torch

from sgpo.generation import kv_decoder
from sgpo.generation.engine import Request, Settings, _inverse_cdf, generate, plan_batches
from sgpo.models.loading import load_model, load_tokenizer, tiny_random_path

QUESTIONS = [
    "Hi",
    "Write a poem about the sea, the sky and everything in between, in four short stanzas.",
    "What is 2+2?",
    "List three colours.",
    "Explain gravity to a child.",
    "Translate 'good morning' into French, Spanish and German, and say which is the most formal.",
]


@pytest.fixture(scope="module")
def tiny():
    path = str(tiny_random_path())
    tok = load_tokenizer(path)
    model = load_model(path, device="cpu", dtype="float32").eval()
    return model, tok


def _prompts(tok, questions=QUESTIONS):
    out = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(tuple(int(x) for x in ids))
    return out


def _plain_greedy(model, tok, prompt, max_new, eos):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return tuple(out[:cut]), cut < len(out)


def test_greedy_matches_plain_generate(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 3  # prompts of different lengths share one batch
    assert kv_decoder.supports(model)
    gens = generate(model, tok, [Request(p, seed=i) for i, p in enumerate(prompts)], Settings(24, 0.0, 1.0, 8))
    for p, g in zip(prompts, gens):
        ids, finished = _plain_greedy(model, tok, p, 24, {tok.eos_token_id})
        assert g.token_ids == ids
        assert g.finished == finished
        assert g.text == tok.decode(list(ids), skip_special_tokens=True)


def test_greedy_matches_plain_generate_without_packed_weights(tiny):
    model, tok = tiny
    prompts = _prompts(tok)[:4]
    dec = kv_decoder.KVDecoder(model, packed=False)
    from sgpo.generation.engine import generate_batch
    gens = generate_batch(model, tok, [Request(p, seed=0) for p in prompts], Settings(16, 0.0, 1.0, 4), decoder=dec)
    for p, g in zip(prompts, gens):
        assert g.token_ids == _plain_greedy(model, tok, p, 16, {tok.eos_token_id})[0]


def _tiny_other(tok, kind):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "qwen2":  # Llama block with q/k/v biases: the fast path
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
        for layer in model.model.layers:  # random, non-zero biases
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    else:  # an architecture the decoder does not implement: the model's own forward
        cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        model = GPT2LMHeadModel(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_greedy_matches_other_architectures(tiny, kind):
    _, tok = tiny
    model = _tiny_other(tok, kind)
    assert kv_decoder.supports(model) == (kind == "qwen2")
    prompts = _prompts(tok)[:4]
    gens = generate(model, tok, [Request(p, seed=i) for i, p in enumerate(prompts)], Settings(12, 0.0, 1.0, 4))
    for p, g in zip(prompts, gens):
        assert g.token_ids == _plain_greedy(model, tok, p, 12, {tok.eos_token_id})[0]


def test_sample_does_not_depend_on_batch(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    reqs = [Request(p, seed=100 + i) for i, p in enumerate(prompts)]
    s = Settings(20, 0.9, 1.0, 1)
    alone = generate(model, tok, reqs, s)  # batch size 1
    together = generate(model, tok, reqs, Settings(20, 0.9, 1.0, 6))
    pairs = generate(model, tok, reqs[::-1], Settings(20, 0.9, 1.0, 2))[::-1]  # other companions
    assert [g.token_ids for g in alone] == [g.token_ids for g in together] == [g.token_ids for g in pairs]
    assert len({g.token_ids for g in alone}) > 1
    # the seed is what decides: another seed gives another sample
    other = generate(model, tok, [Request(prompts[0], seed=7)], s)[0]
    again = generate(model, tok, [Request(prompts[0], seed=7)], s)[0]
    assert other.token_ids == again.token_ids != alone[0].token_ids


def test_the_cache_holds_only_the_rows_a_call_can_use(tiny, monkeypatch):
    """Fewer requests than ``batch_size``: the KV cache is reserved for the requests (its memory is touched, zeros),
    not for the batch size, and the samples are those of a cache with every row."""
    model, tok = tiny
    reqs = [Request(p, seed=100 + i) for i, p in enumerate(_prompts(tok))]
    rows, reserve = [], kv_decoder.KVDecoder.reserve
    monkeypatch.setattr(kv_decoder.KVDecoder, "reserve", lambda self, r, slots: (rows.append(r), reserve(self, r, slots)))
    few = generate(model, tok, reqs, Settings(20, 0.9, 1.0, 64))
    assert rows == [len(reqs)]
    exact = generate(model, tok, reqs, Settings(20, 0.9, 1.0, len(reqs)))
    assert [g.token_ids for g in few] == [g.token_ids for g in exact]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_eos_stops_a_row_and_sets_finished(tiny, temperature):
    model, tok = tiny
    prompts = _prompts(tok)
    reqs = [Request(p, seed=i) for i, p in enumerate(prompts)]
    s = Settings(16, temperature, 1.0, 6)
    free = generate(model, tok, reqs, s)
    assert not any(g.finished for g in free)
    # declare a token the model produces early in one row an end-of-sequence token: rows stop at different steps,
    # finished rows leave the batch, and the others must continue exactly as before
    stop = free[1].token_ids[3]
    stopping = copy.deepcopy(model)
    stopping.generation_config.eos_token_id = [tok.eos_token_id, stop]
    got = generate(stopping, tok, reqs, s)
    n_finished = 0
    for g0, g in zip(free, got):
        if stop in g0.token_ids:
            cut = g0.token_ids.index(stop)
            assert g.token_ids == g0.token_ids[:cut] and g.finished
            n_finished += 1
        else:
            assert g.token_ids == g0.token_ids and not g.finished
    assert 1 <= n_finished
    assert len(got[1].token_ids) == free[1].token_ids.index(stop) <= 3


def test_plan_is_fixed_sorted_and_complete():
    reqs = [Request(tuple(range(n)), seed=i) for i, n in enumerate([5, 3, 9, 3, 1, 7, 2])]
    plan = plan_batches(reqs, 3)
    assert plan == plan_batches(list(reqs), 3)
    assert sorted(i for b in plan for i in b) == list(range(len(reqs)))
    assert all(len(b) <= 3 for b in plan)
    lengths = [len(reqs[i].prompt_ids) for b in plan for i in b]
    assert lengths == sorted(lengths)
    assert plan[0] == [4, 6, 1]  # ties keep their order
    with pytest.raises(ValueError):
        plan_batches(reqs, 0)


def test_resume_skips_whole_batches_and_keeps_results(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    reqs = [Request(p, seed=i) for i, p in enumerate(prompts)]
    s = Settings(8, 0.8, 1.0, 2)
    full = generate(model, tok, reqs, s)
    first = plan_batches(reqs, 2)[0]
    seen = []
    resumed = generate(model, tok, reqs, s, on_batch=lambda idx, gens: seen.append(list(idx)), skip=set(first))
    assert first not in seen and len(seen) == len(plan_batches(reqs, 2)) - 1
    for i, (a, b) in enumerate(zip(full, resumed)):
        assert b is None if i in first else b == a


def test_inverse_cdf_follows_the_distribution():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(300, generator=gen) * 2, -1)
    p[::3] = 0  # tokens of zero mass are never drawn
    n = 60000
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    draws = _inverse_cdf(p.expand(n, -1).contiguous(), u, block=64)  # 300 is not a multiple of the block
    freq = torch.bincount(draws, minlength=300).double() / n
    assert (p[draws] > 0).all()
    q = p.double() / p.double().sum()
    assert (freq - q).abs().max() < 5 * (q.max() / n) ** 0.5
    edge = _inverse_cdf(p.expand(2, -1).contiguous(), torch.tensor([0.0, 1.0 - 1e-16], dtype=torch.float64))
    nz = p.nonzero().view(-1)
    assert edge.tolist() == [nz[0].item(), nz[-1].item()]


def test_auto_batch_size_follows_the_memory_budget(tiny):
    from sgpo.generation.engine import auto_batch_size

    model, _ = tiny
    reqs = [Request(tuple(range(90)), seed=0), Request(tuple(range(10)), seed=1)]
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    s = Settings(max_new_tokens=10, batch_size=0, kv_cache_mb=1, max_auto_batch=1000)
    assert auto_batch_size(model, reqs, s) == 2 ** 20 // (per_token * 100)
    assert auto_batch_size(model, reqs, Settings(batch_size=0, kv_cache_mb=1024, max_auto_batch=8)) == 8
    assert auto_batch_size(model, reqs, Settings(max_new_tokens=10 ** 9, batch_size=0)) == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefill_in_row_groups_gives_the_same_tokens(tiny, monkeypatch, temperature):
    model, tok = tiny
    reqs = [Request(p, seed=i) for i, p in enumerate(_prompts(tok))]
    s = Settings(10, temperature, 1.0, 6)
    whole = generate(model, tok, reqs, s)
    monkeypatch.setattr(kv_decoder, "PREFILL_TOKENS", 40)  # a group holds one or two of these prompts
    grouped = generate(model, tok, reqs, s)
    assert [g.token_ids for g in grouped] == [g.token_ids for g in whole]
