"""asynclane: degenerate equivalence with fast_dllm, lane-tree invariants, forks, the four ablation switches.

Forks need committed delimiters; the random backbones have no tokenizer, so the tests pass
``delimiter_ids`` and use :class:`_Delim`, which boosts one id's logit at every ``every``-th
absolute position (a "line break" every few tokens) so it is committed with high confidence.
"""
import json

import pytest
import torch

from asynclane.sampler import delimiter_set
from asynclane.lane.plan import cached_row_columns
from asynclane.lane.tree import DONE, GEN, KILLED, REF
from asynclane.sampler import build_sampler, first_eos_cut
from asynclane.samplers.asynclane import AsyncLaneConfig
from asynclane.testing import LogitsHook, random_prompts, run_counted

import baselines  # noqa: E402,F401  (registers fast_dllm for the equivalence tests)

CACHES = ["none", "prefix", "dual"]
DELIM = 10  # an ordinary id of the random vocabulary, used as the delimiter
OFF = dict(max_lanes=1, draft_reuse=False, cascade=False, compact_refresh=False)


class _Delim(LogitsHook):
    """Adds ``boost`` to the delimiter's logit in rows predicting positions ``p % every == offset``."""

    def __init__(self, bb, every=6, offset=3, boost=20.0):
        super().__init__(bb)
        self.every, self.offset, self.boost = every, offset, boost

    def adjust(self, logits, ids, positions, rows):
        pos = positions.gather(1, rows)
        add = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        add[DELIM] = self.boost
        return logits + ((pos % self.every) == self.offset)[..., None] * add


class _EosAt(LogitsHook):
    """Adds ``boost`` to the EOS-like logits of rows predicting absolute position ``position``."""

    def __init__(self, bb, position, boost=30.0):
        super().__init__(bb)
        self.position, self.boost = position, boost

    def adjust(self, logits, ids, positions, rows):
        pos = positions.gather(1, rows)
        eos = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        eos[list(self._bb.spec.eos_ids)] = self.boost
        return logits + (pos == self.position)[..., None] * eos


def _run(name, bb, prompts, **opts):
    return run_counted(name, bb, prompts, 0, **opts)


FORKY = dict(gen_length=64, block_length=16, delimiter_ids=[DELIM], max_residual_fraction=0.5, speculate=False)


def _forky(bb, cache="prefix", **opts):
    prompts = random_prompts(bb, lengths=(7,), seed=3)
    return _run("asynclane", _Delim(bb), prompts, **{**FORKY, "cache": cache, **opts})


# --- degenerate equivalence -------------------------------------------------------------------

@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("gen_length,block_length,threshold,refresh_every",
                         [(32, 8, 0.9, None), (32, 16, 0.5, None), (24, 8, 0.0, None), (32, 8, 0.3, 2)])
def test_one_lane_without_mechanisms_is_fast_dllm(backbone, cache, gen_length, block_length, threshold, refresh_every):
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    opts = dict(gen_length=gen_length, block_length=block_length, threshold=threshold, cache=cache,
                refresh_every=refresh_every)
    ours, c_ours = _run("asynclane", backbone, prompts, **opts, **OFF)
    ref, c_ref = _run("fast_dllm", backbone, prompts, **opts)
    assert torch.equal(ours.sequences, ref.sequences)
    assert c_ours.nfe == c_ref.nfe and c_ours.token_forwards == c_ref.token_forwards
    assert len(ours.trace) == c_ours.nfe


def test_one_lane_equivalence_holds_with_delimiters_present(backbone):
    """max_lanes=1 never forks, even when delimiters are committed confidently."""
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    opts = dict(gen_length=64, block_length=16, threshold=0.9, cache="prefix")
    ours, c_ours = _run("asynclane", _Delim(backbone), prompts, delimiter_ids=[DELIM], **opts, **OFF)
    ref, c_ref = _run("fast_dllm", _Delim(backbone), prompts, **opts)
    assert (ours.tokens == DELIM).any()
    assert torch.equal(ours.sequences, ref.sequences) and c_ours.nfe == c_ref.nfe
    assert not any(r["forks"] for r in ours.trace)


# --- forks and invariants ---------------------------------------------------------------------

def _check_invariants(out, spec, counting, batched=True):
    assert not (out.tokens == spec.mask_id).any()
    assert out.info["stitched"] == first_eos_cut(out.tokens, spec.eos_ids)[0]
    json.dumps(out.trace), json.dumps(out.info["lanes"])  # inspectable, serialisable
    if batched:
        assert counting.nfe == len(out.trace) == out.info["iterations"]
    for rec in out.trace:
        spans = sorted(tuple(l["span"]) for l in rec["lanes"])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"overlapping live lanes at {rec}"
        for l in rec["lanes"]:
            lo, hi = l["block"]
            assert all(lo <= p < hi for p in l["committed"]), f"lane {l['id']} edited outside its block"
            if l["kind"] == REF:
                assert all(l["span"][0] <= p < l["span"][1] for p in l["committed"])
    lanes = out.info["lanes"]
    assert all(l["state"] in (DONE, KILLED, "FORKED") for l in lanes)  # nothing left ACTIVE


def _checked_forks(out) -> list:
    """Every fork of the trace, each checked: on a committed delimiter, REF then GEN child."""
    forks = [f for r in out.trace for f in r["forks"]]
    lanes = out.info["lanes"]
    for f in forks:
        assert out.sequences[0, f["at"]] == DELIM  # every fork sits on a committed delimiter
        assert lanes[f["ref"]]["kind"] == REF and lanes[f["gen"]]["kind"] == GEN
        assert lanes[f["parent"]]["children"] == [f["ref"], f["gen"]]
        assert lanes[f["gen"]]["span"][0] == f["at"] + 1
    return forks


@pytest.mark.parametrize("cache", CACHES)
def test_forks_happen_and_invariants_hold(backbone, cache):
    out, counting = _forky(backbone, cache)
    assert len(_checked_forks(out)) >= 1
    for i, rec in enumerate(out.trace[:-1]):  # both children run in the very next call
        for f in rec["forks"]:
            assert {f["ref"], f["gen"]} <= {l["id"] for l in out.trace[i + 1]["lanes"]}
    assert max(len(r["lanes"]) for r in out.trace) >= 2  # lanes really ran concurrently
    assert max(len(r["lanes"]) for r in out.trace) <= AsyncLaneConfig().max_lanes
    _check_invariants(out, backbone.spec, counting)


@pytest.mark.parametrize("max_lanes", [2, 3])
def test_max_lanes_caps_the_active_set(backbone, max_lanes):
    out, counting = _forky(backbone, max_lanes=max_lanes)
    assert max(len(r["lanes"]) for r in out.trace) <= max_lanes
    _check_invariants(out, backbone.spec, counting)


def test_refine_budget_fills_the_prefix(backbone):
    out, _ = _forky(backbone, refine_budget=1)
    for lane in out.info["lanes"]:
        if lane["kind"] == REF:  # one step, then DONE
            assert lane["steps"] == 1 and lane["state"] == DONE


def test_temperature_sampling_is_seeded(backbone):
    a, _ = _forky(backbone, temperature=1.0)
    b, _ = _forky(backbone, temperature=1.0)
    assert torch.equal(a.sequences, b.sequences)


# --- the four ablation switches ---------------------------------------------------------------

@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("cache", CACHES)
def test_lane_batching_off_costs_one_call_per_lane_for_the_same_output(backbone, cache, speculate):
    on, c_on = _forky(backbone, cache, speculate=speculate)
    off, c_off = _forky(backbone, cache, lane_batching=False, speculate=speculate)
    assert torch.equal(on.sequences, off.sequences)
    assert c_on.nfe == len(on.trace)
    assert c_off.nfe == sum(len(r["lanes"]) for r in on.trace) > c_on.nfe
    if speculate:  # one row per lane either way: the same tokens go through the model
        assert c_off.token_forwards == c_on.token_forwards
    else:  # the packed row is repeated once per lane
        assert c_off.token_forwards > c_on.token_forwards


def test_draft_reuse_seeds_new_blocks_without_a_call(backbone):
    on, _ = _forky(backbone, draft_threshold=0.0)  # every lookahead prediction seeds
    off, _ = _forky(backbone, draft_threshold=0.0, draft_reuse=False)
    seeded = [p for r in on.trace for p in r["seeded"]]
    assert seeded and not any(r["seeded"] for r in off.trace)
    # the guard: low-probability seeds are re-masked at the lane's next forward
    assert any(r["remasked"] for r in on.trace)
    # seeded positions were committed by no lane step (they came from the lookahead)
    stepped = {p for r in on.trace for l in r["lanes"] for p in l["committed"]}
    remasked = {p for r in on.trace for p in r["remasked"]}
    assert all(p in remasked or p not in stepped for p in seeded)
    # a re-masked draft waits for the next call: the call that re-masked it saw the draft token
    # there, not a mask, so its proposal at that position is no prediction
    for r in on.trace:
        same_step = {p for l in r["lanes"] for p in l["committed"]}
        assert not same_step & set(r["remasked"]), r


@pytest.mark.parametrize("cache", CACHES)
def test_cascade_ends_the_tree_at_the_first_eos(backbone, cache):
    spec = backbone.spec
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    bb = _EosAt(_Delim(backbone), position=7 + 20)
    opts = dict(FORKY, cache=cache)
    on, c_on = _run("asynclane", bb, prompts, **opts)
    off, c_off = _run("asynclane", bb, prompts, **opts, cascade=False)
    assert on.finished.all() and off.finished.all()
    q = next(i for i, t in enumerate(on.tokens[0].tolist()) if t in spec.eos_ids)
    assert (on.tokens[0, q + 1:] == spec.eos_id).all()
    assert c_on.nfe < c_off.nfe
    _check_invariants(on, spec, c_on)
    _check_invariants(off, spec, c_off)


def test_prefix_calls_stop_at_the_answer_end_once_the_eos_tail_is_written(backbone):
    # compact refresh + prefix cache: after a cascade fixes the EOS tail and one call has written
    # it, later calls end at the answer's end instead of the buffer's (token-forwards, not NFE)
    spec = backbone.spec
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    bb = _EosAt(_Delim(backbone), position=7 + 12)
    on, c_on = _run("asynclane", bb, prompts, **dict(FORKY, cache="prefix"))
    off, c_off = _run("asynclane", bb, prompts, **dict(FORKY, cache="prefix"), compact_refresh=False)
    q = next(i for i, t in enumerate(on.tokens[0].tolist()) if t in spec.eos_ids)
    T = on.sequences.shape[1]
    cut = [i for i, r in enumerate(on.trace) if r["kills"] or i and on.trace[i - 1]["kills"]]
    later = on.trace[(cut[-1] + 2 if cut else len(on.trace)):]
    assert all(r["positions"] <= q + 1 for r in later)
    assert c_on.token_forwards < c_off.token_forwards
    assert q < T - 1
    _check_invariants(on, spec, c_on)


def test_eos_threshold_above_one_never_cascades(backbone):
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    bb = _EosAt(_Delim(backbone), position=7 + 20)
    high, c_high = _run("asynclane", bb, prompts, **FORKY, eos_threshold=1.01)
    off, c_off = _run("asynclane", bb, prompts, **FORKY, cascade=False)
    assert torch.equal(high.sequences, off.sequences) and c_high.nfe == c_off.nfe
    assert not any(r["kills"] for r in high.trace)


class _LateEos(_EosAt):
    """EOS boosted at ``position`` only from the ``after``-th call on (an EOS that arrives late)."""

    def __init__(self, bb, position, after, boost=30.0):
        super().__init__(bb, position, boost)
        self.after, self.calls = after, 0

    def adjust(self, logits, ids, positions, rows):
        self.calls += 1
        if self.calls <= self.after:
            return logits
        return super().adjust(logits, ids, positions, rows)


@pytest.mark.parametrize("cache", CACHES)
def test_cascade_kills_lanes_right_of_an_eos_in_a_refine_lane(backbone, cache):
    """An EOS committed by a REF lane kills the continuation GEN lane to its right at once."""
    plain, _ = _forky(backbone, cache)
    i, fork = next((i, r["forks"][0]) for i, r in enumerate(plain.trace) if r["forks"])
    ref = plain.info["lanes"][fork["ref"]]
    # a position of the new REF lane that is still masked when the next call is planned
    nxt = plain.trace[i + 1]
    ref_step = next(l for l in nxt["lanes"] if l["id"] == fork["ref"])
    later = {p for r in plain.trace[i + 1:] for l in r["lanes"] if l["id"] == fork["ref"] for p in l["committed"]}
    m = min(later)
    assert ref["block"][0] <= m < ref["span"][1] and ref_step
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    out, counting = _run("asynclane", _LateEos(_Delim(backbone), m, after=i + 1), prompts, **FORKY, cache=cache)
    rec = out.trace[i + 1]
    assert rec["kills"] == [fork["gen"]] and out.info["lanes"][fork["gen"]]["state"] == KILLED
    assert out.tokens[0, m - 7] in backbone.spec.eos_ids and (out.tokens[0, m - 7 + 1:] == backbone.spec.eos_id).all()
    assert len(out.trace) < len(plain.trace)
    _check_invariants(out, backbone.spec, counting)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_compact_refresh_recomputes_only_stale_slots_inside_the_step(backbone, cache):
    on, c_on = _forky(backbone, cache)
    off, c_off = _forky(backbone, cache, compact_refresh=False)
    kinds_on = {r["refresh"] for r in on.trace} - {None}
    kinds_off = {r["refresh"] for r in off.trace} - {None}
    assert kinds_on == {"compact"} and kinds_off == {"full"}
    assert c_on.nfe == len(on.trace) and c_off.nfe == len(off.trace)  # fused: no extra call either way
    assert c_on.token_forwards < c_off.token_forwards
    # a compact refresh never spans the whole buffer after the first call
    T = on.sequences.shape[1]
    assert all(r["positions"] < T for r in on.trace[1:] if r["refresh"])


def test_dual_compact_refresh_recomputes_from_the_first_stale_slot_to_the_working_positions():
    """A dual-cache compact call rewrites [first stale slot, last working position], not the stale
    slots alone: K/V between a changed token and the lanes were computed with the old token in
    context.  (Stale slots only: the embedded model fell from 96% to 76% exact on arith, L=256.)"""
    cfg = AsyncLaneConfig(gen_length=64, cache="dual")
    cols, write, refresh = cached_row_columns(cfg, False, [40, 41, 42, 50], [12, 20, 41], 70, 70)
    assert cols == list(range(12, 51)) and write and refresh == "compact"
    # stale slots only right of the working positions (the EOS fill after a cascade): just those
    cols, _, refresh = cached_row_columns(cfg, False, [40, 41], [60, 61], 70, 70)
    assert cols == [40, 41, 60, 61] and refresh == "compact"
    cols, _, refresh = cached_row_columns(cfg, False, [40, 41], [41], 70, 70)  # nothing stale outside: no refresh
    assert cols == [40, 41] and refresh is None


# --- delimiters, configuration, batch ---------------------------------------------------------

class _Tok:
    def __init__(self, words):
        self.words = words

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


def test_delimiters_come_from_the_tokenizer_or_the_option(backbone):
    class _WithTok(LogitsHook):
        def __init__(self, bb, tok):
            super().__init__(bb)
            self.tokenizer = tok

    V = backbone.spec.vocab_size
    words = [f"w{i}" for i in range(V)]
    words[3], words[5], words[backbone.spec.eos_ids[0]] = "\n", ".\n\n", "\n"  # EOS never a delimiter
    assert delimiter_set(_WithTok(backbone, _Tok(words)), None) == {3, 5}
    assert delimiter_set(_WithTok(backbone, _Tok(words)), [7]) == {7}
    assert delimiter_set(backbone, None) == frozenset()  # no tokenizer, no option: no forks
    out, _ = _run("asynclane", _Delim(backbone), random_prompts(backbone, lengths=(7,), seed=3),
                  gen_length=64, block_length=16, max_residual_fraction=0.5)
    assert not any(r["forks"] for r in out.trace)


def test_defaults():
    cfg = AsyncLaneConfig(gen_length=256)
    assert (cfg.block_length, cfg.threshold, cfg.cache, cfg.max_lanes) == (32, 0.9, "prefix", 4)
    assert cfg.lane_batching and cfg.draft_reuse and cfg.cascade and cfg.compact_refresh
    assert not cfg.first_after_refresh("dream")  # compact refresh carries the left neighbour instead
    assert AsyncLaneConfig(gen_length=64, compact_refresh=False).first_after_refresh("dream")


@pytest.mark.parametrize("opts,match", [
    (dict(gen_length=32, cache="full"), r"cache='full' is not one of none, prefix, dual"),
    (dict(gen_length=32, block_length=24), r"block_length=24 must divide gen_length=32"),
    (dict(gen_length=32, threshold=float("nan")), r"threshold=nan"),
    (dict(gen_length=32, max_residual_fraction=1.5), r"max_residual_fraction=1.5"),
    (dict(gen_length=32, max_lanes=0), r"max_lanes=0"),
    (dict(gen_length=32, lookahead=-1), r"lookahead=-1"),
    (dict(gen_length=32, refresh_every=0), r"refresh_every=0"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        build_sampler("asynclane", **opts)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refresh_every_forces_full_refreshes_even_with_compact_refresh(backbone, cache):
    out, counting = _forky(backbone, cache, refresh_every=2)
    full = [r["iteration"] for r in out.trace if r["refresh"] == "full"]
    assert full and counting.nfe == len(out.trace)  # still fused: the refresh's logits are the step's
    T = out.sequences.shape[1]
    assert all(out.trace[i]["positions"] == T for i in full)
    _check_invariants(out, backbone.spec, counting)


@pytest.mark.parametrize("cache", CACHES)
def test_only_the_leftmost_lane_with_masks_is_forced_to_commit(backbone, cache):
    # thresholds above 1: nothing passes, so every commit is a forced one.  Exactly one per
    # iteration, in the leftmost lane that still has masks; lanes right of it (a continuation
    # whose prefix is unsettled) are never forced to guess
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    opts = dict(FORKY, cache=cache, threshold=1.5, refine_threshold=1.5, refine_budget=10 ** 6,
                draft_reuse=False, cascade=False)
    gen, _ = _run("asynclane", _Delim(backbone), prompts, **opts)
    assert any(r["forks"] for r in gen.trace)
    done = set()
    for r in gen.trace:
        with_masks = [l for l in r["lanes"] if set(range(*l["block"])) - done]
        committed = [(l["id"], p) for l in r["lanes"] for p in l["committed"]]
        assert len(committed) == 1, r
        assert committed[0][0] == with_masks[0]["id"], r
        done |= {p for _, p in committed}
