"""Native bidirectional transformer covering LLaDA and Dream, with explicit KV caches.

One module, two families, chosen by :class:`ModelConfig`:

* LLaDA-8B-Instruct (research/backbones.md §1): MHA, no biases, RMSNorm eps 1e-5, SwiGLU
  (``ff_proj`` is the gate), RoPE theta 5e5 rotated in fp32, untied head, logits aligned
  (row i predicts token i).
* Dream-v0-Instruct-7B (§2): Qwen2 shape, GQA, q/k/v biases, RoPE theta 1e6 rotated in the
  activation dtype, logits shifted: raw row i predicts token i+1.  **The shift is undone
  here**: every logits tensor this module returns is aligned, the row for position ``p``
  predicts the token at ``p``.  For Dream that row is computed from the hidden state at
  ``p - 1`` (position 0 reuses its own row, the official convention), so a call that wants a
  prediction for ``p`` must also process ``p - 1``; rows whose ``p - 1`` was neither processed
  nor is 0 come back as NaN rather than silently wrong.

Cache convention: keys are cached **after** RoPE, in slot ``p`` for absolute position ``p``
(slot index == original absolute position, always).  A cache entry therefore never needs
re-rotation, any subset of slots can be attended in any order, and a "window" is just a slot
range.  See :class:`KVCache`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "BackboneSpec", "Transformer", "KVCache", "Backbone"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters (family-independent names)."""

    family: str  # "llada" or "dream"
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    max_length: int = 4096

    def __post_init__(self):
        if self.family not in ("llada", "dream"):
            raise ValueError(f"family must be 'llada' or 'dream', got {self.family!r}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must divide by n_heads ({self.n_heads}) and n_heads by "
                f"n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def shifted_logits(self) -> bool:
        """Dream's raw logits at row i predict token i+1 (research/backbones.md §2.3)."""
        return self.family == "dream"

    @property
    def rope_fp32(self) -> bool:
        """LLaDA rotates q/k in fp32 (rope_full_precision); Dream/HF rotate in the act dtype."""
        return self.family == "llada"


@dataclass(frozen=True)
class BackboneSpec:
    """The only home of token ids: mask, EOS-like ids, pad, vocabulary size, max length."""

    name: str
    family: str
    mask_id: int
    eos_ids: tuple[int, ...]  # every id that ends an answer (EOS first, then EoT/im_end)
    pad_id: int
    vocab_size: int
    max_length: int
    bos_id: Optional[int] = None
    chat_template: Optional[str] = field(default=None, repr=False)

    @property
    def eos_id(self) -> int:
        """The id used to pad answers (LLaDA/Dream fill unused budget with it)."""
        return self.eos_ids[0]


class RMSNorm(nn.Module):
    """LlamaRMSNorm order: normalise in fp32, cast back, then multiply by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """fp32 RoPE inverse frequencies 1 / theta^(2j/head_dim), j < head_dim/2."""
    ar = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device)
    return 1.0 / (cfg.rope_theta ** (ar / cfg.head_dim))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd, kv = cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, hd


class Transformer(nn.Module):
    """Embedding, ``n_layers`` pre-norm blocks, final norm, untied head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        # Both official models keep the RoPE frequencies in fp32 whatever the weight dtype.  A plain
        # ``model.to(torch.bfloat16)`` would round them to bf16 (~0.2% error, i.e. radians of phase
        # error at relative distances in the thousands), and ``to_empty()`` leaves them
        # uninitialised: recompute them in fp32 (on the CPU, as at construction) after any move/cast.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.cfg, device="cpu").to(self.inv_freq.device)
        return self

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        ang = positions.float()[..., None] * self.inv_freq  # (B, T, hd/2), fp32
        emb = torch.cat((ang, ang), dim=-1)[:, None]  # (B, 1, T, hd)
        cos, sin = emb.cos(), emb.sin()
        if not self.cfg.rope_fp32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def _apply_rope(self, x, cos, sin):
        if self.cfg.rope_fp32:
            return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                cache: Optional["KVCache"] = None, write: bool = False,
                slot_mask: Optional[torch.Tensor] = None, write_row: Optional[int] = None) -> torch.Tensor:
        """Hidden states (B, T, d) after the final norm.

        ids, positions: (B, T).  key_mask: (B, T) bool, False marks padding tokens that no query
        may attend to.  cache: when given, queries also attend to the cache's filled slots;
        ``write`` stores this call's K/V into slots ``positions`` (in place) *before* attending,
        otherwise cache slots at this call's positions are hidden so each position is seen once.
        slot_mask: (B or 1, S) bool restricting which cache slots may be attended (a window).
        write_row: with ``write=False`` and a batch-1 cache, store row ``write_row``'s K/V in slots
        ``positions`` after the call has read the cache (rows that differ read the cache, and the
        one row that is the buffer's current state updates it: AsyncLane's speculative lanes).
        """
        B, T = ids.shape
        x = self.embed(ids)
        cos, sin = self._rope(positions, x.dtype)
        if key_mask is None:
            key_mask = torch.ones(B, T, dtype=torch.bool, device=ids.device)
        if cache is not None:
            cache_mask = cache.attend_mask(positions, key_mask, write, slot_mask)  # (B, S)
        for li, layer in enumerate(self.layers):
            h = layer.attn_norm(x)
            q = layer.q_proj(h).view(B, T, layer.n_heads, layer.hd).transpose(1, 2)
            k = layer.k_proj(h).view(B, T, layer.n_kv, layer.hd).transpose(1, 2)
            v = layer.v_proj(h).view(B, T, layer.n_kv, layer.hd).transpose(1, 2)
            q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
            if cache is None:
                keys, vals, mask = k, v, key_mask
            elif write:
                cache.write(li, positions, key_mask, k, v)
                keys, vals, mask = cache.k[li], cache.v[li], cache_mask
            else:
                ck, cv = cache.k[li], cache.v[li]
                if ck.shape[0] != B:  # shared-prefix broadcast: one cached row serves all lanes
                    ck, cv = ck.expand(B, -1, -1, -1), cv.expand(B, -1, -1, -1)
                keys, vals = torch.cat((ck, k), dim=2), torch.cat((cv, v), dim=2)
                mask = torch.cat((cache_mask, key_mask), dim=1)
                if write_row is not None:  # the reads above are copies: the call sees the cache as it was
                    r = slice(write_row, write_row + 1)
                    cache.write(li, positions[r], key_mask[r], k[r], v[r])
            rep = layer.n_heads // layer.n_kv
            if rep > 1:
                keys, vals = keys.repeat_interleave(rep, dim=1), vals.repeat_interleave(rep, dim=1)
            att = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask[:, None, None, :])
            x = x + layer.o_proj(att.transpose(1, 2).reshape(B, T, -1))
            h = layer.mlp_norm(x)
            x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
        return self.norm(x)


class KVCache:
    """Per-layer post-RoPE K/V in absolute-position slots, with explicit operations.

    ``k[l], v[l]``: (B, n_kv, S, head_dim); ``filled``: (B, S) bool.  Operations:

    * written by ``Backbone.forward(..., cache=c, write=True)``: scatter-writes K/V at the
      call's positions (prefix cache: write the prompt; dual cache: rewrite a block in place;
      indexed cache: any positions);
    * :meth:`invalidate` drops slots (they are no longer attended until rewritten);
    * windows: pass ``slot_mask=cache.window(lo, hi)`` to a forward to attend only that range;
    * shared-prefix broadcast: a batch-1 cache serves a B-row read-only call without copies.
    """

    def __init__(self, n_layers: int, batch: int, n_kv: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, n_kv, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.filled = torch.zeros(batch, length, dtype=torch.bool, device=device)

    @property
    def length(self) -> int:
        return self.filled.shape[1]

    def _check(self, positions: torch.Tensor):
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.length):
            raise IndexError(f"cache positions must lie in [0, {self.length}), got "
                             f"[{int(positions.min())}, {int(positions.max())}]")

    def attend_mask(self, positions, key_mask, write, slot_mask):
        self._check(positions)
        B = positions.shape[0]
        filled = self.filled.expand(B, -1) if self.filled.shape[0] != B else self.filled
        bi, ti = key_mask.nonzero(as_tuple=True)
        mask = filled.clone()
        if write:
            if self.filled.shape[0] != B:
                raise ValueError(f"cannot write a batch of {B} rows into a cache of {self.filled.shape[0]}")
            mask[bi, positions[bi, ti]] = True
        else:  # hide cached copies of the positions processed now: each position is seen once
            mask[bi, positions[bi, ti]] = False
        if slot_mask is not None:
            mask = mask & slot_mask
        return mask

    def write(self, layer: int, positions, key_mask, k, v):
        """Store this call's post-RoPE K/V (B, n_kv, T, hd) in slots ``positions``; pads skipped."""
        bi, ti = key_mask.nonzero(as_tuple=True)
        pi = positions[bi, ti]
        if layer == 0:
            self.filled[bi, pi] = True
        self.k[layer][bi, :, pi] = k.transpose(1, 2)[bi, ti]
        self.v[layer][bi, :, pi] = v.transpose(1, 2)[bi, ti]

    def invalidate(self, lo: int = 0, hi: Optional[int] = None, rows: Optional[Sequence[int]] = None):
        """Mark slots [lo, hi) as empty (for ``rows``, default all)."""
        sel = slice(None) if rows is None else list(rows)
        self.filled[sel, lo:hi] = False

    def window(self, lo: int, hi: int) -> torch.Tensor:
        """A (1, S) slot mask selecting absolute positions [lo, hi)."""
        ar = torch.arange(self.length, device=self.filled.device)
        return ((ar >= lo) & (ar < hi))[None]


class Backbone:
    """A loaded model: :class:`Transformer` + :class:`BackboneSpec` (+ tokenizer when known)."""

    def __init__(self, model: Transformer, spec: BackboneSpec, tokenizer=None):
        self.model, self.spec, self.tokenizer = model, spec, tokenizer
        self.cfg = model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    def new_cache(self, batch: int, length: int) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, batch, c.n_kv_heads, length, c.head_dim, self.dtype, self.device)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Aligned logits (B, L, V) of a plain full bidirectional forward."""
        return self.forward(input_ids)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                write: bool = False, slot_mask: Optional[torch.Tensor] = None,
                predict: Optional[torch.Tensor] = None, write_row: Optional[int] = None) -> torch.Tensor:
        """Aligned logits for the processed tokens.

        ids, positions (default 0..T-1), key_mask: (B, T).  Returns (B, T, V) where row j is the
        prediction for the token at ``positions[:, j]`` (Dream's shift undone).  ``predict``
        (B, P) column indices into this call's tokens: only those rows go through the head.
        """
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        if write_row is not None and (cache is None or write or not 0 <= write_row < ids.shape[0]):
            raise ValueError(f"write_row={write_row} needs a cache, write=False and a row of the {ids.shape[0]}")
        hidden = self.model(ids, positions, key_mask, cache, write, slot_mask, write_row)
        if self.cfg.shifted_logits:
            hidden = self._shift(hidden, positions, key_mask)
        if predict is not None:
            hidden = hidden.gather(1, predict[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.model.head(hidden)

    @staticmethod
    def _shift(hidden: torch.Tensor, positions: torch.Tensor, key_mask=None) -> torch.Tensor:
        """Row for position p <- hidden of position p-1 in the same call (Dream, §2.3).

        Only real (non-padding) tokens are sources; position 0 keeps its own row (official).
        """
        B, T = positions.shape
        if key_mask is None and T > 1 and bool((positions[:, 1:] - positions[:, :-1] == 1).all()):
            # contiguous fast path: the official concat(logits[:, :1], logits[:, :-1])
            out = torch.cat((hidden[:, :1], hidden[:, :-1]), dim=1)
            if bool((positions[:, 0] != 0).any()):
                out[:, 0][positions[:, 0] != 0] = float("nan")
            return out
        match = positions[:, None, :] == (positions[:, :, None] - 1)  # (B, T, T): [j, i] i is p_j-1
        if key_mask is not None:
            match &= key_mask[:, None, :]
        has = match.any(-1)
        src = match.float().argmax(-1)
        src = torch.where(positions == 0, torch.arange(T, device=positions.device).expand(B, T), src)
        out = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))
        bad = ~has & (positions != 0)
        if bool(bad.any()):
            out = out.masked_fill(bad[..., None], float("nan"))
        return out

    def count_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
