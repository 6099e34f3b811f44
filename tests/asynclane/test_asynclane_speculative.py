"""asynclane's speculative lanes (``speculate``, the default with ``draft_reuse``) on random backbones.

Each iteration is one call of one row per active lane: lane i's row is the buffer with the drafts
(the previous view's proposals) of the lanes left of it filled in.  A REF lane takes its drafts
when its own row predicts every one with >= ``refine_threshold``; the first lane that does not
is the view, whose row drives the fast_dllm step of it and every lane to its right.
"""
import pytest
import torch

from asynclane.lane.tree import DONE, KILLED
from asynclane.testing import LogitsHook, random_prompts

from test_asynclane import CACHES, FORKY, _checked_forks, _Delim, _EosAt, _check_invariants, _run

SPEC = dict(FORKY, speculate=True)


class _Rows(LogitsHook):
    """Records the ids and positions of every call and, for a step, how it used the cache: its rows,
    ``write``, the lane cache's rows, and afterwards the tokens the cache holds at the call's columns
    and whether every lane row of the cache holds the same K/V."""

    def __init__(self, bb):
        super().__init__(bb)
        self.calls, self._step = [], None

    def step(self, x, cache, cols, **kwargs):
        self._step = {"rows": x.shape[0], "write": kwargs.get("write", True), "lanes": cache.lanes}
        logits = super().step(x, cache, cols, **kwargs)
        call, _ = self._bb.step_columns(cache, cols, kwargs.get("predict"))
        self.calls[-1]["step"].update(cached=cache.tokens[0, call].clone(),
                                      agree=all(torch.equal(kv[1:], kv[:1].expand_as(kv[1:])) for kv in cache.kv))
        return logits

    def adjust(self, logits, ids, positions, rows):
        self.calls.append({"ids": ids.clone(), "positions": positions.clone(), "step": self._step})
        self._step = None
        return logits


class _Chain(LogitsHook):
    """Lines of ``every`` positions (the delimiter of :class:`_Delim` at ``offset``), each with one
    *result* just before its delimiter that depends on the previous line's result.  Every position's
    target ``20 + p % 5`` gets a strong logit boost; but for a result whose previous result (``every``
    positions left) is a mask in the call: then a rival is boosted close behind, so the target is
    the argmax at low confidence.  So
    line k's draft is right and verifies once line k-1's is filled in: what speculation needs.
    Calls must be contiguous (the speculative path's are); positions left of a call are settled."""

    def __init__(self, bb, every=6, offset=3):
        super().__init__(bb)
        self.every, self.offset = every, offset

    def adjust(self, logits, ids, pos, rows):
        dep = pos - self.every
        inside = dep >= pos[:, :1]
        dep_tok = ids.gather(1, (dep - pos[:, :1]).clamp(min=0))
        known = ~inside | (dep_tok != self._bb.spec.mask_id)
        result = (pos % self.every) == (self.offset - 1) % self.every
        pos, known, result = pos.gather(1, rows), known.gather(1, rows), result.gather(1, rows)
        on = ((pos % self.every) != self.offset)
        target, rival = (20 + pos % 5)[..., None], (30 + pos % 5)[..., None]
        logits = logits.scatter_add(-1, target, (20.0 * on).to(logits.dtype)[..., None])
        weak = (result & ~known & on)[..., None]  # a rival 0.5 behind: the argmax, at p < 0.63
        return logits.scatter(-1, rival, torch.where(weak, logits.gather(-1, target) - 0.5, logits.gather(-1, rival)))


def _spec(bb, cache="prefix", **opts):
    prompts = random_prompts(bb, lengths=(7,), seed=3)
    return _run("asynclane", _Delim(_Chain(bb)), prompts, **{**SPEC, "cache": cache, **opts})


def _recorded(bb, cache="prefix", **opts):
    rows = _Rows(_Delim(_Chain(bb)))
    prompts = random_prompts(bb, lengths=(7,), seed=3)
    out, counting = _run("asynclane", rows, prompts, **{**SPEC, "cache": cache, **opts})
    return out, counting, rows.calls


@pytest.mark.parametrize("cache", CACHES)
def test_every_line_with_masks_forks_and_invariants_hold(backbone, cache):
    out, counting = _spec(backbone, cache)
    assert len(_checked_forks(out)) >= 2
    assert any(len(r["forks"]) >= 2 for r in out.trace)  # several lines with masks: one lane each, at once
    assert 2 <= max(r["rows"] for r in out.trace) <= 4  # max_lanes default
    assert any(r["accepted"] for r in out.trace)  # drafts were taken
    _check_invariants(out, backbone.spec, counting)


@pytest.mark.parametrize("cache", CACHES)
def test_one_call_of_one_row_per_lane_each_filling_the_drafts_left_of_it(backbone, cache):
    out, counting, calls = _recorded(backbone, cache)
    assert counting.nfe == len(calls) == len(out.trace)
    M = backbone.spec.mask_id
    for rec, call in zip(out.trace, calls):
        ids = call["ids"]
        assert ids.shape[0] == rec["rows"] == len({l["id"] for l in rec["lanes"]}) or rec["accepted"]
        for i in range(1, ids.shape[0]):  # a later row only fills masks of the row before it
            prev, cur = ids[i - 1], ids[i]
            assert bool(((prev == cur) | (prev == M)).all())
        if cache == "none":  # full forwards
            assert call["step"] is None
        else:  # one step over the lane cache, every row at once; the buffer's own row (row 0) is what it keeps
            step = call["step"]
            assert (step["rows"], step["write"], step["lanes"]) == (ids.shape[0], True, 4)
            assert step["agree"] and torch.equal(step["cached"], ids[0])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_without_lane_batching_each_row_is_its_own_step_and_only_row_0_writes(backbone, cache):
    out, counting, calls = _recorded(backbone, cache, lane_batching=False)
    batched, _, together = _recorded(backbone, cache)
    assert torch.equal(out.sequences, batched.sequences)
    assert counting.nfe == len(calls) == sum(r["rows"] for r in out.trace) > len(out.trace)
    i = 0
    for rec, joint in zip(out.trace, together):
        for r in range(rec["rows"]):  # the rows of the batched call, one step each, row 0 first
            call, i = calls[i], i + 1
            assert torch.equal(call["ids"][0], joint["ids"][r])
            step = call["step"]
            assert (step["rows"], step["write"], step["lanes"]) == (1, r == 0, 4)
            assert step["agree"] and torch.equal(step["cached"], joint["ids"][0])  # read-only rows leave it


def test_accepted_tokens_are_the_drafts_the_rows_right_of_them_saw(backbone):
    out, _, calls = _recorded(backbone)
    M = backbone.spec.mask_id
    accepted = 0
    for rec, call in zip(out.trace, calls):
        last, lo = call["ids"][-1], int(call["positions"][0, 0])
        for p in rec["accepted"]:
            assert int(last[p - lo]) != M and int(last[p - lo]) == int(out.sequences[0, p])
            assert int(call["ids"][0][p - lo]) == M  # the buffer still had a mask there
            accepted += 1
    assert accepted


def test_refine_threshold_above_one_accepts_nothing_and_still_finishes(backbone):
    out, counting = _spec(backbone, refine_threshold=1.01)
    assert not any(r["accepted"] for r in out.trace)
    _check_invariants(out, backbone.spec, counting)
    assert all(l["state"] != "ACTIVE" for l in out.info["lanes"])


def test_max_lanes_one_is_the_one_row_path_without_drafts(backbone):
    """No fork, one row: speculation has nothing to verify, so it is the plain path (cache none:
    both compute the whole buffer every call)."""
    opts = dict(max_lanes=1, cache="none")
    spec, c_spec = _spec(backbone, **opts)
    plain, c_plain = _spec(backbone, **opts, draft_reuse=False)
    assert torch.equal(spec.sequences, plain.sequences) and c_spec.nfe == c_plain.nfe


@pytest.mark.parametrize("cache", CACHES)
def test_cascade_ends_the_speculative_tree_at_the_first_eos(backbone, cache):
    spec = backbone.spec
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    bb = _EosAt(_Delim(backbone), position=7 + 20)
    on, c_on = _run("asynclane", bb, prompts, **SPEC, cache=cache)
    off, c_off = _run("asynclane", bb, prompts, **SPEC, cache=cache, cascade=False)
    q = next(i for i, t in enumerate(on.tokens[0].tolist()) if t in spec.eos_ids)
    assert (on.tokens[0, q + 1:] == spec.eos_id).all()
    assert c_on.nfe < c_off.nfe
    assert any(r["kills"] for r in on.trace) or all(l["state"] in (DONE, KILLED, "FORKED") for l in on.info["lanes"])
    _check_invariants(on, spec, c_on)
    _check_invariants(off, spec, c_off)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_compact_refresh_reads_the_cache_where_a_full_refresh_recomputes(backbone, cache):
    on, c_on = _spec(backbone, cache)
    off, c_off = _spec(backbone, cache, compact_refresh=False)
    assert c_on.nfe == len(on.trace) and c_off.nfe == len(off.trace)  # a refresh is never an extra call
    assert "full" in {r["refresh"] for r in off.trace}
    assert "full" not in {r["refresh"] for r in on.trace}
    assert c_on.token_forwards < c_off.token_forwards


def test_temperature_sampling_is_seeded_on_every_row(backbone):
    prompts = random_prompts(backbone, lengths=(7,), seed=3)  # a random backbone: sampling matters

    def sample(**opts):
        return _run("asynclane", _Delim(backbone), prompts, **SPEC, **opts)[0]
    a, b, greedy = sample(temperature=1.0), sample(temperature=1.0), sample()
    assert torch.equal(a.sequences, b.sequences)
    assert max(r["rows"] for r in a.trace) >= 2  # several rows drew their own noise
    assert not torch.equal(a.sequences, greedy.sequences)
