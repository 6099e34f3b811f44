"""Loader: official-name checkpoints (sharded or not) load into the native backbone exactly.

The expected official names and shapes below are written out from docs/research/backbones.md §1.2
(LLaDA) and §2.2 (Dream) rather than taken from ``checkpoint.official_names``, so a wrong name
map fails here.  A second, independent path builds the checkpoint from an HF Llama/Qwen2 model
through the §4.1 map and checks the loaded backbone against that HF model.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from asynclane import loading
from asynclane.backbone import Backbone, Transformer, rope_inv_freq
from asynclane.checkpoint import official_config
from asynclane.loading import CheckpointNotFound, load_backbone, save_checkpoint
from asynclane.testing import hf as P  # the HF oracles (Llama / Qwen2 with the same weights)
from asynclane.testing import random_backbone, random_config


FAMILIES = ("llada", "dream")


def token_ids(spec):
    return {"mask": spec.mask_id, "eos": spec.eos_ids[0], "pad": spec.pad_id, "bos": spec.bos_id}


def expected_official(cfg) -> dict[str, tuple]:
    """Official parameter names -> shapes, written out from research §1.2 / §2.2."""
    d, m, V, kv = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size, cfg.n_kv_heads * cfg.head_dim
    if cfg.family == "llada":
        out = {"model.transformer.wte.weight": (V, d), "model.transformer.ln_f.weight": (d,),
               "model.transformer.ff_out.weight": (V, d)}
        block = {"attn_norm.weight": (d,), "q_proj.weight": (d, d), "k_proj.weight": (kv, d),
                 "v_proj.weight": (kv, d), "attn_out.weight": (d, d), "ff_norm.weight": (d,),
                 "ff_proj.weight": (m, d), "up_proj.weight": (m, d), "ff_out.weight": (d, m)}
        pre = "model.transformer.blocks.{i}."
    else:
        out = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
        block = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (d, d), "self_attn.q_proj.bias": (d,),
                 "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,),
                 "self_attn.v_proj.weight": (kv, d), "self_attn.v_proj.bias": (kv,),
                 "self_attn.o_proj.weight": (d, d), "post_attention_layernorm.weight": (d,),
                 "mlp.gate_proj.weight": (m, d), "mlp.up_proj.weight": (m, d), "mlp.down_proj.weight": (d, m)}
        pre = "model.layers.{i}."
    for i in range(cfg.n_layers):
        out.update({pre.format(i=i) + k: s for k, s in block.items()})
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(original backbone, sharded checkpoint dir)."""
    bb = random_backbone(request.param, seed=3)
    out = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    save_checkpoint(bb.model, out, token_ids(bb.spec), shard_size=7)
    return bb, out


def test_sharded_checkpoint_has_official_layout(saved):
    bb, out = saved
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wmap = index["weight_map"]
    expected = expected_official(bb.cfg)
    assert set(wmap) == set(expected)
    shards = sorted(set(wmap.values()))
    assert len(shards) > 1 and sorted(f.name for f in out.glob("*.safetensors")) == shards
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in wmap.items() if v == shard}
            for k in keys:
                assert tuple(f.get_slice(k).get_shape()) == expected[k], k
    raw = json.loads((out / "config.json").read_text())
    assert raw == official_config(bb.cfg, token_ids(bb.spec))
    assert raw["model_type"] == {"llada": "llada", "dream": "Dream"}[bb.cfg.family]


def test_load_reproduces_logits_exactly(saved):
    bb, out = saved
    loaded = load_backbone(out)
    assert isinstance(loaded, Backbone) and loaded.cfg == bb.cfg
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert (loaded.spec.mask_id, loaded.spec.eos_ids[0], loaded.spec.pad_id) == \
        (bb.spec.mask_id, bb.spec.eos_ids[0], bb.spec.pad_id)
    assert loaded.spec.family == bb.cfg.family and loaded.spec.vocab_size == bb.cfg.vocab_size
    for name, p in bb.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name
    assert torch.equal(loaded.model.inv_freq, bb.model.inv_freq)
    ids = torch.randint(0, bb.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.forward(ids), bb.forward(ids))
    assert torch.equal(load_backbone(str(out), device="cpu", dtype="fp32").forward(ids), bb.forward(ids))


def test_load_bf16(saved):
    bb, out = saved
    for dtype in ("bf16", torch.bfloat16):
        b16 = load_backbone(out, dtype=dtype)
        assert b16.dtype == torch.bfloat16
        assert all(p.dtype == torch.bfloat16 for p in b16.model.parameters())
        # the RoPE frequencies stay fp32 (both official models compute them in fp32)
        assert b16.model.inv_freq.dtype == torch.float32
        assert torch.equal(b16.model.inv_freq, rope_inv_freq(bb.cfg))
    ids = torch.randint(0, bb.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, got = bb.forward(ids), b16.forward(ids)
    assert got.dtype == torch.bfloat16 and bool(torch.isfinite(got).all())
    assert float((got.float() - ref).abs().max() / ref.abs().max()) < 5e-2  # bf16 smoke tolerance


def test_dtype_cast_and_to_empty_keep_fp32_rope():
    cfg = random_config("dream")
    model = Transformer(cfg).to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, rope_inv_freq(cfg))
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert torch.equal(meta.to_empty(device="cpu").inv_freq, rope_inv_freq(cfg))


def test_unsharded_checkpoint_from_hf_weights_matches_hf(tmp_path):
    """Official names built from an HF model through the §4.1 map (not from official_names)."""
    for family in FAMILIES:
        cfg = random_config(family)
        cls, hcfg = P.hf_config(cfg)
        hf = cls._from_config(hcfg, attn_implementation="sdpa").float().eval()
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if n.endswith("norm.weight")
                        else 0.2 * torch.randn(p.shape, generator=g))
        to_official = {P.official_to_hf(family, o): o for o in expected_official(cfg)}
        sd = {to_official[n]: t.contiguous() for n, t in hf.state_dict().items()}
        out = tmp_path / family
        out.mkdir()
        save_file(sd, str(out / "model.safetensors"))
        spec = random_backbone(family).spec
        (out / "config.json").write_text(json.dumps(official_config(cfg, token_ids(spec))))
        bb = load_backbone(out)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        pos = torch.arange(16).expand(2, 16)
        ref = P.align(family, P.hf_raw(hf, ids, pos), pos)
        err = P.rel_err(bb.forward(ids), ref)
        print(f"\n[loading] {family} official-name checkpoint from HF weights: max rel err {err:.3e}")
        assert err <= P.TOL


# ---------------------------------------------------------------- actionable failures

def test_directory_without_config(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointNotFound) as e:
        load_backbone(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "config.json" in msg and "model.path=DIR" in msg and "--local-dir" in msg


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFound) as e:
        load_backbone(tmp_path / "nowhere" / "llada")
    msg = str(e.value)
    assert "does not exist" in msg and "model.path=DIR" in msg and "local" in msg


def test_hub_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.chdir(tmp_path)  # no local directory of that name
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # read at import time by huggingface_hub
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached
    with pytest.raises(CheckpointNotFound) as e:
        load_backbone("GSAI-ML/LLaDA-8B-Instruct")
    msg = str(e.value)
    assert "hf download GSAI-ML/LLaDA-8B-Instruct --local-dir DIR" in msg and "model.path=DIR" in msg


def test_directory_without_weights(saved, tmp_path):
    bb, out = saved
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(CheckpointNotFound, match="safetensors"):
        load_backbone(tmp_path)


def test_unknown_model_type(saved, tmp_path):
    _, out = saved
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    raw = json.loads((out / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(ValueError) as e:
        load_backbone(tmp_path)
    assert "gpt2" in str(e.value) and "'llada'" in str(e.value) and "'Dream'" in str(e.value)


def test_missing_tensors(saved, tmp_path):
    bb, out = saved
    # unsharded file lacking one tensor
    one = tmp_path / "one"
    save_checkpoint(bb.model, one, token_ids(bb.spec))
    sd = load_file(str(one / "model.safetensors"))
    victim = sorted(sd)[3]
    save_file({k: v for k, v in sd.items() if k != victim}, str(one / "model.safetensors"))
    with pytest.raises(KeyError, match="lacks 1 parameters") as e:
        load_backbone(one)
    assert victim in str(e.value)
    # a shard that lost a tensor its index still lists
    sharded = tmp_path / "sharded"
    save_checkpoint(bb.model, sharded, token_ids(bb.spec), shard_size=7)
    wmap = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    victim, shard = sorted(wmap.items())[0]
    part = load_file(str(sharded / shard))
    save_file({k: v for k, v in part.items() if k != victim}, str(sharded / shard))
    with pytest.raises(KeyError) as e:
        load_backbone(sharded)
    assert victim in str(e.value)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="bf16"):
        loading.resolve_dtype("int4")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupted_safetensors_names_the_file(saved, tmp_path, how):
    _, out = saved
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\xff" * 64)
    with pytest.raises(loading.CheckpointError, match=f"{shard} is not a readable safetensors file.*corrupted"):
        load_backbone(tmp_path)


def test_unknown_device_lists_the_valid_ones():
    assert loading.resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "mps:x", "meta"):
        with pytest.raises(ValueError, match=f"unknown device '{bad}'; valid choices: auto, cpu, cuda, cuda:N"):
            loading.resolve_device(bad)


def test_cuda_device_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda:0' is not available: .*; valid here: auto, cpu"):
        loading.resolve_device("cuda:0")
    assert loading.resolve_device("auto") == torch.device("cpu")


def test_checkpoint_id_follows_the_weights_not_the_directory(tmp_path):
    import torch

    from asynclane.loading import checkpoint_id, save_checkpoint
    from asynclane.testing import random_config, random_model

    cfg = random_config("llada")
    ids = {"mask": cfg.vocab_size - 1, "eos": cfg.vocab_size - 2, "pad": cfg.vocab_size - 2}
    model = random_model(cfg, seed=0)
    save_checkpoint(model, tmp_path / "a", ids)
    save_checkpoint(model, tmp_path / "b", ids, shard_size=None)
    assert checkpoint_id(tmp_path / "a") == checkpoint_id(tmp_path / "b")  # same weights, other place
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_checkpoint(model, tmp_path / "a", ids)
    assert checkpoint_id(tmp_path / "a") != checkpoint_id(tmp_path / "b")  # retrained: new identity
    assert checkpoint_id("GSAI-ML/LLaDA-8B-Instruct") == "GSAI-ML/LLaDA-8B-Instruct"
