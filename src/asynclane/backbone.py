"""Native bidirectional transformer covering LLaDA and Dream, with a static KV cache.

One module, two families, chosen by :class:`ModelConfig`:

* LLaDA-8B-Instruct (docs/research/backbones.md §1): MHA, no biases, RMSNorm eps 1e-5, SwiGLU
  (``ff_proj`` is the gate), RoPE theta 5e5 rotated in fp32, untied head, logits aligned
  (row i predicts token i).
* Dream-v0-Instruct-7B (§2): Qwen2 shape, GQA, q/k/v biases, RoPE theta 1e6 rotated in the
  activation dtype, logits shifted: raw row i predicts token i+1.  **The shift is undone
  here**: every logits tensor this module returns is aligned, the row for position ``p``
  predicts the token at ``p``.  For Dream that row is computed from the hidden state at
  ``p - 1`` (position 0 reuses its own row, the official convention), so a call that wants a
  prediction for ``p`` must also process ``p - 1``: :meth:`Backbone.step` adds it when the
  caller names the predictions it wants; rows whose ``p - 1`` is not in a call come back as NaN
  rather than silently wrong.

Weights: q/k/v are one matmul (``qkv``: q rows, then k, then v) and gate/up another
(``gate_up``: gate rows, then up), fused at load time from the official parameter names
(:func:`asynclane.checkpoint.native_views` gives the per-matrix views).  RMSNorm runs as one fused
kernel and multiplies the weight after the cast back, LlamaRMSNorm's rounding order.  RoPE
cos/sin are a table built once per maximum length (fp32) and gathered by position.

Cache (:class:`KVCache`): allocated once per generate call, never re-allocated in the loop;
layer ``l`` holds post-RoPE K and V in one tensor ``kv[l]`` of shape (rows, S + 1, 2 n_kv, hd)
(slot ``S`` is a sink for padding tokens and is never attended).  A call writes its fresh K/V
into their slots first (``index_copy_`` / ``index_put_`` with a tensor index, no ``nonzero``)
and then attends the cache's slots in place: no concatenation of cache and fresh K/V, GQA by
``enable_gqa`` instead of copies, and no attention mask at all when every slot is filled (the
host knows: it tracks which slots were written), so SDPA may use its flash kernel.

Two entry points:

* :meth:`Backbone.forward` (general): explicit positions, slot == absolute position, per-row
  scatter writes, windows, read-only calls.  The reference every cache test checks against an
  HF oracle (and the step against it).
* :meth:`Backbone.step` (the decode seam samplers use): the buffer plus a column range (or a
  host list of columns) to process, slot == buffer column, positions from the cache's table,
  bounds checked on Python ints before the call, no host-device sync inside.  With a *lane*
  cache (``new_cache(1, S, lanes=R)``) a call carries up to R rows that differ: each row
  attends the shared state plus its own fresh K/V, and row 0 (the buffer's own row) is what
  the cache keeps.

Neither entry point syncs with the device inside a forward (no ``.item()``, ``nonzero``,
``bool(t)`` or data-dependent shapes); ``Backbone.compile()`` wraps the layer stack in
``torch.compile`` (``fullgraph=True``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "BackboneSpec", "Transformer", "KVCache", "Backbone"]

_FUSED_RMS = getattr(torch.ops.aten, "_fused_rms_norm", None)


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
        """Dream's raw logits at row i predict token i+1 (docs/research/backbones.md §2.3)."""
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
    """LlamaRMSNorm order: normalise in fp32, cast back, then multiply by the weight.

    The normalisation is one fused kernel (``aten::_fused_rms_norm``: fp32 math, one rounding
    back to the input dtype, bit-identical to the unfused expression on CPU); the weight is
    applied after the cast, as the official code does.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FUSED_RMS is not None:
            return self.weight * _FUSED_RMS(x, [x.shape[-1]], None, self.eps)[0]
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """fp32 RoPE inverse frequencies 1 / theta^(2j/head_dim), j < head_dim/2."""
    ar = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device)
    return 1.0 / (cfg.rope_theta ** (ar / cfg.head_dim))


def rope_table(cfg: ModelConfig, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (max_length, head_dim) cos and *signed* sin: ``x*cos + roll(x, hd/2)*sin`` is RoPE.

    The angle of position p is ``p * inv_freq`` in fp32, duplicated over both halves (HF's
    ``cat((freqs, freqs))``); the sin table's first half is negated, so that the half rotation
    ``cat(-x2, x1) * sin`` becomes ``cat(x2, x1) * signed_sin`` (negation is exact).
    """
    ang = torch.arange(cfg.max_length, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq
    emb = torch.cat((ang, ang), dim=-1)
    sin = emb.sin()
    half = cfg.head_dim // 2
    return emb.cos(), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


class Layer(nn.Module):
    """One pre-norm block with fused q/k/v and gate/up weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.qkv = nn.Linear(d, d + 2 * kv, bias=cfg.qkv_bias)  # rows: q | k | v
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.mlp_hidden, bias=False)  # rows: gate | up
        self.down_proj = nn.Linear(cfg.mlp_hidden, d, bias=False)


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
        cos, sin = rope_table(cfg, self.inv_freq)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # heads of the fused q|k|v output seen as groups of n_kv heads: q groups, then k, then v
        self.groups = cfg.n_heads // cfg.n_kv_heads + 2
        self._layers_fn = self.run_layers  # replaced by a compiled version (Backbone.compile)

    def _apply(self, fn, recurse=True):
        # Both official models keep the RoPE frequencies in fp32 whatever the weight dtype.  A plain
        # ``model.to(torch.bfloat16)`` would round them to bf16 (~0.2% error, i.e. radians of phase
        # error at relative distances in the thousands), and ``to_empty()`` leaves them
        # uninitialised: recompute them and the table in fp32 (on the CPU, as at construction).
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            dev = self.inv_freq.device
            self.inv_freq = rope_inv_freq(self.cfg, device="cpu")
            cos, sin = rope_table(self.cfg, self.inv_freq)
            self.inv_freq, self.rope_cos, self.rope_sin = self.inv_freq.to(dev), cos.to(dev), sin.to(dev)
        return self

    # ------------------------------------------------------------------ pieces of a call

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, groups, 1, hd) cos and signed sin for the fused q|k|v output: the v group gets
        cos 1, sin 0 (so one elementwise pass rotates q and k and leaves v exactly as it was)."""
        B, T = positions.shape
        hd = self.cfg.head_dim
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, hd) fp32
        if not self.cfg.rope_fp32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        g = self.groups - 1
        ones = torch.ones(1, 1, 1, hd, dtype=cos.dtype, device=cos.device).expand(B, T, 1, hd)
        cos = torch.cat((cos[:, :, None].expand(B, T, g, hd), ones), dim=2)
        sin = torch.cat((sin[:, :, None].expand(B, T, g, hd), torch.zeros_like(ones)), dim=2)
        return cos[:, :, :, None], sin[:, :, :, None]

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                   kv: Optional[list], write: Optional[tuple], restore: bool, spread: int) -> torch.Tensor:
        """The layer stack; pure tensor code (no host sync), the unit ``torch.compile`` wraps.

        x: (B, T, d) embeddings; cos/sin from :meth:`rope`; mask: None or a bool mask broadcastable
        to (B, heads, T, keys).  kv: None (keys are this call's tokens) or the cache's per-layer
        (R, S + 1, 2 n_kv, hd) tensors, of which slots [0, S) are attended.  write: how this call's
        K/V enter their slots first: ``("copy", idx)`` (idx (T,): the same slots in every row,
        ``index_copy_``), ``("put", rows, idx)`` (idx (B, T): per-row slots, ``index_put_``) or
        ``("rows", rows, idx, spread_to, spread_from, dense)`` (call row i is cache row ``rows[i]``
        (B,) and attends that row only, its slots idx (B, T); after the layer cache rows ``spread_to``
        (M,) take the fresh K/V of call rows ``spread_from`` (M,) at those rows' slots; M may be 0;
        ``dense``: ``rows`` is every cache row in order, so the keys are the cache itself, no gather).
        restore: put the overwritten slots back after the call (a read-only call).  spread: > 0 for
        a lane call: after the layer, rows 1..R-1 take row 0's fresh K/V (the cache keeps row 0).
        """
        cfg = self.cfg
        B, T, d = x.shape
        H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        gqa = H != Hkv
        for li, layer in enumerate(self.layers):
            h = layer.attn_norm(x)
            qkv = layer.qkv(h).view(B, T, self.groups, Hkv, hd)
            # LLaDA: cos/sin are fp32, so type promotion rotates in fp32 (bf16 -> fp32 is exact: the same
            # values as an explicit .float(), one kernel fewer); Dream: cos/sin are in the act dtype
            r = (qkv * cos + qkv.roll(hd // 2, dims=-1) * sin).to(x.dtype).view(B, T, H + 2 * Hkv, hd)
            q, fresh = r[:, :, :H].transpose(1, 2), r[:, :, H:]  # fresh: (B, T, 2 n_kv, hd)
            if kv is None:
                keys = fresh
            else:
                c = kv[li]
                saved = None
                if write[0] == "copy":
                    if restore:
                        saved = c.index_select(1, write[1])
                    target = c if c.shape[0] == B else c[:B]
                    target.index_copy_(1, write[1], fresh)
                    keys = c[:, :-1] if c.shape[0] == B else c[:B, :-1]
                elif write[0] == "put":
                    if restore:
                        saved = c[write[1], write[2]]
                    c.index_put_((write[1], write[2]), fresh)
                    keys = c[:, :-1] if c.shape[0] == B else c[:B, :-1]
                else:  # "rows": each call row attends its own cache row (a gather: rows may be any subset)
                    at = write[1][:, None].expand(B, T)
                    if restore:
                        saved = c[at, write[2]]
                    c.index_put_((at, write[2]), fresh)
                    keys = c[:, :-1] if write[5] else c.index_select(0, write[1])[:, :-1]
            k, v = keys[:, :, :Hkv].transpose(1, 2), keys[:, :, Hkv:].transpose(1, 2)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            if kv is not None:
                if saved is not None:
                    if write[0] == "copy":
                        c.index_copy_(1, write[1], saved)
                    elif write[0] == "put":
                        c.index_put_((write[1], write[2]), saved)
                    else:
                        c.index_put_((write[1][:, None].expand(B, T), write[2]), saved)
                elif write[0] == "rows":
                    to, frm = write[3], write[4]
                    c.index_put_((to[:, None].expand(-1, T), write[2].index_select(0, frm)), fresh.index_select(0, frm))
                elif spread:
                    c[1:].index_copy_(1, write[1], fresh[:1].expand(c.shape[0] - 1, -1, -1, -1))
            x = x + layer.o_proj(att.transpose(1, 2).reshape(B, T, d))
            h = layer.mlp_norm(x)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down_proj(F.silu(gate) * up)
        return self.norm(x)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                cache: Optional["KVCache"] = None, write: bool = False,
                slot_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states (B, T, d) after the final norm (the general call; see :meth:`Backbone.forward`).

        key_mask: (B, T) bool, False marks padding tokens that no query may attend to (None: no
        padding, and without a cache no mask reaches the attention kernel).
        """
        if cache is not None:
            return self._general_cached(ids, positions, key_mask, cache, write, slot_mask)
        x = self.embed(ids)
        cos, sin = self.rope(positions, x.dtype)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return self._layers_fn(x, cos, sin, mask, None, None, False, 0)

    def _general_cached(self, ids, positions, key_mask, cache, write, slot_mask):
        B, T = ids.shape
        S = cache.length
        if cache.batch != B:
            raise ValueError(f"a general call of {B} rows needs a cache of batch {B}, got {cache.batch} (rows "
                             "that share one sequence: a lane cache and Backbone.step)")
        # checked on the device (no host read: raises at once on a CPU, a device-side assert elsewhere)
        torch._assert_async(((positions >= 0) & (positions < S)).all(), f"cache positions must lie in [0, {S})")
        slots = positions if key_mask is None else torch.where(key_mask, positions, S)  # pads -> the sink
        rows = torch.arange(B, device=ids.device)[:, None].expand(B, T)
        own = torch.zeros_like(cache._filled).index_put_((rows, slots), torch.ones_like(slots, dtype=torch.bool))
        # cached slots (inside the window) that this call does not rewrite, and the call's own K/V
        mask = cache._filled[:, :-1] if slot_mask is None else cache._filled[:, :-1] & slot_mask
        mask = mask | own[:, :-1]
        x = self.embed(ids)
        cos, sin = self.rope(positions, x.dtype)
        hidden = self._layers_fn(x, cos, sin, mask[:, None, None, :], cache.kv, ("put", rows, slots), not write, 0)
        if write:
            cache._filled |= own
            cache._tokens.index_put_((rows, slots), ids)
            cache._ragged = True
        return hidden


class KVCache:
    """Per-layer post-RoPE K/V in slots, allocated once; the host tracks which slots are filled.

    ``kv[l]``: (rows, S + 1, 2 n_kv, hd) (K heads then V heads; slot S is a sink for padding
    tokens, never attended); ``k[l]`` / ``v[l]``: (rows, n_kv, S, hd) views.  ``filled``: (rows, S)
    bool; ``tokens``: (rows, S) the token id each slot's K/V were computed from (-1: empty), so a
    sampler asks the cache what is stale (:meth:`stale`) instead of tracking it.  ``positions``:
    (rows, S) the RoPE position of each buffer column (the :meth:`Backbone.step` convention:
    slot == column; left padding restarts positions at each row's first real token).

    Operations: writes by :meth:`Backbone.forward` (slot == position) or :meth:`Backbone.step`
    (slot == column); :meth:`invalidate` drops slots; ``slot_mask=cache.window(lo, hi)`` restricts
    a general forward to a slot range.  A *lane* cache (``lanes=R``) keeps one state in R identical rows so
    that up to R differing rows can each attend it plus their own fresh K/V without copies.
    """

    def __init__(self, n_layers: int, batch: int, n_kv: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, key_mask: Optional[torch.Tensor] = None,
                 lanes: int = 1):
        if lanes > 1 and batch != 1:
            raise ValueError(f"a lane cache holds one sequence (batch 1), got batch={batch}")
        rows = max(batch, lanes)
        self.batch, self.lanes, self.n_kv = batch, lanes, n_kv
        self.kv = [torch.zeros(rows, length + 1, 2 * n_kv, head_dim, dtype=dtype, device=device)
                   for _ in range(n_layers)]
        self._filled = torch.zeros(rows, length + 1, dtype=torch.bool, device=device)
        self._tokens = torch.full((rows, length + 1), -1, dtype=torch.long, device=device)
        if key_mask is not None:
            if tuple(key_mask.shape) != (batch, length):
                raise ValueError(f"key_mask must be ({batch}, {length}), got {tuple(key_mask.shape)}")
            self.valid = key_mask.to(device=device, dtype=torch.bool)
            self.positions = (self.valid.long().cumsum(1) - 1).clamp(min=0)
        else:
            self.valid = None
            self.positions = torch.arange(length, device=device)[None].expand(rows, length)
        # host mirror: slot s filled in every row (exact while the cache is not ragged)
        self._host = bytearray(length)
        self._ragged = key_mask is not None  # rows may differ: the device mask is the truth

    @property
    def length(self) -> int:
        return len(self._host)

    @property
    def rows(self) -> int:
        return self.kv[0].shape[0] if self.kv else self._filled.shape[0]

    @property
    def filled(self) -> torch.Tensor:
        return self._filled[: self.batch, :-1]

    @property
    def tokens(self) -> torch.Tensor:
        return self._tokens[: self.batch, :-1]

    @property
    def k(self) -> list:
        return [t[: self.batch, :-1, : self.n_kv].transpose(1, 2) for t in self.kv]

    @property
    def v(self) -> list:
        return [t[: self.batch, :-1, self.n_kv:].transpose(1, 2) for t in self.kv]

    def stale(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S) bool: slots whose K/V were computed from another token than ``x`` holds (or none)."""
        return self.tokens != x

    def invalidate(self, lo: int = 0, hi: Optional[int] = None, rows: Optional[Sequence[int]] = None):
        """Mark slots [lo, hi) as empty (for ``rows``, default all)."""
        hi = self.length if hi is None else hi
        sel = slice(None) if rows is None else list(rows)
        self._filled[sel, lo:hi] = False
        self._tokens[sel, lo:hi] = -1
        self._host[lo:hi] = bytes(len(self._host[lo:hi]))
        if rows is not None:
            self._ragged = True

    def window(self, lo: int, hi: int) -> torch.Tensor:
        """A (1, S) slot mask selecting absolute positions [lo, hi)."""
        ar = torch.arange(self.length, device=self._filled.device)
        return ((ar >= lo) & (ar < hi))[None]

    def full(self, cols: "Cols" = (0, 0)) -> bool:
        """Host answer, no sync: is every slot filled in every row, counting ``cols`` (``(lo, hi)`` or a
        list of slots) as filled?"""
        if self._ragged:
            return False
        h = self._host
        if isinstance(cols, tuple):
            lo, hi = cols
            return h.count(0, 0, lo) == 0 and h.count(0, max(lo, hi)) == 0
        return set(i for i, b in enumerate(h) if not b) <= set(cols)

    def mark_filled(self, cols: "Cols") -> None:
        """Host mirror of a write of ``cols`` (``(lo, hi)`` or a list) in every row."""
        if isinstance(cols, tuple):
            self._host[cols[0]:cols[1]] = b"\x01" * (cols[1] - cols[0])
        else:
            for c in cols:
                self._host[c] = 1


Cols = Union[tuple, Sequence[int]]


class Backbone:
    """A loaded model: :class:`Transformer` + :class:`BackboneSpec` (+ tokenizer when known)."""

    def __init__(self, model: Transformer, spec: BackboneSpec, tokenizer=None):
        self.model, self.spec, self.tokenizer = model, spec, tokenizer
        self.cfg = model.cfg
        self.compiled = False  # compile(): the layer stack runs under torch.compile

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    def new_cache(self, batch: int, length: int, key_mask: Optional[torch.Tensor] = None,
                  lanes: int = 1) -> KVCache:
        """A static cache of ``length`` slots.  key_mask (batch, length): the buffer's padding, for
        :meth:`step` (positions restart at each row's first real token).  lanes: rows for a lane
        call (:meth:`step` with up to ``lanes`` differing rows over one sequence)."""
        c = self.cfg
        if length > c.max_length:
            raise ValueError(f"a cache of {length} slots exceeds the model's max_length {c.max_length}")
        cache = KVCache(c.n_layers, batch, c.n_kv_heads, length, c.head_dim, self.dtype, self.device,
                        key_mask=key_mask, lanes=lanes)
        if self.compiled:  # the compiled graph mutates the cache in
            for t in cache.kv:  # place; a static address lets CUDA graphs keep it instead of copying it
                torch._dynamo.mark_static_address(t, guard=False)
        return cache

    def compile(self, mode: Optional[str] = "reduce-overhead", backend: str = "inductor",
                dynamic: Optional[bool] = None) -> "Backbone":
        """Run the layer stack under ``torch.compile(fullgraph=True)`` (``model.compile=true``).

        ``mode="reduce-overhead"`` replays CUDA graphs on a GPU.  Shapes: a call's shapes are set on
        the host (no data-dependent shape inside), and ``dynamic=None`` lets the compiler recompile
        once with symbolic lengths when a length changes (prompt lengths, a prefix step's query
        length), instead of once per length.  ``backend="eager"`` only traces (tests).
        """
        kw = {"mode": mode} if backend == "inductor" and mode else {}
        self.model._layers_fn = torch.compile(self.model.run_layers, backend=backend, fullgraph=True,
                                              dynamic=dynamic, **kw)
        self.compiled = True
        return self

    def uncompile(self) -> "Backbone":
        """Back to the eager layer stack."""
        self.model._layers_fn, self.compiled = self.model.run_layers, False
        return self

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Aligned logits (B, L, V) of a plain full bidirectional forward."""
        return self.forward(input_ids)

    # ------------------------------------------------------------------ the general call

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                write: bool = False, slot_mask: Optional[torch.Tensor] = None,
                predict: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Aligned logits for the processed tokens (general slots: slot == absolute position).

        ids, positions (default 0..T-1), key_mask: (B, T).  Returns (B, T, V) where row j is the
        prediction for the token at ``positions[:, j]`` (Dream's shift undone).  ``predict``
        (B, P) column indices into this call's tokens: only those rows go through the head.

        cache: queries also attend to the cache's filled slots; ``write`` stores this call's K/V
        into slots ``positions`` (padding skipped) before attending; otherwise the call is
        read-only: the cached copies of its positions are hidden (each position is seen once) and
        the cache is left as it was.  slot_mask: (B or 1, S) bool restricting which cache slots may
        be attended (a window).
        """
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        m = self.model
        hidden = m(ids, positions, key_mask, cache, write, slot_mask)
        if self.cfg.shifted_logits:
            hidden = self._shift(hidden, positions, key_mask)
        if predict is not None:
            hidden = hidden.gather(1, predict[..., None].expand(-1, -1, hidden.shape[-1]))
        return m.head(hidden)

    @staticmethod
    def _shift(hidden: torch.Tensor, positions: torch.Tensor, key_mask=None) -> torch.Tensor:
        """Row for position p <- hidden of position p-1 in the same call (Dream, §2.3); no host sync.

        Only real (non-padding) tokens are sources; position 0 keeps its own row (official); a row
        whose p-1 is not in the call is NaN.
        """
        B, T = positions.shape
        match = positions[:, None, :] == (positions[:, :, None] - 1)  # (B, T, T): [j, i] i is p_j-1
        if key_mask is not None:
            match &= key_mask[:, None, :]
        has = match.any(-1)
        src = match.float().argmax(-1)
        zero = positions == 0
        src = torch.where(zero, torch.arange(T, device=positions.device).expand(B, T), src)
        out = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))
        return out.masked_fill((~has & ~zero)[..., None], float("nan"))

    # ------------------------------------------------------------------ the decode step

    def plan(self, cache: KVCache, cols: Cols, predict=None) -> tuple:
        """Host-only: the columns a :meth:`step` processes (Dream: plus each predicted ``p - 1`` that
        is missing) as ``(lo, hi)`` or a sorted list, and the number of tokens per row."""
        S = cache.length
        contiguous = isinstance(cols, tuple)
        if contiguous:
            lo, hi = cols
            if not 0 <= lo < hi <= S:
                raise IndexError(f"step columns [{lo}, {hi}) must lie in [0, {S}) and be non-empty")
        else:
            cols = list(cols)
            if not cols or min(cols) < 0 or max(cols) >= S or len(set(cols)) != len(cols):
                raise IndexError(f"step columns must be distinct and lie in [0, {S}), got {cols[:8]}...")
        if self.cfg.shifted_logits and predict is not None and not isinstance(predict, torch.Tensor):
            want = range(*predict) if isinstance(predict, tuple) else predict
            have = set(range(*cols)) if contiguous else set(cols)
            need = {p - 1 for p in want if p > 0 and p - 1 not in have}
            if need:
                if contiguous and need == set(range(min(need), cols[0])):
                    cols = (min(need), cols[1])
                else:
                    cols = sorted(have | need)
                    contiguous = False
        n = cols[1] - cols[0] if contiguous else len(cols)
        return cols, n

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: KVCache, cols: Cols, *, predict=None, write: bool = True) -> torch.Tensor:
        """One decode call: the buffer's columns ``cols`` against ``cache``; aligned logits.

        x: (B, S) the buffer (for a lane cache: one row per lane, row 0 the buffer itself).  cols:
        ``(lo, hi)`` or a host list of columns.  The call writes its K/V into slots ``cols``
        (slot == column; ``write=False``: read-only, the cache is left as it was) and attends every
        filled slot, its own included.  predict: the columns whose predictions are returned, as
        ``(a, b)``, a host list, or a (B, P) / (P,) tensor of columns; None: every processed column.
        A Dream call also processes the missing ``p - 1`` of every host-named prediction (rows for
        tensor-named ones whose ``p - 1`` is absent are NaN).  Returns (B, P, V).
        """
        B, S = x.shape
        if B != cache.batch and not (cache.lanes > 1 and B <= cache.lanes):
            raise ValueError(f"a step of {B} rows needs a cache of batch {B} or a lane cache of >= {B} "
                             f"rows (got batch {cache.batch}, lanes {cache.lanes})")
        if S != cache.length:
            raise ValueError(f"the buffer has {S} columns, the cache {cache.length} slots")
        cols, _ = self.plan(cache, cols, predict)
        dev, m = x.device, self.model
        if isinstance(cols, tuple):
            lo, hi = cols
            idx = torch.arange(lo, hi, device=dev)
            ids, pos = x[:, lo:hi], cache.positions[:B, lo:hi]
        else:
            idx = torch.tensor(cols, device=dev)
            ids, pos = x.index_select(1, idx), cache.positions[:B].index_select(1, idx)
        lane = cache.lanes > 1
        read_only = not write
        # the mask: none when every slot is filled (host-known); else the filled slots, own included
        if cache.full(cols):
            mask = None
        else:
            filled = cache._filled[:B, :-1]
            own = torch.zeros(S, dtype=torch.bool, device=dev).index_fill_(0, idx, True)
            mask = filled | own if cache.valid is None else filled | (own & cache.valid[:B])
            mask = mask[:, None, None, :]
        h = m.embed(ids)
        cos, sin = m.rope(pos, h.dtype)
        hidden = m._layers_fn(h, cos, sin, mask, cache.kv, ("copy", idx), read_only,
                              1 if lane and write and cache.rows > 1 else 0)
        if write:
            src_ids = ids[:1].expand(cache.rows, -1) if lane else ids
            cache._tokens.index_copy_(1, idx, src_ids)
            valid = (torch.ones_like(src_ids, dtype=torch.bool) if cache.valid is None
                     else cache.valid.index_select(1, idx))
            cache._filled.index_copy_(1, idx, valid)
            cache.mark_filled(cols)
        if self.cfg.shifted_logits:
            hidden = self._shift_step(hidden, cols, idx, pos, cache)
        rows = self._rows(cols, predict, dev)
        if isinstance(rows, slice):
            hidden = hidden[:, rows]
        elif rows.dim() == 1:
            hidden = hidden.index_select(1, rows)
        else:
            hidden = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        return m.head(hidden)

    def step_columns(self, cache: KVCache, cols: Cols, predict=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Host layout of a :meth:`step`: the buffer columns it processes (n,) and, for each returned
        logits row, its index among them ((P,) or (B, P)).  For test doubles that edit logits."""
        cols, n = self.plan(cache, cols, predict)
        dev = self.device
        call = torch.arange(*cols, device=dev) if isinstance(cols, tuple) else torch.tensor(cols, device=dev)
        rows = self._rows(cols, predict, dev)
        if isinstance(rows, slice):
            rows = torch.arange(n, device=dev)[rows]
        return call, rows

    @torch.no_grad()
    def step_rows(self, ids: torch.Tensor, cache: KVCache, rows: Sequence[int], slots: torch.Tensor,
                  real: torch.Tensor, predict: torch.Tensor, *, write: bool = True,
                  spread: Optional[tuple] = None) -> torch.Tensor:
        """A ragged decode call (the step of :mod:`asynclane.rowpool`): call row ``i`` is cache row
        ``rows[i]``, processes the tokens ``ids[i]`` at the slots (== buffer columns) ``slots[i]`` and
        attends that cache row's filled slots plus its own fresh K/V, as :meth:`step` does for a row.

        ids, slots, real: (N, T); ``real`` False marks padding (its slot must be the sink, ``S``).
        rows: the N cache rows (host ints, distinct; every row in order attends the cache in place, any
        other set a gathered copy of its rows).  predict: (N, P) indices into each row's T tokens.
        write: keep the fresh K/V (and mark the slots filled with their tokens); False: read-only.
        spread: ``(to, frm)`` (M,) each: after the call, cache row ``to[j]`` takes the fresh K/V and
        tokens of call row ``frm[j]`` at its slots (a lane cache keeping its row 0 in every lane row).
        Dream: the shift is the general rule (a prediction whose ``p - 1`` is not among its row's
        tokens is NaN).  Returns (N, P, V).
        """
        N, T = ids.shape
        S, m, dev = cache.length, self.model, ids.device
        dense = list(rows) == list(range(cache.rows))
        rows = torch.tensor(list(rows), dtype=torch.long, device=dev)
        pos = self.rows_positions(cache, rows, slots)
        own = torch.zeros(N, S + 1, dtype=torch.bool, device=dev).scatter_(1, slots, real)[:, :S]
        if cache.valid is not None:
            own &= cache.valid.index_select(0, rows)
        mask = (cache._filled.index_select(0, rows)[:, :S] | own)[:, None, None, :]
        to, frm = spread if spread is not None and write else (rows.new_zeros(0), rows.new_zeros(0))
        h = m.embed(ids)
        cos, sin = m.rope(pos, h.dtype)
        hidden = m._layers_fn(h, cos, sin, mask, cache.kv, ("rows", rows, slots, to, frm, dense), not write, 0)
        if write:
            all_rows = torch.cat((rows, to))
            all_slots = torch.cat((slots, slots.index_select(0, frm)))
            all_ids = torch.cat((ids, ids.index_select(0, frm)))
            at = all_rows[:, None].expand_as(all_slots)
            valid = torch.cat((real, real.index_select(0, frm)))
            if cache.valid is not None:
                padded = torch.cat((cache.valid, cache.valid.new_zeros(cache.valid.shape[0], 1)), 1)
                valid = valid & padded[at, all_slots]
            cache._tokens.index_put_((at, all_slots), torch.where(valid, all_ids, -1))
            cache._filled.index_put_((at, all_slots), valid)
            cache._ragged = True
        if self.cfg.shifted_logits:
            hidden = self._shift(hidden, pos, real)
        hidden = hidden.gather(1, predict[..., None].expand(-1, -1, hidden.shape[-1]))
        return m.head(hidden)

    @staticmethod
    def rows_positions(cache: KVCache, rows, slots: torch.Tensor) -> torch.Tensor:
        """(N, T) RoPE positions of a :meth:`step_rows` call's tokens: cache row ``rows[i]``'s position
        table at ``slots[i]`` (the sink slot, padding, reads the last slot's position)."""
        rows = torch.as_tensor(list(rows) if not isinstance(rows, torch.Tensor) else rows, dtype=torch.long,
                               device=slots.device)
        return cache.positions.index_select(0, rows).gather(1, slots.clamp(max=cache.length - 1))

    @staticmethod
    def _rows(cols, predict, dev):
        """Which processed rows a step returns: a slice (contiguous) or an index tensor."""
        if predict is None:
            return slice(None)
        if isinstance(predict, torch.Tensor):
            if not isinstance(cols, tuple):
                raise TypeError("a tensor `predict` needs contiguous columns (lo, hi)")
            return predict - cols[0]
        if isinstance(cols, tuple):
            if isinstance(predict, tuple):
                a, b = predict
                if not cols[0] <= a < b <= cols[1]:
                    raise ValueError(f"predict {predict} lies outside the call's columns {cols}")
                return slice(a - cols[0], b - cols[0])
            rows = [p - cols[0] for p in predict]
        else:
            at = {c: i for i, c in enumerate(cols)}
            rows = [at[p] for p in (range(*predict) if isinstance(predict, tuple) else predict)]
        return torch.tensor(rows, device=dev)

    def _shift_step(self, hidden, cols, idx, pos, cache):
        """Dream's shift for a step: contiguous columns shift by one row; lists use the general rule."""
        if not isinstance(cols, tuple):
            return self._shift(hidden, pos, None if cache.valid is None else
                               cache.valid[: hidden.shape[0]].index_select(1, idx))
        lo = cols[0]
        out = torch.cat((hidden[:, :1], hidden[:, :-1]), dim=1)
        if lo > 0:
            out[:, 0] = float("nan")
        if cache.valid is not None:  # a row's first real token (position 0) keeps its own row
            out = torch.where((pos == 0)[..., None], hidden, out)
        return out

    def count_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
