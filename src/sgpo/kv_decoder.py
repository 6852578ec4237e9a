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
    # the same arithmetic as LlamaRMSNorm (fused into one kernel for fp32, where it is the same computation)
    dtype = x.dtype
    if dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def packed_linear_available(weight: torch.Tensor) -> bool:
    """True when oneDNN can pre-pack ``weight`` for linear layers here (fp32 on CPU) and gives F.linear's results."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
        x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 5), None, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w), rtol=1e-4, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class _Linear:
    """``x @ weight.T + bias`` on weights pre-packed once for oneDNN (``packed=True``), or plain ``F.linear``.

    Packing copies the weights into the blocked layout the GEMM kernel reads, instead of re-laying them out on every
    call; for the small row counts of decoding this roughly halves the time of the linear layers on CPU.
    """
    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool, rows: int):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows) if packed else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*lead, y.shape[-1])


def _cat_bias(*biases):
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros_like(biases[0]) for b in biases])


class _Layer:
    """One decoder block's weights: q/k/v fused into one projection, gate/up into another."""
    __slots__ = ("ln1", "ln2", "qkv", "o", "gate_up", "down", "inter")

    def __init__(self, layer, packed: bool, rows: int):
        a, m = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        projs = (a.q_proj, a.k_proj, a.v_proj)
        self.qkv = _Linear(torch.cat([p.weight for p in projs]), _cat_bias(*(p.bias for p in projs)), packed, rows)
        self.gate_up = _Linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), None, packed, rows)
        self.inter = m.gate_proj.weight.shape[0]
        self.o = _Linear(a.o_proj.weight, a.o_proj.bias, packed, rows)
        self.down = _Linear(m.down_proj.weight, None, packed, rows)

    def mlp(self, x):
        g, u = self.gate_up(x).split(self.inter, dim=-1)
        return self.down(F.silu(g) * u)


class KVDecoder:
    """Batched prefill and decode steps over a preallocated, compactable KV cache.

    ``start(prompts, max_new_tokens)`` prefills and returns the next-token logits of every row;
    ``step(tokens)`` appends one token per live row and returns the next logits;
    ``drop(rows)`` removes finished rows and returns, for each remaining row, its previous row index.
    """

    def __init__(self, model, min_shared_prefix: int = 8, packed: bool | None = None, rows_hint: int = 16):
        cfg = model.config
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens.weight.detach()
        if packed is None:
            packed = packed_linear_available(self.embed)
        self.packed = packed
        self.final_norm = inner.norm
        self.lm_head = _Linear(model.lm_head.weight, model.lm_head.bias, packed, rows_hint)
        self.rotary = inner.rotary_emb
        self.layers = [_Layer(layer, packed, rows_hint) for layer in inner.layers]
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
        valid = torch.zeros((n, self.slots), dtype=torch.bool)  # prompt slots holding a token
        pos = torch.zeros((n, width), dtype=torch.long)
        ids = torch.full((n, width - shared), pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            r = rest[i]
            valid[i, :shared] = True
            valid[i, width - r:] = True
            pos[i, :shared] = torch.arange(shared)
            pos[i, width - r:width] = torch.arange(shared, shared + r)
            ids[i, width - shared - r:] = torch.tensor(p[shared:], dtype=torch.long)
        # additive attention bias per row and slot: 0 where the slot holds a token of the row, -inf elsewhere
        self.bias = torch.zeros((n, self.slots), dtype=self.dtype).masked_fill_(~valid, float("-inf")).to(d)
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
            self._prefill(prefix, torch.arange(shared, device=d)[None], 0, want_logits=False)
            if n > 1:
                self.cache[:, 1:n, :, :shared] = self.cache[:, 0:1, :, :shared]
        return self._prefill(ids.to(d), pos[:, shared:].to(d), shared)

    # ---------------------------------------------------------------- steps
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: ``tokens`` has one id per live row; returns ``[rows, vocab]`` logits."""
        n = self.n
        self.bias[:n, self.cur] = 0.0
        logits = self._decode(tokens.view(n), self.next_pos[:n])
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
            self.bias[dst] = self.bias[src]
            self.next_pos[dst] = self.next_pos[src]
        self.n = keep
        return order

    def release(self) -> None:
        self.cache = None

    # ---------------------------------------------------------------- model
    def _rotate(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of the query and key heads together (``[..., heads, head_dim]``)."""
        half = self.head_dim // 2
        return qk * cos + torch.cat((qk[..., half:], qk[..., :half]), -1) * sin

    def _prefill(self, ids: torch.Tensor, pos: torch.Tensor, slot0: int, want_logits: bool = True):
        """Run ``ids`` (``[rows, S]``, positions ``pos``) through the model, writing slots ``slot0..slot0+S-1``."""
        n, s = ids.shape
        end = slot0 + s
        hd, nkv, nh = self.head_dim, self.n_kv, self.n_heads
        h = F.embedding(ids, self.embed)  # [n, s, hidden]
        cos = self.cos[pos].unsqueeze(2)  # [n, s, 1, hd]
        sin = self.sin_signed[pos].unsqueeze(2)
        k_idx = torch.arange(end, device=self.device)
        q_idx = torch.arange(slot0, end, device=self.device)
        mask = (self.bias[:n, None, :end] == 0) & (k_idx[None, None, :] <= q_idx[None, :, None])
        # masked-out query slots (gap) attend to themselves so that no row of the softmax is empty
        mask[:, torch.arange(s), q_idx] = True
        mask = mask.unsqueeze(1)  # [n, 1, s, end]
        for li, L in enumerate(self.layers):
            y = L.qkv(_rms_norm(h, L.ln1)).view(n, s, nh + 2 * nkv, hd)
            qk = self._rotate(y[:, :, :nh + nkv], cos, sin)
            q = qk[:, :, :nh].transpose(1, 2)
            kc, vc = self.cache[2 * li, :n], self.cache[2 * li + 1, :n]
            kc[:, :, slot0:end] = qk[:, :, nh:].transpose(1, 2)
            vc[:, :, slot0:end] = y[:, :, nh + nkv:].transpose(1, 2)
            keys, values = kc[:, :, :end], vc[:, :, :end]
            if self.group > 1:
                keys = keys[:, :, None].expand(n, nkv, self.group, end, hd).reshape(n, nh, end, hd)
                values = values[:, :, None].expand(n, nkv, self.group, end, hd).reshape(n, nh, end, hd)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            h = h + L.o(o.transpose(1, 2).reshape(n, s, nh * hd))
            h = h + L.mlp(_rms_norm(h, L.ln2))
        self.cur = end
        if not want_logits:
            return None
        return self.lm_head(_rms_norm(h[:, -1], self.final_norm)).float()

    def _decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row (``[rows]``) at slot ``self.cur``; returns ``[rows, vocab]`` logits."""
        n = tokens.shape[0]
        slot = self.cur
        end = slot + 1
        hd, nkv, nh, group = self.head_dim, self.n_kv, self.n_heads, self.group
        h = F.embedding(tokens, self.embed)  # [n, hidden]
        cos = self.cos[pos].unsqueeze(1)  # [n, 1, hd]
        sin = self.sin_signed[pos].unsqueeze(1)
        bias = self.bias[:n, None, None, :end]
        for li, L in enumerate(self.layers):
            y = L.qkv(_rms_norm(h, L.ln1)).view(n, nh + 2 * nkv, hd)
            qk = self._rotate(y[:, :nh + nkv], cos, sin)
            kc, vc = self.cache[2 * li, :n], self.cache[2 * li + 1, :n]
            kc[:, :, slot] = qk[:, nh:]
            vc[:, :, slot] = y[:, nh + nkv:]
            # group the query heads by their key/value head: no repeated K/V
            att = torch.matmul(qk[:, :nh].view(n, nkv, group, hd), kc[:, :, :end].transpose(-1, -2))
            att = torch.softmax(att.mul_(self.scale).add_(bias), dim=-1, dtype=torch.float32).to(self.dtype)
            o = torch.matmul(att, vc[:, :, :end]).view(n, nh * hd)
            h = h + L.o(o)
            h = h + L.mlp(_rms_norm(h, L.ln2))
        self.cur = end
        return self.lm_head(_rms_norm(h, self.final_norm)).float()


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
