"""Transformers (HF) oracles for the native backbone: HF Llama (LLaDA) and Qwen2 (Dream) models
holding the same weights, made bidirectional, and the references the parity and cache tests compare
against (fp32, CPU).  Shared by tests/asynclane/test_backbone_parity.py, test_cache.py and
scripts/parity_report.py.

The HF models are built with ``_from_config(cfg, attn_implementation=...)`` and receive the native
weights through the official checkpoint names (``checkpoint.official_names``) followed by the
LLaDA -> Llama name map below, so a wrong official name map fails the parity tests too.  They are
made bidirectional with a 4-D additive float mask [B, 1, Q, K] (0 = attend, finfo.min = blocked),
the only method that works for both eager and sdpa.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ..checkpoint import native_views, official_names
from . import rand_ids, random_backbone, rel_err  # noqa: F401  (one import place for the tests)

FAMILIES = ("llada", "dream")
IMPLS = ("sdpa", "eager")
TOL = 1e-5  # max relative error on fp32 logits

# ---------------------------------------------------------------- HF model with the same weights

# official LLaDA names -> HF Llama names (Dream's official names are Qwen2's)
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



# per-row non-contiguous context sets over T = 32 (cache tests)
CTX = torch.tensor([[0, 1, 2, 3, 5, 6, 9, 10, 11, 17, 18, 25, 26, 30],
                    [0, 2, 3, 4, 7, 8, 12, 13, 14, 15, 20, 21, 22, 31]])
