"""The embedded tiny dLLM: where it lives and how the trainer exports it."""
from __future__ import annotations

from pathlib import Path

from .loading import TINY_DIR, save_checkpoint

__all__ = ["TINY_DIR", "export_checkpoint"]


def export_checkpoint(model, tok, out: Path = TINY_DIR, meta=None, with_tokenizer: bool = True,
                      dtype="fp32") -> None:
    """Weights, config and (unless ``with_tokenizer`` is False) the tokenizer files into ``out``.

    The tokenizer is a pure function of the task vocabulary, so a remote training run may ship back
    only the weights (``with_tokenizer=False``) and the tokenizer be written where it lands.
    """
    ids = {"mask": tok.mask_token_id, "eos": tok.eos_token_id, "pad": tok.eos_token_id,
           "bos": tok.bos_token_id}
    save_checkpoint(model, out, ids, tokenizer=tok if with_tokenizer else None, meta=meta, dtype=dtype)
