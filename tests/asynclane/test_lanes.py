"""The lane tree and the fork rules (asynclane.lane.tree, asynclane.lane.forks)."""
import json

import pytest
import torch

from asynclane.lane.forks import ForkRule, fork_point, line_forks
from asynclane.lane.tree import ACTIVE, DONE, FORKED, GEN, KILLED, REF, LaneTree, stitch

EOS = 99


def test_root_lane_owns_the_first_block():
    tree = LaneTree(10, 42, 8)
    assert tree.active() == [tree.root]
    root = tree.root
    assert (root.kind, root.start, root.stop, root.block_start, root.state) == (GEN, 10, 18, 10, ACTIVE)


def test_advance_moves_the_block_and_finishes_at_the_end():
    tree = LaneTree(0, 20, 8)
    g = tree.root
    assert tree.advance(g, 20) and (g.start, g.block_start, g.stop, g.steps) == (0, 8, 16, 0)
    assert tree.advance(g, 20) and (g.block_start, g.stop) == (16, 20)  # the last block is cut at the end
    assert not tree.advance(g, 20) and g.state == DONE


def test_fork_splits_the_span_ref_then_gen():
    tree = LaneTree(0, 64, 8)
    g = tree.root
    tree.advance(g, 64)  # span [0, 16), working block [8, 16)
    r, c = tree.fork(g, 11, 64, iteration=3)
    assert g.state == FORKED and g.children == [r.id, c.id]
    assert (r.kind, r.start, r.block_start, r.stop) == (REF, 0, 8, 12)  # the REF lane edits only its working block
    assert (c.kind, c.start, c.block_start, c.stop) == (GEN, 12, 12, 20)  # a full block from the boundary on
    assert r.parent == c.parent == g.id and r.born == c.born == 3
    assert [l.id for l in tree.active()] == [r.id, c.id]
    assert [l.id for l in tree.leaves()] == [r.id, c.id]
    tree.check()


def test_nested_forks_keep_leaves_in_output_order():
    tree = LaneTree(0, 64, 8)
    r1, c1 = tree.fork(tree.root, 3, 64, 0)
    r2, c2 = tree.fork(c1, 6, 64, 1)
    assert [l.id for l in tree.leaves()] == [r1.id, r2.id, c2.id]
    assert [(l.start, l.stop) for l in tree.leaves()] == [(0, 4), (4, 7), (7, 15)]
    tree.check()


@pytest.mark.parametrize("p", [-1, 8, 7])
def test_fork_rejects_a_boundary_outside_the_block_or_at_the_end(p):
    tree = LaneTree(0, 64, 8)
    with pytest.raises(ValueError, match="cannot fork"):
        tree.fork(tree.root, p, 8 if p == 7 else 64, 0)  # 7: no budget after it


def test_cascade_kills_lanes_right_of_the_eos_and_truncates_its_lane():
    tree = LaneTree(0, 64, 8)
    r1, c1 = tree.fork(tree.root, 3, 64, 0)  # REF [0, 4), GEN [4, 12)
    r2, c2 = tree.fork(c1, 6, 64, 1)  # REF [4, 7), GEN [7, 15)
    killed = tree.cascade(5)
    assert killed == [c2.id] and c2.state == KILLED
    assert (r2.start, r2.stop) == (4, 6) and r2.state == ACTIVE and (r1.start, r1.stop) == (0, 4)
    tree.check()  # killed leaves may leave a gap past the answer's end
    assert [l.id for l in tree.active()] == [r1.id, r2.id]


def test_check_catches_overlapping_live_lanes():
    tree = LaneTree(0, 64, 8)
    r, c = tree.fork(tree.root, 3, 64, 0)
    c.start = 2
    with pytest.raises(AssertionError, match="overlap"):
        tree.check()


def test_stitch_reads_leaf_spans_in_order_and_cuts_at_the_first_eos():
    tree = LaneTree(2, 14, 4)
    r, c = tree.fork(tree.root, 3, 14, 0)  # REF [2, 4), GEN [4, 8)
    tree.advance(c, 14)  # GEN [4, 12)
    tokens = [7, 7, 1, 2, 3, 4, 5, 6, 7, EOS, 8, EOS, 0, 0]
    assert stitch(tokens, tree, [EOS]) == [1, 2, 3, 4, 5, 6, 7, EOS]
    assert stitch(tokens, tree, [42]) == [1, 2, 3, 4, 5, 6, 7, EOS, 8, EOS]  # leaves end at 12


def test_tree_is_inspectable_json():
    tree = LaneTree(0, 32, 8)
    tree.fork(tree.root, 5, 32, 0)
    d = json.loads(json.dumps(tree.to_dicts()))
    assert [x["kind"] for x in d] == [GEN, REF, GEN] and d[0]["children"] == [1, 2]
    assert d[1]["span"] == [0, 6] and d[2]["span"] == [6, 14] and d[0]["state"] == FORKED


def test_cascade_also_kills_finished_lanes_right_of_the_eos():
    # a continuation that finished (DONE) before an EOS was committed to its left is cut too,
    # so the non-killed leaves still tile the answer up to the EOS
    tree = LaneTree(10, 74, 32)
    root = tree.root
    ref, gen = tree.fork(root, 20, 74, 1)
    gen.state = DONE
    killed = tree.cascade(15)
    assert killed == [gen.id] and gen.state == KILLED
    assert (ref.start, ref.stop) == (10, 16)
    tree.check()


# ----------------------------------------------------------------------------- fork rules

M, D = 9, 5  # mask id and a delimiter id in these hand-made rows


def _rule(delimiters=(D,), **kw):
    opts = {"delimiter_threshold": 0.5, "min_prefix": 4, "max_residual_fraction": 0.25, **kw}
    return ForkRule(M, frozenset(delimiters), **opts)


def _fork(tokens, conf=None, lo=0, hi=None, **kw):
    t = torch.tensor(tokens)
    c = torch.tensor(conf if conf is not None else [1.0] * len(tokens), dtype=torch.float64)
    return fork_point(t, c, lo, len(tokens) if hi is None else hi, _rule(**kw))


def test_fork_point_needs_a_mostly_settled_prefix_with_something_left():
    assert _fork([1, M, 2, 3, D, M, M]) == 4  # 1 mask in a prefix of 5 (<= 1.25)
    assert _fork([1, 2, 3, 4, D, M, M]) is None  # nothing to refine: plain block decoding
    assert _fork([M, M, 2, 3, D, M, M]) is None  # 2 masks > 0.25 * 5
    assert _fork([M, M, 2, 3, D, M, M], max_residual_fraction=0.4) == 4


def test_fork_point_takes_the_rightmost_qualifying_delimiter():
    assert _fork([1, M, 2, D, 3, 4, 6, 7, D, M]) == 8
    # the right one's prefix is too unsettled, the left one qualifies
    assert _fork([1, M, 2, D, M, M, M, 7, D, M], min_prefix=4) == 3


def test_fork_point_respects_confidence_min_prefix_and_window():
    row = [1, M, 2, 3, D, M]
    assert _fork(row, conf=[1, 0, 1, 1, 0.4, 0]) is None  # delimiter committed without confidence
    assert _fork(row, min_prefix=6) is None
    assert _fork([7, 7] + row, lo=2) == 6  # positions are absolute; only [lo, hi) is read
    assert _fork([7, 7] + row, lo=2, hi=6) is None  # the delimiter lies outside the window
    assert _fork(row, delimiters=set()) is None
    assert fork_point(row, [1.0] * 6, 0, 6, _rule()) == 4  # Python lists as well as tensors


def test_line_forks_splits_at_every_line_that_still_holds_a_mask():
    rule = _rule(min_prefix=3)
    row = [1, M, D, 2, M, 3, D, 4, 5, 6, D, M, D, M]
    # [0, 3) has a mask; [3, 7) has one; [7, 11) has none (no fork, the line runs on); [7, 13) has one
    assert line_forks(row, [1.0] * len(row), 0, len(row), rule) == [2, 6, 12]
    assert line_forks(row, [1.0] * len(row), 0, len(row), _rule(min_prefix=5)) == [6, 12]
    assert line_forks(row, [0.4] * len(row), 0, len(row), rule) == []  # delimiters without confidence
    assert line_forks([7] + row, [1.0] * 15, 1, 15, rule) == [3, 7, 13]  # positions are absolute
