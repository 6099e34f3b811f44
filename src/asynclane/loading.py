"""Load a backbone from a local Hugging Face-format directory or a hub id; save one.

A checkpoint directory holds an official-schema ``config.json`` (LLaDA or Dream), safetensors
weights under official parameter names (one file, or shards with ``model.safetensors.index.json``)
and tokenizer files with the chat template.  No ``trust_remote_code``: the weights are mapped
by name into the native :class:`~asynclane.backbone.Transformer`.

A checkpoint may also hold ``training.json`` (written by ``scripts/train_tiny.py``); its
``trained_context`` record says which lengths training showed the model, next to the
``max_length`` it supports: :func:`context_limits` reads both (the runner's length guard).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .backbone import Backbone, BackboneSpec, ModelConfig, Transformer
from .checkpoint import config_from_official, native_views, official_config, official_names

TINY_DIR = Path(__file__).resolve().parent / "tiny"
TINY_LONG_DIR = Path(__file__).resolve().parent / "tiny_long"
# the models shipped inside the package, by model preset name (a preset with path: null loads its own)
EMBEDDED = {"tiny": TINY_DIR, "tiny_long": TINY_LONG_DIR}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# end-of-answer tokens besides the config's EOS, by family (docs/research/backbones.md §1.6, §2.6)
EXTRA_EOS_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|eot|>")


class CheckpointNotFound(FileNotFoundError):
    """No checkpoint where one was asked for (the message says how to get one)."""


def model_path(path: Optional[Union[str, os.PathLike]], name: str = "tiny") -> Union[str, os.PathLike]:
    """Where model preset ``name`` loads from: ``path`` when given, else the package's embedded
    checkpoint of that name (any other name: the embedded ``tiny``).  An embedded checkpoint missing
    from this checkout (``tiny_long`` before its weights are committed) raises CheckpointNotFound."""
    if path:
        return path
    d = EMBEDDED.get(name, TINY_DIR)
    if not (d / "config.json").exists():
        raise CheckpointNotFound(
            f"its embedded weights are not in this checkout ({d} has no config.json). tiny_long is "
            f"trained by scripts/train_tiny.py on a GPU (issue 17; recipe and CPU pilot in results/tiny_long_pilot); "
            f"give model.path=<a trained checkpoint directory>, or use model=tiny")
    return d


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be loaded: unreadable config.json, an unknown schema,
    a truncated or corrupted safetensors file, tensors of the wrong shape or missing."""


class MissingTensors(CheckpointError, KeyError):
    """A :class:`CheckpointError` that is also a ``KeyError`` (a checkpoint lacking parameters)."""

    __str__ = ValueError.__str__  # KeyError would quote the message


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid choices: {', '.join(sorted(DTYPES))}")
    return DTYPES[str(dtype)]


DEVICES = "auto, cpu, cuda, cuda:N"


def resolve_device(device) -> torch.device:
    """``auto`` (cuda when available), ``cpu``, ``cuda`` or ``cuda:N``; anything else, or a CUDA
    device this torch or machine cannot give, is a ValueError naming what is valid here."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; valid choices: {DEVICES}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (torch.cuda.is_available() is False)")
            raise ValueError(f"device {device!r} is not available: {why}; valid here: auto, cpu")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ValueError(f"device {device!r} is not available: {n} CUDA device(s) visible; "
                             f"valid here: auto, cpu, cuda, cuda:0..cuda:{n - 1}")
    return d


def _local_dir(path_or_hub_id: Union[str, os.PathLike]) -> Path:
    p = Path(path_or_hub_id).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CheckpointNotFound(f"{p} has no config.json; a checkpoint directory needs the official "
                                     "config.json, *.safetensors weights (with model.safetensors.index.json "
                                     "when sharded) and tokenizer files, as `hf download REPO_ID --local-dir "
                                     "DIR` writes them; pass that DIR (model.path=DIR)")
        return p
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointNotFound(f"checkpoint directory {name!r} does not exist; pass an existing local "
                                 "directory holding config.json and *.safetensors (model.path=DIR), as "
                                 "`hf download OWNER/NAME --local-dir DIR` writes one, or a hub id OWNER/NAME")
    try:  # a hub id: use the local HF cache, download only when a network exists
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                              "*.txt", "*.jinja", "*.py"]))
    except Exception as e:  # offline, gated, unknown id ...
        raise CheckpointNotFound(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Without a network, download it elsewhere (e.g. "
            f"`hf download {name} --local-dir DIR`), copy DIR here and pass its path (model.path=DIR)") from None


def shard_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint (from the index when sharded)."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in ckpt.glob("*.safetensors"))
    if not files:
        raise CheckpointNotFound(f"{ckpt} holds no *.safetensors weights")
    return [ckpt / f for f in files]


def read_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint under their official names (small checkpoints, tests)."""
    from safetensors.torch import load_file

    sd = {}
    for f in shard_files(ckpt):
        sd.update(load_file(str(f)))
    return sd


def _fill_from_shards(model: Transformer, ckpt: Path) -> None:
    """Copy official-name tensors into ``model`` shard by shard (peak memory: model + one shard)."""
    from safetensors import SafetensorError, safe_open

    native = {o: n for n, o in official_names(model.cfg).items()}
    params = native_views(model)  # views into the fused q|k|v and gate|up weights
    seen = set()
    with torch.no_grad():
        for f in shard_files(ckpt):
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():
                        if key not in native:
                            continue  # e.g. rotary buffers some exports carry
                        p, t = params[native[key]], fh.get_tensor(key)
                        if p.shape != t.shape:
                            raise CheckpointError(f"{ckpt}: {key} has shape {tuple(t.shape)}, "
                                                  f"expected {tuple(p.shape)}")
                        p.copy_(t)
                        seen.add(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f} is not a readable safetensors file ({e}); it is truncated or "
                                      "corrupted: download the checkpoint again") from e
    missing = [o for o in native if o not in seen]
    if missing:
        raise MissingTensors(f"{ckpt}: checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")


def checkpoint_id(path_or_hub_id) -> str:
    """A cheap identity of a local checkpoint's weights: config + size and both ends of each file.

    Retraining or swapping weights changes it (a result computed from other weights must never be
    resumed into); reading 2 MiB per file keeps it fast for 8B checkpoints.  A hub id that is not
    a local directory is identified by its name.
    """
    import hashlib

    p = Path(path_or_hub_id).expanduser()
    if not (p / "config.json").exists():
        return str(path_or_hub_id)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in shard_files(p):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def load_tokenizer(ckpt: Path):
    if not any((ckpt / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None  # a weights-only directory (tests)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns about model_type
    try:
        return AutoTokenizer.from_pretrained(str(ckpt))
    finally:
        hf_logging.set_verbosity(level)


def build_spec(name: str, cfg: ModelConfig, raw: dict, tokenizer) -> BackboneSpec:
    eos = raw.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None:
        for t in EXTRA_EOS_TOKENS:
            tid = tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in eos_ids:
                eos_ids.append(tid)
    if not eos_ids or raw.get("mask_token_id") is None:
        raise ValueError(f"config.json of {name} must define mask_token_id and eos_token_id")
    pad = raw.get("pad_token_id")
    return BackboneSpec(
        name=name, family=cfg.family, mask_id=int(raw["mask_token_id"]), eos_ids=tuple(eos_ids),
        pad_id=int(pad if pad is not None else eos_ids[0]), vocab_size=cfg.vocab_size,
        max_length=cfg.max_length, bos_id=getattr(tokenizer, "bos_token_id", None),
        chat_template=getattr(tokenizer, "chat_template", None))


def _read_config(ckpt: Path) -> tuple[dict, ModelConfig]:
    """config.json of a checkpoint directory: the raw dict and the parsed architecture."""
    try:
        raw = json.loads((ckpt / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'} is not readable JSON ({e}); restore the "
                              "checkpoint's official config.json") from e
    try:
        return raw, config_from_official(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: {e.args[0] if e.args else e}") from e


TRAINED_CONTEXT = "trained_context"  # the record's key in training.json
# its fields (all optional): the longest prompt, the answer budgets (gen lengths) and the longest
# prompt + answer row training showed the model; max_length repeats config.json's, for the reader
TRAINED_FIELDS = {"prompt_tokens": int, "gen_lengths": list, "tokens": int, "max_length": int}


@dataclass(frozen=True)
class ContextLimits:
    """What a checkpoint supports and what it was trained for (the inputs of the length guard)."""

    directory: Path  # the resolved checkpoint directory
    max_length: int  # prompt + answer tokens the model can take at all (config.json; the RoPE table)
    trained: Optional[dict] = None  # training.json's ``trained_context`` record, or None without one


def read_trained_context(ckpt: Path) -> Optional[dict]:
    """The ``trained_context`` record of a checkpoint's training.json; None without one."""
    f = Path(ckpt) / "training.json"
    if not f.exists():
        return None
    try:
        rec = json.loads(f.read_text()).get(TRAINED_CONTEXT)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{f} is not a readable JSON object ({e}); restore the checkpoint's training.json") from e
    if rec is None:
        return None

    def ok(key, value) -> bool:
        if TRAINED_FIELDS[key] is list:
            return isinstance(value, list) and bool(value) and all(_positive_int(g) for g in value)
        return _positive_int(value)

    bad = [k for k in TRAINED_FIELDS if k in rec and not ok(k, rec[k])] if isinstance(rec, dict) else [TRAINED_CONTEXT]
    if bad:
        raise CheckpointError(f"{f}: {TRAINED_CONTEXT} is malformed ({', '.join(bad)}); valid: an object with "
                              "prompt_tokens, tokens, max_length (positive integers) and gen_lengths (a list of them)")
    return rec


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def context_limits(path_or_hub_id: Union[str, os.PathLike] = TINY_DIR) -> ContextLimits:
    """The checkpoint's ``max_length`` (config.json) and trained-context record (training.json),
    without loading its weights."""
    ckpt = _local_dir(path_or_hub_id)
    _, cfg = _read_config(ckpt)
    return ContextLimits(ckpt, cfg.max_length, read_trained_context(ckpt))


def load_backbone(path_or_hub_id: Union[str, os.PathLike] = TINY_DIR, *, dtype=None,
                  device=None) -> Backbone:
    """Load a LLaDA- or Dream-schema checkpoint into the native backbone.

    ``path_or_hub_id``: a local directory or a hub id (``GSAI-ML/LLaDA-8B-Instruct``).  dtype:
    torch dtype or one of fp32/bf16/fp16 (default fp32); device: ``auto`` (cuda when available).
    """
    ckpt = _local_dir(path_or_hub_id)
    raw, cfg = _read_config(ckpt)
    with torch.device("meta"):
        model = Transformer(cfg)
    # allocate once, directly in the target dtype/device; Transformer._apply keeps RoPE in fp32
    model = model.to(dtype=resolve_dtype(dtype)).to_empty(device=resolve_device(device))
    _fill_from_shards(model, ckpt)
    model.eval()
    tokenizer = load_tokenizer(ckpt)
    return Backbone(model, build_spec(str(path_or_hub_id), cfg, raw, tokenizer), tokenizer)


def save_checkpoint(model: Transformer, out: Path, token_ids: dict, tokenizer=None,
                    shard_size: Optional[int] = None, meta: Optional[dict] = None, dtype=torch.float32) -> None:
    """Write ``model`` as an official-schema checkpoint (optionally sharded with an index), its
    tensors in ``dtype`` (default fp32; :func:`load_backbone` casts to the dtype it is asked for)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = official_names(model.cfg)
    sd = {names[n]: p.detach().to(resolve_dtype(dtype)).contiguous().cpu() for n, p in native_views(model).items()}
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    if shard_size is None:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = list(sd)
        shards = [keys[i: i + shard_size] for i in range(0, len(keys), shard_size)]
        wmap = {}
        for i, ks in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: sd[k] for k in ks}, str(out / fname), metadata={"format": "pt"})
            wmap.update({k: fname for k in ks})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}, indent=1))
    (out / "config.json").write_text(json.dumps(official_config(model.cfg, token_ids), indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if meta is not None:
        (out / "training.json").write_text(json.dumps(meta, indent=1))
