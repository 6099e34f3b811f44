"""Parity of the native backbone with transformers' Llama (LLaDA) and Qwen2 (Dream), fp32 on CPU.

The HF models are built with ``_from_config(cfg, attn_implementation=...)`` and receive the
native weights through the official checkpoint names (``checkpoint.official_names``) followed by
the research/backbones.md §4.1 map, so a wrong official name map fails here too.  They are made
bidirectional with a 4-D additive float mask [B, 1, Q, K] (0 = attend, finfo.min = blocked),
the only method that works for both eager and sdpa (§4.2).

Dream's raw HF logits at row i predict token i+1; the native backbone returns aligned logits
(the row for position p comes from the hidden state at p-1 in the same call, position 0 keeps its
own row, and a row whose p-1 is not in the call is NaN).  :func:`align` builds that reference
from raw HF logits with plain loops, independently of ``Backbone._shift``.

Every measured error is ``max|ours - ref| / max|ref|`` over finite entries (NaN patterns must
agree exactly).  ``CHECKS`` lists the measured comparisons; each test asserts one of them and
prints it (visible with ``pytest -s``), and ``scripts/parity_report.py`` prints them as a table.
The helpers here are also used by test_cache.py (loaded by file path, see that module).
"""
from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from asynclane.checkpoint import native_views, official_names
from asynclane.testing import rand_ids, random_backbone, rel_err  # noqa: F401  (re-exported for test_cache.py)

FAMILIES = ("llada", "dream")
IMPLS = ("sdpa", "eager")
TOL = 1e-5  # max relative error on fp32 logits

# ---------------------------------------------------------------- HF model with the same weights

# research/backbones.md §4.1: official LLaDA names -> HF Llama names (Dream names are Qwen2's)
_LLADA_TOP = {"model.transformer.wte.weight": "model.embed_tokens.weight",
              "model.transformer.ln_f.weight": "model.norm.weight",
              "model.transformer.ff_out.weight": "lm_head.weight"}
_LLADA_BLOCK = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
                "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}


def official_to_hf(family: str, name: str) -> str:
    if family == "dream":
        return name
    if name in _LLADA_TOP:
        return _LLADA_TOP[name]
    pre = "model.transformer.blocks."
    assert name.startswith(pre), name
    i, rest = name[len(pre):].split(".", 1)
    module, param = rest.rsplit(".", 1)
    return f"model.layers.{i}.{_LLADA_BLOCK[module]}.{param}"


def hf_config(cfg):
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  max_position_embeddings=cfg.max_length, tie_word_embeddings=False, hidden_act="silu")
    if cfg.family == "llada":
        return LlamaForCausalLM, LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    return Qwen2ForCausalLM, Qwen2Config(**common, use_sliding_window=False)


def hf_from_native(model, impl: str = "sdpa"):
    """An HF model holding ``model``'s weights (native -> official -> HF names, strict load)."""
    cls, hcfg = hf_config(model.cfg)
    hf = cls._from_config(hcfg, attn_implementation=impl)
    names = official_names(model.cfg)
    sd = {official_to_hf(model.cfg.family, names[n]): t.clone() for n, t in native_views(model).items()}
    hf.load_state_dict(sd, strict=True)
    return hf.float().eval()


@functools.lru_cache(maxsize=None)
def pair(family: str, impl: str = "sdpa"):
    """(native Backbone, HF model) with identical weights; shared read-only across tests."""
    bb = random_backbone(family, seed=0)
    return bb, hf_from_native(bb.model, impl)


# ---------------------------------------------------------------- references and errors

def additive(allowed: torch.Tensor) -> torch.Tensor:
    """bool [B, Q, K] (True = may attend) -> float additive mask [B, 1, Q, K]."""
    m = torch.zeros(allowed.shape, dtype=torch.float32)
    return m.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


# transformers >= 5.24 names the cache argument ``cache`` (``past_key_values`` is deprecated)
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_raw(hf, ids, positions, allowed=None, cache=None):
    """Raw HF logits of one call; ``allowed`` [B, T, past + T] (default: everything)."""
    B, T = ids.shape
    past = cache.get_seq_length() if cache is not None else 0
    if allowed is None:
        allowed = torch.ones(B, T, past + T, dtype=torch.bool)
    kw = {_CACHE_KW: cache} if cache is not None else {}
    out = hf(input_ids=ids, attention_mask=additive(allowed), position_ids=positions,
             use_cache=cache is not None, **kw)
    return out.logits


@torch.no_grad()
def hf_hidden(hf, ids, positions, allowed=None):
    B, T = ids.shape
    if allowed is None:
        allowed = torch.ones(B, T, T, dtype=torch.bool)
    return hf.model(input_ids=ids, attention_mask=additive(allowed), position_ids=positions,
                    use_cache=False).last_hidden_state


def align(family: str, raw: torch.Tensor, positions: torch.Tensor, valid=None) -> torch.Tensor:
    """Expected aligned logits of one call from its raw (HF-convention) logits.

    LLaDA: unchanged.  Dream: the row for position p is the raw row of the real token at p-1 in
    the same call; position 0 keeps its own row; no such token -> NaN.
    """
    if family == "llada":
        return raw.clone()
    out = torch.full_like(raw, math.nan)
    for b in range(raw.shape[0]):
        where = {int(p): j for j, p in enumerate(positions[b].tolist()) if valid is None or bool(valid[b, j])}
        for j, p in enumerate(positions[b].tolist()):
            src = j if p == 0 else where.get(p - 1)
            if src is not None:
                out[b, j] = raw[b, src]
    return out


def hf_oracle(hf, ctx_ids, ctx_pos, q_ids, q_pos, ctx_visible=None, ctx_valid=None):
    """research §4.5: context call into a DynamicCache, then the query call reading it.

    ctx_valid: bool [B, |C|], real (non-pad) context tokens (default all); pad keys are blocked
    in the context call.  ctx_visible: which context keys the queries may see (default
    ctx_valid).  Returns the raw logits of both calls.
    """
    B, S = q_ids.shape
    C = ctx_ids.shape[1]
    if ctx_valid is None:
        ctx_valid = torch.ones(B, C, dtype=torch.bool)
    if ctx_visible is None:
        ctx_visible = ctx_valid
    cache = DynamicCache()
    ctx_raw = hf_raw(hf, ctx_ids, ctx_pos, allowed=ctx_valid[:, None, :].expand(B, C, C), cache=cache)
    allowed = torch.cat((ctx_visible[:, None, :].expand(B, S, C), torch.ones(B, S, S, dtype=torch.bool)), dim=2)
    return ctx_raw, hf_raw(hf, q_ids, q_pos, allowed=allowed, cache=cache)


def left_pad(lengths, T):
    """valid [B, T] (left padding) and positions cumsum - 1 clamped at 0."""
    valid = torch.stack([torch.arange(T) >= T - n for n in lengths])
    return valid, (valid.long().cumsum(1) - 1).clamp(min=0)


# ---------------------------------------------------------------- measured comparisons

def full_logits(family, impl="sdpa"):
    """Plain bidirectional forward; Dream: ours[:, 1:] vs hf[:, :-1], ours[:, 0] vs hf[:, 0]."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, 24, seed=1)
    ours = bb.forward(ids)
    raw = hf_raw(hf, ids, torch.arange(24).expand(2, 24))
    ref = torch.cat((raw[:, :1], raw[:, :-1]), dim=1) if family == "dream" else raw
    assert torch.equal(bb.logits(ids), ours)
    return rel_err(ours, ref)


def full_hidden(family, impl="sdpa"):
    """Final-norm hidden states of the native Transformer vs HF's base model (no head, no shift)."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, 24, seed=2)
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        ours = bb.model(ids, pos)
    return rel_err(ours, hf_hidden(hf, ids, pos))


def padded_batch(family, impl="sdpa"):
    """Left-padded batch: pad keys blocked, positions cumsum-1; real rows only."""
    bb, hf = pair(family, impl)
    T = 20
    valid, pos = left_pad([20, 13, 6], T)
    ids = rand_ids(bb, 3, T, seed=3)
    ours = bb.forward(ids, pos, key_mask=valid)
    allowed = valid[:, None, :].expand(3, T, T)
    ref = align(family, hf_raw(hf, ids, pos, allowed=allowed), pos, valid)
    return rel_err(ours[valid], ref[valid])


def padded_vs_single(family, impl="sdpa"):
    """Each real row of a left-padded batch equals the same prompt run alone, unpadded."""
    bb, _ = pair(family, impl)
    T, lengths = 20, [20, 13, 6]
    valid, pos = left_pad(lengths, T)
    ids = rand_ids(bb, 3, T, seed=4)
    ours = bb.forward(ids, pos, key_mask=valid)
    err = 0.0
    for b, n in enumerate(lengths):
        single = bb.forward(ids[b:b + 1, T - n:])
        err = max(err, rel_err(ours[b, T - n:], single[0]))
    return err


NONCONTIG = torch.tensor([[0, 1, 2, 7, 8, 20, 21, 22, 23, 100, 101, 150, 151, 152, 290, 291],
                          [41, 5, 40, 300, 6, 0, 77, 299, 13, 4, 12, 78, 200, 3, 202, 201]])


def noncontig_positions(family, impl="sdpa"):
    """Explicit, non-contiguous (row 1: unsorted) position ids; Dream rows without p-1 are NaN."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, NONCONTIG.shape[1], seed=5)
    ours = bb.forward(ids, NONCONTIG)
    return rel_err(ours, align(family, hf_raw(hf, ids, NONCONTIG), NONCONTIG))


# context set C and query set S of absolute positions, per row, non-contiguous (T = 32)
CTX = torch.tensor([[0, 1, 2, 3, 5, 6, 9, 10, 11, 17, 18, 25, 26, 30],
                    [0, 2, 3, 4, 7, 8, 12, 13, 14, 15, 20, 21, 22, 31]])
QRY = torch.tensor([[4, 12, 13, 14, 27, 28],
                    [16, 17, 5, 6, 1, 9]])


def cache_vs_hf_dynamic(family, impl="sdpa"):
    """Native KV cache (write C, then read with S) vs the HF DynamicCache oracle, both calls."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, 32, seed=6)
    cids, qids = ids.gather(1, CTX), ids.gather(1, QRY)
    cache = bb.new_cache(2, 32)
    ours_c = bb.forward(cids, CTX, cache=cache, write=True)
    ours_q = bb.forward(qids, QRY, cache=cache)
    ref_c, ref_q = hf_oracle(hf, cids, CTX, qids, QRY)
    return max(rel_err(ours_c, align(family, ref_c, CTX)), rel_err(ours_q, align(family, ref_q, QRY)))


def cache_vs_hf_blockmask(family, impl="sdpa"):
    """Same calls vs one HF full forward over C+S where context rows cannot see query columns."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, 32, seed=6)
    cids, qids = ids.gather(1, CTX), ids.gather(1, QRY)
    cache = bb.new_cache(2, 32)
    ours_c = bb.forward(cids, CTX, cache=cache, write=True)
    ours_q = bb.forward(qids, QRY, cache=cache)
    C, S = CTX.shape[1], QRY.shape[1]
    allowed = torch.ones(2, C + S, C + S, dtype=torch.bool)
    allowed[:, :C, C:] = False
    raw = hf_raw(hf, torch.cat((cids, qids), 1), torch.cat((CTX, QRY), 1), allowed=allowed)
    return max(rel_err(ours_c, align(family, raw[:, :C], CTX)), rel_err(ours_q, align(family, raw[:, C:], QRY)))


CHECKS = {
    "full forward logits (sdpa)": functools.partial(full_logits, impl="sdpa"),
    "full forward logits (eager)": functools.partial(full_logits, impl="eager"),
    "final hidden states vs HF base model": full_hidden,
    "left-padded batch, real rows (sdpa)": functools.partial(padded_batch, impl="sdpa"),
    "left-padded batch, real rows (eager)": functools.partial(padded_batch, impl="eager"),
    "left-padded rows vs unpadded single rows": padded_vs_single,
    "explicit non-contiguous positions": noncontig_positions,
    "KV cache C->S vs HF DynamicCache (sdpa)": functools.partial(cache_vs_hf_dynamic, impl="sdpa"),
    "KV cache C->S vs HF DynamicCache (eager)": functools.partial(cache_vs_hf_dynamic, impl="eager"),
    "KV cache C->S vs HF block-mask forward": cache_vs_hf_blockmask,
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("check", list(CHECKS))
def test_parity(check, family):
    err = CHECKS[check](family)
    print(f"\n[parity] {family:5s} {check:45s} max rel err {err:.3e}")
    assert err <= TOL, f"{family} {check}: {err:.3e} > {TOL:.0e}"


# ---------------------------------------------------------------- sanity of the harness itself

@pytest.mark.parametrize("family", FAMILIES)
def test_harness_is_sensitive(family):
    """Negative controls: the comparisons would catch a causal mask, a missing shift, bad weights."""
    bb, hf = pair(family)
    ids = rand_ids(bb, 1, 16, seed=7)
    pos = torch.arange(16)[None]
    ours = bb.forward(ids)
    causal = align(family, hf_raw(hf, ids, pos, allowed=torch.ones(16, 16, dtype=torch.bool).tril()[None]), pos)
    assert rel_err(ours, causal) > 1e-3
    raw = hf_raw(hf, ids, pos)
    if family == "dream":  # forgetting to undo the shift is caught
        assert rel_err(ours[:, 1:], raw[:, 1:]) > 1e-2
    other = hf_from_native(random_backbone(family, seed=1).model)
    assert rel_err(ours, align(family, hf_raw(other, ids, pos), pos)) > 1e-2


def test_official_to_hf_map_covers_every_parameter():
    for family in FAMILIES:
        bb, hf = pair(family)
        mapped = {official_to_hf(family, o) for o in official_names(bb.cfg).values()}
        assert mapped == set(hf.state_dict())
