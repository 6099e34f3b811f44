"""One prompt's decoding state, shared by both paths and kept on the host.

The buffer and every piece of bookkeeping are Python lists: the lane rules read and write them
between model calls without touching the device (each iteration reads the device once,
:func:`asynclane.lane.device.read_back`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from asynclane.lane.tree import DONE, REF, Lane, LaneTree, stitch
from asynclane.sampler import Generation, finish, left_pad

__all__ = ["DecodeState"]


@dataclass
class DecodeState:
    """What one decoding reads and writes between model calls.

    ``row``: the buffer, prompt then answer (token ids); ``prompt_length``: the prompt's part;
    ``cache``: the KV cache (None with ``cache=none``); ``written``: the token whose K/V each cache
    slot holds (-1: none yet); ``conf_at``: the confidence each token was committed with;
    ``tree``: the lane tree; ``end``: the answer's end (the buffer's length until a cascade fixes
    the EOS tail ``[end, length)``); ``trace``: one record per finished iteration.
    """

    spec: Any  # the backbone's BackboneSpec
    device: Any
    row: list
    prompt_length: int
    cache: Optional[Any]
    written: list
    conf_at: list
    tree: LaneTree
    end: int
    trace: list = field(default_factory=list)

    @classmethod
    def start(cls, cfg, backbone, prompts, lanes: int = 1) -> "DecodeState":
        """Prompt + ``gen_length`` masks, an empty cache (``lanes`` rows: a lane cache), the root lane."""
        spec = backbone.spec
        x, _, P = left_pad(prompts, cfg.gen_length, spec.pad_id, spec.mask_id)  # batch 1: no padding
        row = x[0].tolist()
        T = len(row)
        cache = None if cfg.cache == "none" else backbone.new_cache(1, T, lanes=lanes)
        return cls(spec, backbone.device, row, P, cache, [-1] * T, [0.0] * T, LaneTree(P, T, cfg.block_length), T)

    @property
    def length(self) -> int:
        return len(self.row)

    @property
    def iteration(self) -> int:
        """The running iteration's number (0-based)."""
        return len(self.trace)

    @property
    def mask_id(self) -> int:
        return self.spec.mask_id

    def stale(self) -> list:
        """Cache slots whose K/V were computed for another token than the buffer holds now."""
        return [p for p in range(self.length) if self.written[p] != self.row[p]]

    def mark_written(self, columns) -> None:
        """The call just wrote the buffer's tokens at ``columns`` into the cache."""
        for p in columns:
            self.written[p] = self.row[p]

    def commit(self, p: int, token: int, confidence: float) -> None:
        self.row[p], self.conf_at[p] = token, confidence

    def settled(self, lane: Lane) -> bool:
        """No mask left in the lane's working positions."""
        return self.mask_id not in self.row[lane.block_start:lane.stop]

    def retire(self, lane: Lane) -> bool:
        """A REF lane is DONE once settled.  True for a REF lane: it neither forks nor advances."""
        if lane.kind != REF:
            return False
        if self.settled(lane):
            lane.state = DONE
        return True

    def fork(self, lane: Lane, p: int, rec: dict) -> Lane:
        """Fork GEN lane ``lane`` at boundary ``p`` (children born next iteration); the GEN child."""
        ref, gen = self.tree.fork(lane, p, self.end, self.iteration + 1)
        rec["forks"].append({"parent": lane.id, "at": p, "ref": ref.id, "gen": gen.id})
        return gen

    def close_iteration(self, rec: dict) -> None:
        self.tree.check()
        self.trace.append(rec)

    def finish(self) -> Generation:
        """The Generation: the buffer (on the device), the trace, the final tree and the answer stitched from it."""
        return finish(torch.tensor([self.row], device=self.device), self.prompt_length, self.spec, trace=self.trace,
                      info={"lanes": self.tree.to_dicts(), "stitched": stitch(self.row, self.tree, self.spec.eos_ids),
                            "iterations": len(self.trace)})
