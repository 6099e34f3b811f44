"""AsyncLane's decoding, behind the registered sampler (:mod:`asynclane.samplers.asynclane`).

Modules, bottom up:

* :mod:`~asynclane.lane.tree`: the lane tree (lanes, forks, cascade, stitching);
* :mod:`~asynclane.lane.forks`: the fork rules;
* :mod:`~asynclane.lane.state`: :class:`DecodeState`, one prompt's host-side decoding state;
* :mod:`~asynclane.lane.plan`: which columns a call covers and its refresh;
* :mod:`~asynclane.lane.device`: the model calls and the one device->host fetch per iteration;
* :mod:`~asynclane.lane.commit`: the lane step, trace records and cascade both paths apply;
* :mod:`~asynclane.lane.one_row` and :mod:`~asynclane.lane.speculative`: the two decoding paths,
  each a ``decode(cfg, backbone, prompts, rng, delimiters) -> Generation``.

The algorithm, its sources and the measured numbers: docs/samplers/asynclane.md.
"""
from asynclane.lane import one_row, speculative
from asynclane.sampler import delimiter_set
from asynclane.lane.state import DecodeState
from asynclane.lane.tree import ACTIVE, DONE, FORKED, GEN, KILLED, REF, Lane, LaneTree, stitch

__all__ = ["one_row", "speculative", "delimiter_set", "DecodeState", "ACTIVE", "DONE", "FORKED", "GEN", "KILLED",
           "REF", "Lane", "LaneTree", "stitch"]
