"""Row pooling (``asynclane.rowpool``): batch > 1 for the samplers whose rules are per row.

The backbone primitive first (``Backbone.step_rows`` gives :meth:`Backbone.step`'s logits and cache
for the rows it carries, lane spreading included), then the pool: batched runs equal the rows run
one by one, the pooled calls are ragged (rows with different lanes and columns in one call), a
finished row leaves the calls, and a failing row fails the batch without hanging it.
"""
from __future__ import annotations

import pytest
import torch

import baselines  # noqa: F401  (registers the samplers)
from asynclane.counting import CountingBackbone
from asynclane.rowpool import RowBackbone, RowPool, pooled_generate
from asynclane.sampler import REGISTRY, build_sampler
from asynclane.testing import LogitsHook, random_backbone, random_prompts
from asynclane.testing.hf import FAMILIES, TOL, rand_ids, rel_err

POOLED = sorted(n for n, cls in REGISTRY.items() if cls.pools_rows)


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request):
    return random_backbone(request.param, seed=0)


def test_the_pooling_samplers():
    assert POOLED == ["adablock", "asynclane", "freedave", "freedave_pp", "window_diffusion"]
    assert all(REGISTRY[n].can_batch for n in POOLED)


# ------------------------------------------------------------------ Backbone.step_rows


def _rows_call(bb, cache, x, rows, cols, predict, write, spread=None):
    """step_rows for rows that each process ``cols[i]`` (lists, padded here) of ``x[i]``."""
    T = max(len(c) for c in cols)
    S = cache.length
    ids = torch.stack([torch.nn.functional.pad(x[i, c], (0, T - len(c)), value=bb.spec.pad_id)
                       for i, c in enumerate(map(torch.tensor, cols))])
    slots = torch.tensor([c + [S] * (T - len(c)) for c in cols])
    real = torch.tensor([[j < len(c) for j in range(T)] for c in cols])
    spread = None if spread is None else tuple(torch.tensor(s, dtype=torch.long) for s in spread)
    return bb.step_rows(ids, cache, rows, slots, real, torch.tensor(predict), write=write,
                        spread=spread)


def test_step_rows_equals_step_per_row_and_leaves_the_same_cache(bb):
    """Two sequences of different lengths in one pooled cache: a prefill, then ragged block steps
    (writing and read-only), each row equal to a batch-1 step on its own cache."""
    lengths = (24, 17)
    xs = [rand_ids(bb, 1, n, seed=40 + n) for n in lengths]
    own = [bb.new_cache(1, n) for n in lengths]
    S = max(lengths)
    valid = torch.stack([torch.arange(S) < n for n in lengths])
    pooled = bb.new_cache(2, S, key_mask=valid)
    buf = torch.stack([torch.nn.functional.pad(x[0], (0, S - x.shape[1])) for x in xs])
    # prefill: each row its whole sequence; predictions at each row's last 4 columns
    refs = [bb.step(x, c, (0, n), predict=(n - 4, n)) for x, c, n in zip(xs, own, lengths)]
    out = _rows_call(bb, pooled, buf, [0, 1], [list(range(n)) for n in lengths],
                     [list(range(n - 4, n)) for n in lengths], True)
    for i in range(2):
        assert rel_err(out[i:i + 1], refs[i]) <= TOL
    # ragged steps: row 0 a block of 6 columns, row 1 of 3 (Dream: the step adds each p - 1 itself)
    blocks = [(10, 16), (12, 15)]
    for write in (False, True):
        refs, cols, pred = [], [], []
        for x, c, (lo, hi) in zip(xs, own, blocks):
            planned, _ = bb.plan(c, (lo, hi), (lo, hi))
            call = list(range(*planned))
            refs.append(bb.step(x, c, (lo, hi), predict=(lo, hi), write=write))
            cols.append(call)
            pred.append([call.index(p) for p in range(lo, hi)])
        P = max(len(p) for p in pred)
        out = _rows_call(bb, pooled, buf, [0, 1], cols, [p + [0] * (P - len(p)) for p in pred], write)
        for i, (lo, hi) in enumerate(blocks):
            assert rel_err(out[i:i + 1, :hi - lo], refs[i]) <= TOL
    for i, (c, n) in enumerate(zip(own, lengths)):  # the same K/V and bookkeeping as each row's own cache
        assert torch.equal(pooled.filled[i, :n], c.filled[0]) and not pooled.filled[i, n:].any()
        assert torch.equal(pooled.tokens[i, :n], c.tokens[0])
        for layer in range(len(c.kv)):
            assert rel_err(pooled.kv[layer][i, :n], c.kv[layer][0, :n]) <= TOL


def test_step_rows_lane_rows_keep_row_zero_in_every_lane(bb):
    """A lane cache (one sequence, 3 rows) stepping 2 differing rows: the pooled call with ``spread``
    gives the lane step's logits and leaves every lane row holding row 0's K/V."""
    n, lanes = 20, 3
    x = rand_ids(bb, 1, n, seed=5)
    lane = bb.new_cache(1, n, lanes=lanes)
    pooled = bb.new_cache(lanes, n, key_mask=torch.ones(lanes, n, dtype=torch.bool))
    bb.step(x, lane, (0, n))
    _rows_call(bb, pooled, x.expand(lanes, n), [0, 1, 2], [list(range(n))] * lanes, [[0]] * lanes, True,
               spread=([1, 2], [0, 0]))
    rows = x.expand(2, n).clone()
    rows[1, 12:16] = rows[1, 4:8]  # the second lane row differs in its block
    lo, hi = bb.plan(lane, (10, 16), (10, 16))[0]
    ref = bb.step(rows, lane, (10, 16), predict=(10, 16))
    call = list(range(lo, hi))
    out = _rows_call(bb, pooled, rows, [0, 1], [call, call], [[call.index(p) for p in range(10, 16)]] * 2, True,
                     spread=([1, 2], [0, 0]))
    assert rel_err(out, ref) <= TOL
    for layer in range(len(lane.kv)):
        for r in range(lanes):
            assert rel_err(pooled.kv[layer][r, :n], lane.kv[layer][r, :n]) <= TOL
    assert torch.equal(pooled._tokens[:, :n], lane._tokens[:, :n])
    assert torch.equal(pooled._filled[:, :n], lane._filled[:, :n])


# ------------------------------------------------------------------ the pool


class Recorder(LogitsHook):
    """Records the rows and real tokens of every pooled step (and raises on call ``fail_at``)."""

    def __init__(self, bb, fail_at=None):
        super().__init__(bb)
        self.calls, self.fail_at = [], fail_at

    def step_rows(self, ids, cache, rows, slots, real, predict, **kwargs):
        self.calls.append((list(rows), real.sum(1).tolist()))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("boom")
        return super().step_rows(ids, cache, rows, slots, real, predict, **kwargs)


@pytest.mark.parametrize("name,opts", [
    ("asynclane", {}), ("asynclane", {"speculate": False}), ("asynclane", {"cache": "none"}),
    ("asynclane", {"cache": "dual"}), ("adablock", {}), ("adablock", {"cache": "none"}),
    ("window_diffusion", {}), ("freedave_pp", {}),
])
def test_embedded_model_batch_equals_singles(tiny, tiny_prompts, name, opts):
    """Real decodings (forks, adaptive blocks, windows, drafts) on prompts of different lengths."""
    prompts = tiny_prompts("arith", [0, 1]) + tiny_prompts("listops", [0, 3])
    assert len({len(p) for p in prompts}) == 4
    sampler = build_sampler(name, gen_length=64, **opts)
    counting = CountingBackbone(tiny)
    out = sampler.generate(counting, prompts, torch.Generator().manual_seed(0))
    pooled_nfe, singles = counting.nfe, []
    for r, p in enumerate(prompts):
        counting.reset()
        one = sampler.generate(counting, [p], torch.Generator().manual_seed(0))
        singles.append(counting.nfe)
        assert torch.equal(one.tokens, out.tokens[r:r + 1]), f"row {r}"
        assert out.info["rows"][r].keys() == one.info.keys()
    assert max(singles) <= pooled_nfe < sum(singles)


def test_rows_with_different_lanes_share_a_call_and_finished_rows_leave(tiny, tiny_prompts):
    """AsyncLane on four prompts: some pooled call carries rows with different numbers of lane rows
    and different column counts; calls after a row finished no longer carry it."""
    prompts = tiny_prompts("arith", [0, 1, 2, 3])
    rec = Recorder(tiny)
    build_sampler("asynclane", gen_length=64).generate(rec, prompts, torch.Generator().manual_seed(0))
    lanes = 4  # max_lanes: each prompt owns 4 rows of the pooled cache
    per_call = [{r // lanes: [] for r in rows} for rows, _ in rec.calls]
    for (rows, real), owners in zip(rec.calls, per_call):
        for r, n in zip(rows, real):
            owners[r // lanes].append(n)
    assert any(len({len(v) for v in owners.values()}) > 1 for owners in per_call), "no call mixed lane counts"
    assert any(len({n for v in owners.values() for n in v}) > 1 for owners in per_call), "no ragged call"
    sizes = [len(owners) for owners in per_call]
    assert sizes[0] == 4 and sizes[-1] < 4 and sizes == sorted(sizes, reverse=True)


def test_a_failing_call_fails_the_batch_without_hanging(llada):
    prompts = random_prompts(llada, lengths=(5, 8, 6))
    with pytest.raises(RuntimeError, match="boom"):
        build_sampler("asynclane", gen_length=32).generate(Recorder(llada, fail_at=3), prompts, torch.Generator())


def test_a_failing_row_fails_the_batch_with_its_own_error(llada):
    def one(backbone, prompts, rng):
        if len(prompts[0]) == 6:
            raise ValueError("row with 6 tokens")
        return build_sampler("asynclane", gen_length=32).generate(backbone, prompts, rng)

    with pytest.raises(ValueError, match="row with 6 tokens"):
        pooled_generate(one, llada, random_prompts(llada, lengths=(5, 6, 8)), torch.Generator())


def test_cached_general_forward_is_refused(llada):
    row = RowBackbone(RowPool(llada), 0)
    with pytest.raises(NotImplementedError, match="without a cache only"):
        row.forward(torch.zeros(1, 4, dtype=torch.long), cache=object())


def test_sampling_is_reproducible_per_batch(llada):
    prompts = random_prompts(llada, lengths=(5, 8))
    runs = [build_sampler("asynclane", gen_length=32, temperature=1.0).generate(
        llada, prompts, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
