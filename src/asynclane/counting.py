"""CountingBackbone: the only place model calls are counted (samplers never count)."""
from __future__ import annotations


class CountingBackbone:
    """Wraps a :class:`~asynclane.backbone.Backbone`; counts NFE and token-forwards.

    nfe: number of ``forward``/``logits`` calls (one batched call == one function evaluation).
    token_forwards: sum over calls of the tokens processed (batch rows x query length, padding
    included, since the hardware computes it).  Everything else is delegated unchanged.
    """

    def __init__(self, backbone):
        self._bb = backbone
        self.reset()

    def reset(self) -> None:
        self.nfe = 0
        self.token_forwards = 0

    def forward(self, ids, *args, **kwargs):
        self.nfe += 1
        self.token_forwards += ids.numel()
        return self._bb.forward(ids, *args, **kwargs)

    def logits(self, input_ids):
        return self.forward(input_ids)

    def __getattr__(self, name):
        return getattr(self._bb, name)
