"""Official parameter-name maps and config schemas (docs/research/backbones.md §1.1-1.2, §2.1-2.2).

Native module names (``Transformer``) <-> official checkpoint names, and official config.json
<-> :class:`ModelConfig`.  Pure functions, no I/O; the loader in ``loading.py`` uses them.
"""
from __future__ import annotations

from .backbone import ModelConfig

_LLADA_LAYER = {  # native -> official, per block
    "attn_norm.weight": "attn_norm.weight",
    "q_proj.weight": "q_proj.weight",
    "k_proj.weight": "k_proj.weight",
    "v_proj.weight": "v_proj.weight",
    "o_proj.weight": "attn_out.weight",
    "mlp_norm.weight": "ff_norm.weight",
    "gate_proj.weight": "ff_proj.weight",
    "up_proj.weight": "up_proj.weight",
    "down_proj.weight": "ff_out.weight",
}
_DREAM_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight", "q_proj.bias": "self_attn.q_proj.bias",
    "k_proj.weight": "self_attn.k_proj.weight", "k_proj.bias": "self_attn.k_proj.bias",
    "v_proj.weight": "self_attn.v_proj.weight", "v_proj.bias": "self_attn.v_proj.bias",
    "o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "gate_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "down_proj.weight": "mlp.down_proj.weight",
}


def native_views(model) -> dict:
    """Every official-unit matrix of ``model`` as a view into its (fused) parameters, in module order.

    Names are the unfused native names of :func:`official_names` (``layers.0.q_proj.weight``):
    q/k/v are row ranges of ``qkv``, gate/up of ``gate_up``; the rest are the parameters
    themselves.  Copying into a view fills the fused parameter (the loader), reading one gives
    the official matrix (the saver, the HF parity tests).
    """
    cfg = model.cfg
    d, kv, m = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.mlp_hidden
    out = {"embed.weight": model.embed.weight}
    for i, layer in enumerate(model.layers):
        pre = f"layers.{i}."
        out[pre + "attn_norm.weight"] = layer.attn_norm.weight
        for name, (a, b) in (("q_proj", (0, d)), ("k_proj", (d, d + kv)), ("v_proj", (d + kv, d + 2 * kv))):
            out[pre + name + ".weight"] = layer.qkv.weight[a:b]
            if cfg.qkv_bias:
                out[pre + name + ".bias"] = layer.qkv.bias[a:b]
        out[pre + "o_proj.weight"] = layer.o_proj.weight
        out[pre + "mlp_norm.weight"] = layer.mlp_norm.weight
        out[pre + "gate_proj.weight"] = layer.gate_up.weight[:m]
        out[pre + "up_proj.weight"] = layer.gate_up.weight[m:]
        out[pre + "down_proj.weight"] = layer.down_proj.weight
    out["norm.weight"] = model.norm.weight
    out["head.weight"] = model.head.weight
    return out


def official_names(cfg: ModelConfig) -> dict[str, str]:
    """Map every native (unfused, :func:`native_views`) parameter name to its official checkpoint name."""
    out = {}
    if cfg.family == "llada":
        pre = "model.transformer."
        out.update({"embed.weight": pre + "wte.weight", "norm.weight": pre + "ln_f.weight",
                    "head.weight": pre + "ff_out.weight"})
        layer_map, layer_pre = _LLADA_LAYER, pre + "blocks.{i}."
    else:
        out.update({"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                    "head.weight": "lm_head.weight"})
        layer_map, layer_pre = _DREAM_LAYER, "model.layers.{i}."
    for i in range(cfg.n_layers):
        for native, official in layer_map.items():
            if native.endswith(".bias") and not cfg.qkv_bias:
                continue
            out[f"layers.{i}.{native}"] = layer_pre.format(i=i) + official
    return out


def config_from_official(raw: dict) -> ModelConfig:
    """Parse an official LLaDA (``model_type: llada``) or Dream (``Dream``) config.json."""
    mt = str(raw.get("model_type", "")).lower()
    if mt == "llada":
        return ModelConfig(
            family="llada", d_model=raw["d_model"], n_layers=raw["n_layers"], n_heads=raw["n_heads"],
            n_kv_heads=raw.get("n_kv_heads") or raw["n_heads"],
            mlp_hidden=raw.get("mlp_hidden_size") or raw["mlp_ratio"] * raw["d_model"],
            vocab_size=raw.get("embedding_size") or raw["vocab_size"],
            rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            qkv_bias=bool(raw.get("include_bias") or raw.get("include_qkv_bias")),
            max_length=int(raw.get("max_sequence_length", 4096)))
    if mt == "dream":
        return ModelConfig(
            family="dream", d_model=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
            n_heads=raw["num_attention_heads"],
            n_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            mlp_hidden=raw["intermediate_size"], vocab_size=raw["vocab_size"],
            rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            qkv_bias=True, max_length=int(raw.get("max_position_embeddings", 4096)))
    raise ValueError(f"config.json model_type {raw.get('model_type')!r} is not supported; "
                     "valid choices: 'llada' (LLaDA) or 'Dream' (Dream)")


def official_config(cfg: ModelConfig, token_ids: dict) -> dict:
    """The official-schema config.json for ``cfg`` (token_ids: mask/eos/pad/bos ids)."""
    if cfg.family == "llada":
        return {
            "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": cfg.d_model,
            "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "mlp_hidden_size": cfg.mlp_hidden, "mlp_ratio": 4, "activation_type": "silu",
            "block_type": "llama", "block_group_size": 1, "vocab_size": cfg.vocab_size,
            "embedding_size": cfg.vocab_size, "weight_tying": False, "rope": True,
            "rope_theta": cfg.rope_theta, "rope_full_precision": True, "alibi": False,
            "layer_norm_type": "rms", "rms_norm_eps": cfg.norm_eps, "layer_norm_with_affine": True,
            "bias_for_layer_norm": False, "include_bias": False, "include_qkv_bias": False,
            "attention_layer_norm": False, "max_sequence_length": cfg.max_length,
            "mask_token_id": token_ids["mask"], "eos_token_id": token_ids["eos"],
            "pad_token_id": token_ids["pad"], "bos_token_id": token_ids.get("bos"),
            "precision": "amp_bf16", "use_cache": False,
        }
    return {
        "model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.mlp_hidden, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "max_position_embeddings": cfg.max_length, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False, "use_sliding_window": False,
        "mask_token_id": token_ids["mask"], "eos_token_id": token_ids["eos"],
        "pad_token_id": token_ids["pad"], "bos_token_id": token_ids.get("bos", token_ids["eos"]),
        "torch_dtype": "bfloat16",
    }
