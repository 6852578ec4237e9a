"""A slot-based KV-cache decoder for Llama-family causal LMs (Llama, Mistral without a sliding window, Qwen2).

It runs the model's own weights (no copy) with its own forward pass, written for batched generation:
- one preallocated KV cache per batch (``[2 * layers, rows, kv_heads, slots, head_dim]``), no per-step concatenation;
- rows that finish are dropped by moving the last live row into their place (only that row's filled slots are copied),
  so the batch shrinks instead of decoding padding to the end;
- a prefix shared by every prompt of the batch (typically the chat template head and system prompt) is run once and
  its keys/values are broadcast to all rows;
- the LM head is applied to the last position only;
- decode-step attention groups query heads by their key/value head (no repeated K/V).

Slot layout of a row: ``[shared prefix | gap | rest of the prompt | generated tokens]``. The prefix occupies slots
``0..P-1`` in every row, the rest of each prompt is right-aligned so that every row's prompt ends at the same slot, and
generated tokens follow; gap slots are masked out. Positions (for the rotary embedding) count only real tokens, so a
row computes exactly what it would compute alone.

The module does only the model arithmetic; sampling, stopping and scheduling live in ``sgpo.generation``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_SUPPORTED = {"llama", "mistral", "qwen2"}


def supports(model) -> bool:
    """True when ``model`` has the plain Llama block structure this decoder implements."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _SUPPORTED:
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "use_sliding_window", False):
        return False
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return False
    if getattr(cfg, "layer_types", None) and any(t != "full_attention" for t in cfg.layer_types):
        return False
    inner = getattr(model, "model", None)
    try:
        layer = inner.layers[0]
        needed = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                  layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.input_layernorm,
                  layer.post_attention_layernorm, inner.norm, inner.embed_tokens, inner.rotary_emb, model.lm_head)
    except (AttributeError, IndexError, TypeError):
        return False
    # anything besides the plain submodules (adapters, quantized linears) goes through the model's own forward
    for lin in needed[:7] + (model.lm_head,):
        if type(lin) is not torch.nn.Linear:
            return False
    return all(m is not None for m in needed)


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    # the same arithmetic as LlamaRMSNorm
    dtype = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


class _Layer:
    __slots__ = ("ln1", "ln2", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "wg", "wu", "wd")

    def __init__(self, layer):
        a, m = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.wq, self.bq = a.q_proj.weight, a.q_proj.bias
        self.wk, self.bk = a.k_proj.weight, a.k_proj.bias
        self.wv, self.bv = a.v_proj.weight, a.v_proj.bias
        self.wo = a.o_proj.weight
        self.wg, self.wu, self.wd = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight


class KVDecoder:
    """Batched prefill and decode steps over a preallocated, compactable KV cache.

    ``start(prompts, max_new_tokens)`` prefills and returns the next-token logits of every row;
    ``step(tokens)`` appends one token per live row and returns the next logits;
    ``drop(rows)`` removes finished rows and returns, for each remaining row, its previous row index.
    """

    def __init__(self, model, min_shared_prefix: int = 8):
        cfg = model.config
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm
        self.lm_head = model.lm_head.weight
        self.lm_bias = model.lm_head.bias
        self.rotary = inner.rotary_emb
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = self.n_heads // self.n_kv
        self.scale = self.head_dim ** -0.5
        self.min_shared_prefix = min_shared_prefix
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.cache: torch.Tensor | None = None

    # ---------------------------------------------------------------- setup
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.n_kv * self.head_dim * self.embed.element_size()

    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int = 0) -> torch.Tensor:
        n = len(prompts)
        lens = [len(p) for p in prompts]
        if min(lens) == 0:
            raise ValueError("empty prompt")
        shared = _common_prefix_len(prompts)
        # leave at least one token per row to run through the batched pass (it yields the logits)
        shared = min(shared, min(lens) - 1)
        if shared < self.min_shared_prefix or n == 1:
            shared = 0
        rest = [length - shared for length in lens]
        width = shared + max(rest)  # every prompt ends at slot ``width``
        self.slots = width + max_new_tokens
        d = self.device

        self.cache = torch.empty((2 * len(self.layers), n, self.n_kv, self.slots, self.head_dim), dtype=self.dtype,
                                 device=d)
        valid = torch.zeros((n, self.slots), dtype=torch.bool)
        pos = torch.zeros((n, width), dtype=torch.long)
        ids = torch.full((n, width - shared), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            r = rest[i]
            valid[i, :shared] = True
            valid[i, width - r:] = True
            pos[i, :shared] = torch.arange(shared)
            pos[i, width - r:width] = torch.arange(shared, shared + r)
            ids[i, width - shared - r:] = torch.tensor(p[shared:], dtype=torch.long)
        self.valid = valid.to(d)
        self.next_pos = torch.tensor(lens, dtype=torch.long, device=d)
        self.cur = width  # next slot to write
        self.n = n
        max_pos = max(lens) + max_new_tokens
        probe = torch.zeros(1, dtype=self.dtype, device=d)
        cos, sin = self.rotary(probe, torch.arange(max_pos, device=d)[None])
        half = self.head_dim // 2
        self.cos = cos[0].to(self.dtype)
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): fold the sign into the table
        self.sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1).to(self.dtype)

        if shared:
            prefix = torch.tensor(list(prompts[0][:shared]), dtype=torch.long, device=d)[None]
            self._forward(prefix, torch.arange(shared, device=d)[None], 0, rows=1, want_logits=False)
            if n > 1:
                self.cache[:, 1:n, :, :shared] = self.cache[:, 0:1, :, :shared]
        return self._forward(ids.to(d), pos[:, shared:].to(d), shared, rows=n)

    # ---------------------------------------------------------------- steps
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: ``tokens`` has one id per live row; returns ``[rows, vocab]`` logits."""
        n = self.n
        slot = self.cur
        self.valid[:n, slot] = True
        logits = self._forward(tokens.view(n, 1), self.next_pos[:n, None], slot, rows=n)
        self.next_pos[:n] += 1
        return logits

    def drop(self, rows: Sequence[int]) -> list[int]:
        """Remove ``rows`` (indices among the live rows); returns ``old_index`` for each new row index."""
        gone = set(rows)
        n = self.n
        keep = n - len(gone)
        holes = [i for i in range(keep) if i in gone]
        movers = [i for i in range(keep, n) if i not in gone]
        order = list(range(keep))
        if holes:
            for h, m in zip(holes, movers):
                order[h] = m
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            filled = self.cur
            self.cache[:, dst, :, :filled] = self.cache[:, src, :, :filled]
            self.valid[dst] = self.valid[src]
            self.next_pos[dst] = self.next_pos[src]
        self.n = keep
        return order

    def release(self) -> None:
        self.cache = None

    # ---------------------------------------------------------------- model
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, slot0: int, rows: int,
                 want_logits: bool = True) -> torch.Tensor | None:
        """Run ``ids`` (``[rows, S]``, written at slots ``slot0..slot0+S-1``) through the model."""
        n, s = ids.shape
        end = slot0 + s
        h = F.embedding(ids, self.embed)  # [n, s, hidden]
        cos = self.cos[pos].unsqueeze(1)  # [n, 1, s, hd]
        sin = self.sin_signed[pos].unsqueeze(1)
        if s == 1:
            bias = torch.zeros((n, end), dtype=self.dtype, device=self.device)
            bias.masked_fill_(~self.valid[:n, :end], float("-inf"))
            bias = bias.view(n, 1, 1, end)
            mask = None
        else:
            k_idx = torch.arange(end, device=self.device)
            q_idx = torch.arange(slot0, end, device=self.device)
            mask = self.valid[:n, None, :end] & (k_idx[None, None, :] <= q_idx[None, :, None])
            # masked-out query slots (gap) attend to themselves so that no row of the softmax is empty
            mask[:, torch.arange(s), q_idx] = True
            mask = mask.unsqueeze(1)
        half = self.head_dim // 2
        hd, nkv, nh = self.head_dim, self.n_kv, self.n_heads
        cache = self.cache
        for li, L in enumerate(self.layers):
            x = _rms_norm(h, L.ln1)
            q = F.linear(x, L.wq, L.bq).view(n, s, nh, hd).transpose(1, 2)
            k = F.linear(x, L.wk, L.bk).view(n, s, nkv, hd).transpose(1, 2)
            v = F.linear(x, L.wv, L.bv).view(n, s, nkv, hd).transpose(1, 2)
            q = q * cos + torch.cat((q[..., half:], q[..., :half]), -1) * sin
            k = k * cos + torch.cat((k[..., half:], k[..., :half]), -1) * sin
            kc = cache[2 * li, :n]
            vc = cache[2 * li + 1, :n]
            kc[:, :, slot0:end] = k
            vc[:, :, slot0:end] = v
            keys, values = kc[:, :, :end], vc[:, :, :end]
            if mask is None:
                # one query per row: group the query heads by their key/value head, no repeated K/V
                qg = q.reshape(n, nkv, self.group, hd)
                att = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale + bias
                att = torch.softmax(att, dim=-1, dtype=torch.float32).to(self.dtype)
                o = torch.matmul(att, values).reshape(n, 1, nh * hd)
            else:
                if self.group > 1:
                    keys = keys[:, :, None].expand(n, nkv, self.group, end, hd).reshape(n, nh, end, hd)
                    values = values[:, :, None].expand(n, nkv, self.group, end, hd).reshape(n, nh, end, hd)
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
                o = o.transpose(1, 2).reshape(n, s, nh * hd)
            h = h + F.linear(o, L.wo)
            x = _rms_norm(h, L.ln2)
            h = h + F.linear(F.silu(F.linear(x, L.wg)) * F.linear(x, L.wu), L.wd)
        self.cur = end
        if not want_logits:
            return None
        last = _rms_norm(h[:, -1], self.final_norm)
        return F.linear(last, self.lm_head, self.lm_bias).float()


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for other in seqs[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n
