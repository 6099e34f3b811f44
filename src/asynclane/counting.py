"""CountingBackbone: the only place model calls are counted (samplers never count)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountingBackbone:
    """Wraps a :class:`~asynclane.backbone.Backbone`; counts NFE and token-forwards.

    nfe: number of ``forward``/``step``/``step_rows``/``logits`` calls (one batched call == one function evaluation).
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

    def step(self, x, cache, cols, **kwargs):
        _, n = self._bb.plan(cache, cols, kwargs.get("predict"))  # the columns it processes, Dream's p-1 added
        self.nfe += 1
        self.token_forwards += x.shape[0] * n
        return self._bb.step(x, cache, cols, **kwargs)

    def step_rows(self, ids, cache, rows, slots, real, predict, **kwargs):
        self.nfe += 1
        self.token_forwards += ids.numel()
        return self._bb.step_rows(ids, cache, rows, slots, real, predict, **kwargs)

    def logits(self, input_ids):
        return self.forward(input_ids)

    def __getattr__(self, name):
        return getattr(self._bb, name)


SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::masked_select",
            "aten::nonzero_static", "aten::unique", "aten::_unique2", "aten::repeat_interleave", "Tensor.tolist")
"""What makes the host wait for the device: a scalar read, an output whose shape depends on data, or a
``Tensor.tolist()`` (on a CPU it dispatches no op, so :class:`OpCounter` counts the method itself)."""


class OpCounter(TorchDispatchMode):
    """A dispatch mode that counts every aten op run under it (``with OpCounter() as c: ...``).

    ``ops``: op name -> calls; ``syncs``: calls of :data:`SYNC_OPS` (host-device round trips on an
    accelerator); ``kernels``: calls of ops that compute (views and metadata-only ops excluded).
    """

    VIEW_OPS = {"view", "_unsafe_view", "transpose", "t", "slice", "select", "expand", "unsqueeze",
                "squeeze", "split", "chunk", "split_with_sizes", "alias", "detach", "permute", "as_strided",
                "unbind", "narrow", "reshape", "view_as", "lift_fresh", "_reshape_alias"}

    def __init__(self):
        super().__init__()
        self.ops = {}

    def __enter__(self):
        self._tolist = orig = torch.Tensor.tolist
        ops = self.ops

        def tolist(t, *args, **kwargs):
            ops["Tensor.tolist"] = ops.get("Tensor.tolist", 0) + 1
            return orig(t, *args, **kwargs)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(n for op, n in self.ops.items() if op in SYNC_OPS)

    @property
    def kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if "::" in op and op.split("::")[-1] not in self.VIEW_OPS)
