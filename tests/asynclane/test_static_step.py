"""The static decode step (``Backbone.step``) against the general call (``Backbone.forward``).

The general call is checked against HF oracles in test_cache.py; here every mode of the step
(refresh, prefix step, dual step, read-only call, lane batch, Dream's added p-1, padded rows) must
give the general call's logits (fp32, to rounding: the two attend the same keys in another order)
and leave the same cache.  Then the static properties: no host-device sync inside a step or a
cache-free forward, and ``torch.compile(fullgraph=True)`` traces the full forward, the prefix step
and the dual step without a graph break.
"""
from __future__ import annotations

import pytest
import torch

from asynclane.counting import CountingBackbone, OpCounter
from asynclane.testing import random_backbone
from asynclane.testing.hf import FAMILIES, TOL, rand_ids, rel_err

T = 32


def ar(lo, hi, B=1):
    return torch.arange(lo, hi).expand(B, hi - lo)


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request):
    return random_backbone(request.param, seed=0)


def _pair(bb, B=2):
    """A step cache and a general cache, both filled by a full write of the same buffer."""
    x = rand_ids(bb, B, T, seed=31)
    a, b = bb.new_cache(B, T), bb.new_cache(B, T)
    ref = bb.forward(x, cache=b, write=True)
    out = bb.step(x, a, (0, T))
    assert rel_err(out, ref) <= TOL
    return x, a, b


def _same_cache(a, b):
    assert torch.equal(a.filled, b.filled)
    for ka, kb, va, vb in zip(a.k, b.k, a.v, b.v):
        assert rel_err(ka, kb) <= TOL and rel_err(va, vb) <= TOL


def test_refresh_then_prefix_step_equals_the_general_call(bb):
    x, a, b = _pair(bb)
    x2 = x.clone()
    x2[:, 20:] = rand_ids(bb, 2, 12, seed=32)  # the block and suffix changed since the refresh
    lo, want = 16, (16, 24)
    ours = bb.step(x2, a, (lo, T), predict=want)
    # Dream: row 16 comes from 15, so the step processes 15..31 (the backbone adds p-1)
    s = lo - 1 if bb.cfg.family == "dream" else lo
    ref = bb.forward(x2[:, s:], ar(s, T, 2), cache=b, write=True, predict=ar(lo - s, lo - s + 8, 2))
    assert not torch.isnan(ours).any()
    assert rel_err(ours, ref) <= TOL
    _same_cache(a, b)


def test_dual_step_equals_the_general_call(bb):
    x, a, b = _pair(bb)
    x2 = x.clone()
    x2[:, 12:20] = rand_ids(bb, 2, 8, seed=33)
    ours = bb.step(x2, a, (12, 20))
    ref = bb.forward(x2[:, 12:20], ar(12, 20, 2), cache=b, write=True)
    assert rel_err(ours, ref) <= TOL
    _same_cache(a, b)


def test_read_only_step_leaves_the_cache_and_equals_a_read(bb):
    x, a, b = _pair(bb)
    before = [t.clone() for t in a.kv]
    tokens = a.tokens.clone()
    x2 = x.clone()
    x2[:, 12:20] = rand_ids(bb, 2, 8, seed=34)
    ours = bb.step(x2, a, (12, 20), write=False)
    ref = bb.forward(x2[:, 12:20], ar(12, 20, 2), cache=b)
    assert rel_err(ours, ref) <= TOL
    assert all(torch.equal(s, t) for s, t in zip(before, a.kv)) and torch.equal(tokens, a.tokens)


def test_cache_records_tokens_and_answers_what_is_stale(bb):
    x, a, _ = _pair(bb)
    assert torch.equal(a.tokens, x) and not a.stale(x).any()
    x2 = x.clone()
    x2[0, 5] = (x2[0, 5] + 1) % bb.spec.vocab_size
    assert a.stale(x2).nonzero().tolist() == [[0, 5]]
    a.invalidate(8, 10)
    assert a.stale(x)[:, 8:10].all() and not a.filled[:, 8:10].any()


def test_lane_step_equals_single_rows_and_keeps_row_0(bb):
    """A lane cache: every row attends the shared state plus its own K/V (= that row alone, read-only,
    on a one-row cache), and the cache then holds row 0's K/V (= a one-row write of row 0)."""
    prefix = rand_ids(bb, 1, T, seed=35)
    lanes = bb.new_cache(1, T, lanes=4)
    one = bb.new_cache(1, T)
    bb.step(prefix, lanes, (0, T))
    bb.forward(prefix, cache=one, write=True)
    rows = prefix.expand(3, -1).clone()
    rows[:, 20:] = rand_ids(bb, 3, 12, seed=36)
    ours = bb.step(rows, lanes, (16, T), predict=list(range(18, 26)))
    for r in range(3):
        alone = bb.forward(rows[r:r + 1, 16:], ar(16, T), cache=one, predict=ar(2, 10))
        assert rel_err(ours[r:r + 1], alone) <= TOL
    bb.forward(rows[:1, 16:], ar(16, T), cache=one, write=True)
    _same_cache(lanes, one)
    for r in range(1, lanes.rows):  # every row holds the state the cache keeps
        assert all(torch.equal(t[r], t[0]) for t in lanes.kv)
    # a one-row step on the lane cache afterwards: the same as on the one-row cache
    assert rel_err(bb.step(rows[:1], lanes, (24, T)), bb.forward(rows[:1, 24:], ar(24, T), cache=one, write=True)) <= TOL


def test_dream_step_adds_the_missing_left_neighbour():
    bb = random_backbone("dream", seed=0)
    x = rand_ids(bb, 1, T, seed=37)
    cache = bb.new_cache(1, T)
    bb.step(x, cache, (0, T))
    counting = CountingBackbone(bb)
    got = counting.step(x, cache, (20, T), predict=[20, 21])  # row 20 needs 19: the call becomes 19..31
    assert counting.token_forwards == 13
    assert bb.plan(cache, (20, T), [20, 21]) == ((19, T), 13)
    assert bb.plan(cache, [24, 28], [24, 28]) == ([23, 24, 27, 28], 4)
    full = bb.forward(x)  # a full forward: every row has its p-1
    assert not torch.isnan(got).any() and rel_err(got[0, 0], full[0, 20]) < 1e-3
    nan = bb.step(x, cache, (20, T), predict=torch.tensor([20, 21]))  # a tensor: nothing added, row 20 NaN
    assert torch.isnan(nan[0, 0]).all() and not torch.isnan(nan[0, 1]).any()


def test_padded_rows_on_the_step_equal_single_rows(bb):
    """Left-padded rows (the cache's key mask: positions restart at each row's first token) give
    each row the logits of its unpadded single run, in a refresh and in a dual step."""
    lengths, S = [12, 7], 16
    ids = rand_ids(bb, 2, S, seed=38)
    km = torch.zeros(2, S, dtype=torch.bool)
    for r, n in enumerate(lengths):
        km[r, S - 4 - n:] = True
    cache = bb.new_cache(2, S, key_mask=km)
    full = bb.step(ids, cache, (0, S))
    blk = bb.step(ids, cache, (S - 4, S))
    for r, n in enumerate(lengths):
        one = bb.new_cache(1, n + 4)
        row = ids[r:r + 1, S - 4 - n:]
        f1 = bb.step(row, one, (0, n + 4))
        assert rel_err(full[r, S - 4 - n:], f1[0]) <= TOL
        assert rel_err(blk[r], bb.step(row, one, (n, n + 4))[0]) <= TOL


def test_step_arguments_are_checked_on_the_host(bb):
    x, a, _ = _pair(bb)
    with pytest.raises(IndexError, match="step columns"):
        bb.step(x, a, (20, T + 1))
    with pytest.raises(IndexError, match="distinct"):
        bb.step(x, a, [3, 3])
    with pytest.raises(ValueError, match="lane cache"):
        bb.step(x[:1], a, (0, 4))
    with pytest.raises(ValueError, match="max_length"):
        bb.new_cache(1, bb.cfg.max_length + 1)


# ---------------------------------------------------------------- static properties

def _calls(bb):
    x = rand_ids(bb, 1, T, seed=39)
    cache = bb.new_cache(1, T)
    lanes = bb.new_cache(1, T, lanes=3)
    bb.step(x, cache, (0, T))
    bb.step(x, lanes, (0, T))
    rows = x.expand(3, -1).clone()
    return {
        "full (no cache)": lambda: bb.forward(x),
        "refresh": lambda: bb.step(x, cache, (0, T), predict=(8, 16)),
        "prefix step": lambda: bb.step(x, cache, (8, T), predict=(8, 16)),
        "dual step": lambda: bb.step(x, cache, (8, 16)),
        "read-only step": lambda: bb.step(x, cache, (8, 16), write=False),
        "subset step": lambda: bb.step(x, cache, [9, 10, 14, 15]),
        "3-lane step": lambda: bb.step(rows, lanes, (8, T), predict=list(range(8, 24))),
    }


def test_no_host_device_sync_inside_a_call(bb):
    for name, call in _calls(bb).items():
        with OpCounter() as c:
            call()
        assert c.syncs == 0, f"{name}: {c.syncs} syncs {({k: v for k, v in c.ops.items() if 'scalar' in k or 'nonzero' in k})}"


def test_every_call_traces_as_one_graph(bb):
    """``torch.compile(..., fullgraph=True)`` of the layer stack: a graph break would raise."""
    torch._dynamo.reset()
    try:
        bb.compile(backend="eager")
        calls = _calls(bb)
        for name in ("full (no cache)", "prefix step", "dual step", "3-lane step"):
            calls[name]()
    finally:
        bb.uncompile()
        torch._dynamo.reset()
