"""A KV-cache decoder for Llama-family causal LMs (Llama, Mistral without a sliding window, Qwen2).

It runs the model's own weights with its own forward pass, written for batched generation on CPU:
- one preallocated KV cache, no per-step concatenation; a row keeps its token at position p in slot p, so rows of
  different lengths share the batch and a row can leave (finished) or join (a new prompt) between two steps;
- a prefix shared by the prompts (the chat template head and system prompt) is run once and its keys/values copied;
- q/k/v and gate/up projections fused, and on CPU in fp32 all linear weights pre-packed once for oneDNN (the GEMM
  kernel then does not re-lay the weights out on every call: about twice as fast at decoding batch sizes);
- the LM head is applied to each row's last position only; decode attention groups query heads by key/value head.

Each row computes what it would compute alone (row-wise linear algebra, per-row positions and masks), so a row's
output does not depend on which rows share its batch. The module does only the model arithmetic; sampling, stopping
and scheduling live in ``sgpo.generation.engine``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_SUPPORTED = {"llama", "mistral", "qwen2"}
PREFILL_TOKENS = 1024  # positions per prefill forward; measured (benchmarks/prefill_memory.py) 1.31x lower peak than all rows at once, and faster


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
    """Batched prefill and decode over a preallocated KV cache whose rows come and go.

    Row ``i`` keeps the token at position ``p`` in slot ``p``, so rows of different lengths live side by side and a
    row can join (``add``) or leave (``drop``) at any step without touching the others:

    - ``reserve(rows, slots)`` allocates the cache (``[2 * layers, rows, kv_heads, slots, head_dim]``);
    - ``set_prefix(ids)`` runs a prefix shared by the prompts to come once; ``add`` copies its keys/values;
    - ``add(prompts)`` prefills new rows (appended after the live ones) and returns their next-token logits;
    - ``step(tokens)`` appends one token to every live row and returns the next logits;
    - ``drop(rows)`` removes rows by moving the last live rows into their places and returns, for each remaining row,
      its previous index.
    """

    def __init__(self, model, packed: bool | None = None, rows_hint: int = 16):
        cfg = model.config
        inner = model.model
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
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.cache: torch.Tensor | None = None
        self.prefix: torch.Tensor | None = None
        self.prefix_ids: tuple[int, ...] = ()
        self.n = 0

    # ---------------------------------------------------------------- setup
    def reserve(self, rows: int, slots: int) -> None:
        d = self.device
        # zeros, not empty: slots a row has not written are masked out, but must hold finite values (0 * NaN = NaN)
        self.cache = torch.zeros((2 * len(self.layers), rows, self.n_kv, slots, self.head_dim), dtype=self.dtype,
                                 device=d)
        self.length = torch.zeros(rows, dtype=torch.long, device=d)  # tokens in the cache, per row
        self.lengths: list[int] = [0] * rows
        self.n = 0
        self.prefix, self.prefix_ids = None, ()
        cos, sin = self.rotary(torch.zeros(1, dtype=self.dtype, device=d), torch.arange(slots, device=d)[None])
        half = self.head_dim // 2
        self.cos = cos[0].to(self.dtype)
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2): fold the sign into the table
        self.sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1).to(self.dtype)
        self.slot_idx = torch.arange(slots, device=d)

    def set_prefix(self, ids: Sequence[int]) -> None:
        """Compute the keys/values of ``ids`` (positions 0..P-1) once; ``add`` reuses them for prompts starting so."""
        ids = tuple(int(t) for t in ids)
        if not ids:
            self.prefix, self.prefix_ids = None, ()
            return
        spare = self.cache.shape[1] - 1  # computed in the last row, which holds nothing yet
        if self.n > spare:
            raise RuntimeError("set_prefix needs a free row")
        self._prefill(torch.tensor([ids], device=self.device), 0, rows=slice(spare, spare + 1), want_logits=False)
        self.prefix = self.cache[:, spare:spare + 1, :, :len(ids)].clone()
        self.prefix_ids = ids

    def release(self) -> None:
        self.cache = self.prefix = None

    # ---------------------------------------------------------------- rows
    def add(self, prompts: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
        """Prefill ``prompts`` into new rows ``n..n+k-1``; returns their next-token logits ``[k, vocab]``."""
        k = len(prompts)
        n0, n1 = self.n, self.n + k
        if n1 > self.cache.shape[1]:
            raise RuntimeError("no free rows")
        p = len(self.prefix_ids)
        if p and not all(len(x) > p and tuple(x[:p]) == self.prefix_ids for x in prompts):
            p = 0
        if p:
            self.cache[:, n0:n1, :, :p] = self.prefix
        rest = [len(x) - p for x in prompts]
        width = max(rest)
        ids = torch.full((k, width), pad_id, dtype=torch.long)
        for i, x in enumerate(prompts):  # right padding: a row's tokens sit at their own positions
            ids[i, :rest[i]] = torch.tensor(list(x[p:]), dtype=torch.long)
        last = torch.tensor([r - 1 for r in rest], device=self.device)
        # rows are independent: prefill them in groups of at most PREFILL_TOKENS positions, so that the attention
        # scores and MLP activations of a whole batch of long prompts never sit in memory at once
        step = max(1, PREFILL_TOKENS // width)
        logits = torch.cat([self._prefill(ids[i:i + step].to(self.device), p, rows=slice(n0 + i, min(n1, n0 + i + step)),
                                          last=last[i:i + step]) for i in range(0, k, step)])
        for i, x in enumerate(prompts):
            self.lengths[n0 + i] = len(x)
        self.length[n0:n1] = torch.tensor([len(x) for x in prompts], device=self.device)
        self.n = n1
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: ``tokens`` has one id per live row; returns ``[rows, vocab]`` logits."""
        n = self.n
        logits = self._decode(tokens.view(n), self.length[:n], max(self.lengths[:n]) + 1)
        self.length[:n] += 1
        for i in range(n):
            self.lengths[i] += 1
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
                self.lengths[h] = self.lengths[m]
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            filled = max(self.lengths[h] for h in holes)
            self.cache[:, dst, :, :filled] = self.cache[:, src, :, :filled]
            self.length[dst] = self.length[src]
        self.n = keep
        return order

    # ---------------------------------------------------------------- model
    def _rotate(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of the query and key heads together (``[..., heads, head_dim]``)."""
        half = self.head_dim // 2
        return qk * cos + torch.cat((qk[..., half:], qk[..., :half]), -1) * sin

    def _prefill(self, ids: torch.Tensor, slot0: int, rows: slice, last: torch.Tensor | None = None,
                 want_logits: bool = True):
        """Run ``ids`` (``[k, S]``, positions and slots ``slot0..slot0+S-1``) for cache ``rows``; the logits are
        those at index ``last`` of each row (default: the end)."""
        n, s = ids.shape
        end = slot0 + s
        hd, nkv, nh = self.head_dim, self.n_kv, self.n_heads
        h = F.embedding(ids, self.embed)  # [n, s, hidden]
        cos = self.cos[slot0:end, None, :]  # [s, 1, hd]
        sin = self.sin_signed[slot0:end, None, :]
        # causal: the query at slot q sees slots <= q (padding sits after a row's tokens and is never seen)
        mask = (self.slot_idx[None, :end] <= self.slot_idx[slot0:end, None])[None, None]  # [1, 1, s, end]
        for li, L in enumerate(self.layers):
            y = L.qkv(_rms_norm(h, L.ln1)).view(n, s, nh + 2 * nkv, hd)
            qk = self._rotate(y[:, :, :nh + nkv], cos, sin)
            q = qk[:, :, :nh].transpose(1, 2)
            kc, vc = self.cache[2 * li, rows], self.cache[2 * li + 1, rows]
            kc[:, :, slot0:end] = qk[:, :, nh:].transpose(1, 2)
            vc[:, :, slot0:end] = y[:, :, nh + nkv:].transpose(1, 2)
            keys, values = kc[:, :, :end], vc[:, :, :end]
            if self.group > 1:
                keys = keys[:, :, None].expand(n, nkv, self.group, end, hd).reshape(n, nh, end, hd)
                values = values[:, :, None].expand(n, nkv, self.group, end, hd).reshape(n, nh, end, hd)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            h = h + L.o(o.transpose(1, 2).reshape(n, s, nh * hd))
            h = h + L.mlp(_rms_norm(h, L.ln2))
        if not want_logits:
            return None
        h = h[:, -1] if last is None else h[torch.arange(n, device=self.device), last]
        return self.lm_head(_rms_norm(h, self.final_norm)).float()

    def _decode(self, tokens: torch.Tensor, pos: torch.Tensor, end: int) -> torch.Tensor:
        """One token per row (``[rows]``) at its position ``pos`` (= its slot); returns ``[rows, vocab]`` logits."""
        n = tokens.shape[0]
        hd, nkv, nh, group = self.head_dim, self.n_kv, self.n_heads, self.group
        h = F.embedding(tokens, self.embed)  # [n, hidden]
        cos = self.cos[pos].unsqueeze(1)  # [n, 1, hd]
        sin = self.sin_signed[pos].unsqueeze(1)
        rows = torch.arange(n, device=self.device)
        bias = torch.zeros((n, end), dtype=self.dtype, device=self.device)
        bias.masked_fill_(self.slot_idx[None, :end] > pos[:, None], float("-inf"))
        bias = bias.view(n, 1, 1, end)
        for li, L in enumerate(self.layers):
            y = L.qkv(_rms_norm(h, L.ln1)).view(n, nh + 2 * nkv, hd)
            qk = self._rotate(y[:, :nh + nkv], cos, sin)
            kc, vc = self.cache[2 * li, :n], self.cache[2 * li + 1, :n]
            kc[rows, :, pos] = qk[:, nh:]
            vc[rows, :, pos] = y[:, nh + nkv:]
            # group the query heads by their key/value head: no repeated K/V
            att = torch.matmul(qk[:, :nh].view(n, nkv, group, hd), kc[:, :, :end].transpose(-1, -2))
            att = torch.softmax(att.mul_(self.scale).add_(bias), dim=-1, dtype=torch.float32).to(self.dtype)
            o = torch.matmul(att, vc[:, :, :end]).view(n, nh * hd)
            h = h + L.o(o)
            h = h + L.mlp(_rms_norm(h, L.ln2))
        return self.lm_head(_rms_norm(h, self.final_norm)).float()
