"""The official Fast-dLLM-style model API (``model(x, use_cache=, past_key_values=, replace_position=)``)
on a native backbone, for tests that run a transcription of a reference ``generate`` loop.

The reference code slices ``past_key_values`` to a prefix and replaces a block's K/V in place;
:class:`ReferenceModel` maps those calls onto :class:`~asynclane.backbone.KVCache` so the
transcription runs unchanged against our model weights.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

__all__ = ["ReferenceModel"]


class _Past:
    """``past_key_values``: the cache plus how many leading slots the reference kept."""

    def __init__(self, cache, keep):
        self.cache, self.keep = cache, keep

    def sliced(self, end):  # the reference's `past_key_values[i][j][:, :, :end]` for every layer
        return _Past(self.cache, end)


class ReferenceModel:
    """``model(x, use_cache=..., past_key_values=..., replace_position=...)`` -> .logits (raw), .past_key_values.

    Raw logits of the plain model: Dream's are *not* shifted here (the Dream transcription shifts
    them itself), and the mask column is left alone (the random models never make the mask the
    argmax, so the sampler's never-propose-the-mask deviation is a no-op in these runs).
    """

    def __init__(self, bb):
        self.bb, self.nfe = bb, 0

    def __call__(self, x, past_key_values=None, use_cache=False, replace_position=None):
        self.nfe += 1
        bb, (B, T) = self.bb, x.shape
        if past_key_values is None:  # full forward (writing every position when use_cache)
            cache = bb.new_cache(B, T) if use_cache else None
            hidden = bb.model(x, torch.arange(T).expand(B, T), None, cache, write=use_cache)
            past = _Past(cache, T) if use_cache else None
        elif replace_position is None:  # prefix cache: the query is the tail after the kept slots
            past = past_key_values
            pos = torch.arange(past.keep, past.keep + T).expand(B, T)
            hidden = bb.model(x, pos, None, past.cache, write=False, slot_mask=past.cache.window(0, past.keep))
        else:  # dual cache: fresh block K/V replace their slots in place, then attend to all
            past = past_key_values
            pos = replace_position.nonzero()[:, 1].view(B, T)
            hidden = bb.model(x, pos, None, past.cache, write=True)
        return SimpleNamespace(logits=bb.model.head(hidden), past_key_values=past)
