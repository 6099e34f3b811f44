"""The lane tree: lanes with disjoint spans, their states, and output stitching.

The paper names generate and refine lanes and a lane tree that records dependencies and the order
in which lane outputs are stitched back together; the states, spans and split rule below are ours
(docs/research/asynclane.md §3.2).

* A :class:`Lane` owns the half-open span ``[start, stop)`` of absolute buffer positions.  Spans
  of live (ACTIVE) lanes never overlap.  A GEN lane decodes a working block
  ``[block_start, stop)`` at the right end of its span (everything before it is already decoded);
  advancing moves ``block_start`` to ``stop`` and ``stop`` one block further.  A REF lane decodes
  the masks left in its span.
* A fork at boundary ``p`` turns a GEN lane into an internal FORKED node with two children in
  output order: REF ``[start, p + 1)`` then GEN ``[p + 1, ...)``.  The leaves of the tree, read in
  order, therefore tile the answer left to right, which is all that stitching needs.
* Cascading termination at an EOS in position ``q`` kills every live lane starting after ``q``
  (KILLED) and truncates the lane holding ``q`` to end at ``q + 1``.

Everything here is plain Python data: ``LaneTree.to_dicts()`` is what a user inspects (``span``:
``[start, stop]``, ``block``: ``[block_start, stop]``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

__all__ = ["GEN", "REF", "ACTIVE", "FORKED", "DONE", "KILLED", "Lane", "LaneTree", "stitch"]

GEN, REF = "GEN", "REF"
ACTIVE, FORKED, DONE, KILLED = "ACTIVE", "FORKED", "DONE", "KILLED"


@dataclass
class Lane:
    """One lane: its kind (GEN / REF), its span ``[start, stop)`` and the working block's start
    (``block_start``; for a REF lane the start of the block it was forked from)."""

    id: int
    kind: str
    start: int
    stop: int
    block_start: int
    parent: Optional[int] = None
    children: list = field(default_factory=list)  # lane ids in output order (REF child, GEN child)
    state: str = ACTIVE
    steps: int = 0  # forwards spent on the current working block (GEN) / on the span (REF)
    born: int = 0  # iteration at which the lane was created

    @property
    def working(self) -> range:
        """Positions this lane may commit now: the GEN working block, or the REF span."""
        return range(self.block_start, self.stop)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "span": [self.start, self.stop],
                "block": [self.block_start, self.stop], "parent": self.parent, "children": list(self.children),
                "state": self.state, "steps": self.steps, "born": self.born}


class LaneTree:
    """The lane tree of one sequence.  ``lanes[i]`` has id ``i``; lane 0 is the root GEN lane."""

    def __init__(self, start: int, end: int, block: int):
        if not start < end:
            raise ValueError(f"empty answer span [{start}, {end})")
        self.block = block
        self.lanes = [Lane(0, GEN, start, min(start + block, end), start)]

    @property
    def root(self) -> Lane:
        return self.lanes[0]

    def active(self) -> list:
        """ACTIVE lanes in position order."""
        return sorted((l for l in self.lanes if l.state == ACTIVE), key=lambda l: l.start)

    def leaves(self) -> list:
        """Leaf lanes (every state but FORKED) by an in-order walk: their spans in output order."""
        out = []

        def walk(lane):
            if lane.children:
                for c in lane.children:
                    walk(self.lanes[c])
            else:
                out.append(lane)
        walk(self.root)
        return out

    def advance(self, g: Lane, end: int) -> bool:
        """Move GEN lane ``g`` to the next block; False (and DONE) when it reached ``end``."""
        if g.stop >= end:
            g.state = DONE
            return False
        g.block_start, g.stop, g.steps = g.stop, min(g.stop + self.block, end), 0
        return True

    def fork(self, g: Lane, p: int, end: int, iteration: int) -> tuple:
        """Split GEN lane ``g`` at boundary ``p`` (last position of the prefix): (REF child, GEN child)."""
        if g.kind != GEN or g.state != ACTIVE or not g.block_start <= p < g.stop or p + 1 >= end:
            raise ValueError(f"cannot fork lane {g.id} ({g.kind}, {g.state}, block [{g.block_start}, {g.stop})) "
                             f"at {p}")
        r = Lane(len(self.lanes), REF, g.start, p + 1, g.block_start, parent=g.id, born=iteration)
        # p >= block_start, so the child's block reaches past the parent's: the parent's later tokens move with it
        c = Lane(len(self.lanes) + 1, GEN, p + 1, min(p + 1 + self.block, end), p + 1, parent=g.id, born=iteration)
        self.lanes += [r, c]
        g.children, g.state = [r.id, c.id], FORKED
        return r, c

    def cascade(self, q: int) -> list:
        """EOS committed at ``q``: kill the leaf lanes (ACTIVE or DONE) right of it, truncate the one
        holding it; killed ids."""
        killed = []
        for lane in self.lanes:  # live and finished leaves: a lane right of q may already be DONE
            if lane.state not in (ACTIVE, DONE):
                continue
            if lane.start > q:
                lane.state = KILLED
                killed.append(lane.id)
            elif lane.stop > q + 1:
                lane.stop = q + 1
                lane.block_start = min(lane.block_start, lane.stop)
        return killed

    def check(self) -> None:
        """Invariants: live spans are disjoint and non-empty; the non-killed leaves tile one range."""
        live = self.active()
        for a, b in zip(live, live[1:]):
            if a.stop > b.start:
                raise AssertionError(f"lanes {a.id} [{a.start},{a.stop}) and {b.id} [{b.start},{b.stop}) overlap")
        for l in live:
            if not l.start <= l.block_start <= l.stop or l.start >= l.stop:
                raise AssertionError(f"lane {l.id} has a bad span/block: {l.to_dict()}")
        leaves = [l for l in self.leaves() if l.state != KILLED]  # killed lanes lie past the answer's end
        for a, b in zip(leaves, leaves[1:]):
            if a.stop != b.start:
                raise AssertionError(f"leaves {a.id} and {b.id} do not tile: [{a.start},{a.stop}) "
                                     f"then [{b.start},{b.stop})")

    def to_dicts(self) -> list:
        return [l.to_dict() for l in self.lanes]


def stitch(tokens: list, tree: LaneTree, eos_ids: Iterable[int]) -> list:
    """The answer read from the tree: leaf spans in order, then cut after the first EOS-like id.

    ``tokens``: the whole buffer (one row) as a list of ids, indexed by absolute position.
    """
    eos = set(int(t) for t in eos_ids)
    out = []
    for leaf in tree.leaves():
        for t in tokens[leaf.start:leaf.stop]:
            out.append(t)
            if t in eos:
                return out
    return out
