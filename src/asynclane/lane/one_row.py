"""The one-row path (``speculate=False`` or ``draft_reuse=False``): every lane in one buffer row.

Each iteration is one call over the row (the lanes own disjoint spans of it), one step of every
active lane on its logits, a cascade, then at most one fork (:func:`~asynclane.lane.forks.fork_point`)
or the advance of a finished GEN block, whose new block is seeded from this call's lookahead
predictions (``draft_reuse``).  docs/samplers/asynclane.md, steps 1-9.
"""
from __future__ import annotations

import math

import torch

from asynclane import rules
from asynclane.lane.commit import (NEG_INF, apply_lane_steps, cascade, first_argmax, first_token_only, lane_commit,
                                   lane_record)
from asynclane.lane.device import CallResult, call_row, processed_columns, read_back, token_probs
from asynclane.lane.forks import ForkRule, fork_point
from asynclane.lane.plan import plan_row_call, predicted_positions
from asynclane.lane.state import DecodeState
from asynclane.sampler import Generation

__all__ = ["decode"]


def decode(cfg, backbone, prompts, rng, delimiters) -> Generation:
    """Decode one prompt on the one-row path (``cfg``: an AsyncLaneConfig)."""
    state = DecodeState.start(cfg, backbone, prompts)
    rule = ForkRule.of(cfg, state.mask_id, delimiters)
    seeded: set = set()  # positions committed from drafts, not yet re-verified
    while active := state.tree.active():
        checks = [p for l in active for p in l.working if p in seeded]  # the guard's, at this forward
        n_calls = 1 if cfg.lane_batching else len(active)
        call = _call(cfg, backbone, state, active, checks, n_calls, rng)
        rec = {"iteration": state.iteration, "calls": n_calls, "positions": len(call.columns),
               "refresh": call.refresh, "lanes": [], "forks": [], "kills": [], "seeded": [], "remasked": []}
        _step_lanes(cfg, state, active, call, seeded, dict(zip(checks, call.prob)), rec)
        cascade(cfg, state, rec)
        seeded = {p for p in seeded if p < state.end}
        _fork_or_advance(cfg, state, rule, call, seeded, rec)
        state.close_iteration(rec)
    return state.finish()


def _call(cfg, backbone, state, active, checks: list, n_calls: int, rng) -> CallResult:
    """Plan and run the iteration's call; its proposals, confidences and the checked drafts'
    probabilities, read back in one fetch.  The call processes the lanes' working blocks and
    lookahead; logits are read where they are used: masked positions and checked drafts."""
    span = predicted_positions(active, cfg.lookahead if cfg.draft_reuse else 0, state.end)
    predicted = [p for p in span if state.row[p] == state.mask_id or p in checks]
    need = processed_columns(backbone, state, span, predicted)
    columns, write, refresh = plan_row_call(cfg, state, active, need)
    columns = processed_columns(backbone, state, columns, predicted)
    logits = call_row(backbone, state, columns, predicted, write, n_calls)
    if write:
        state.mark_written(columns)
    index = {p: i for i, p in enumerate(predicted)}
    proposal = rules.propose(logits, state.mask_id, cfg.temperature, rng)
    conf = rules.confidence_prob(logits, proposal, torch.float64)
    prob = token_probs(logits, [0] * len(checks), [index[p] for p in checks], [state.row[p] for p in checks])
    return read_back(proposal, conf, prob, predicted, columns, refresh)


def _step_lanes(cfg, state, active, call: CallResult, seeded: set, draft_prob: dict, rec: dict) -> None:
    """One step of every active lane.  Progress: only the leftmost lane that still has masks commits
    at least its best position; lanes right of it (conditioned on it) commit only what passes their
    threshold, so a fresh continuation is not forced to guess while its prefix settles."""
    records, forced = [], None  # forced: (record, position) of the leftmost masked lane's best
    for lane in active:
        region = list(lane.working)
        _guard(cfg, state, region, seeded, draft_prob, rec)
        # a re-masked draft's logits came from a call that saw the draft, not a mask: it waits
        masked = [state.row[p] == state.mask_id and p not in rec["remasked"] for p in region]
        _check_rows(cfg, lane, region, masked, call)
        first = first_token_only(cfg, state, lane, call.refresh)
        score = [call.confidence(p) if m else NEG_INF for p, m in zip(region, masked)]
        records.append(lane_record(lane, [region[j] for j in lane_commit(cfg, lane, score, masked, first)]))
        if not first and any(masked) and forced is None:
            forced = (records[-1], region[first_argmax(score)])
        lane.steps += 1
    if forced is not None and not forced[0]["committed"]:
        forced[0]["committed"].append(forced[1])
    apply_lane_steps(state, records, call, rec)


def _guard(cfg, state, region: list, seeded: set, draft_prob: dict, rec: dict) -> None:
    """Draft guard: at the lane's next forward, a seeded token whose probability falls below
    ``threshold / 2`` is re-masked."""
    for p in [p for p in region if p in seeded]:
        seeded.discard(p)
        if draft_prob[p] < cfg.threshold / 2:
            state.row[p] = state.mask_id
            rec["remasked"].append(p)


def _check_rows(cfg, lane, region: list, masked: list, call: CallResult) -> None:
    """Every masked position got finite logits (a non-finite row would stall the lane)."""
    if any(m and math.isnan(call.confidence(p)) for p, m in zip(region, masked)):
        cols = call.columns
        raise RuntimeError(f"lane {lane.id}: NaN logits for masked positions of {region[0]}..{region[-1]} "
                           f"(call positions {cols[0]}..{cols[-1]}, cache={cfg.cache})")


def _fork_or_advance(cfg, state, rule: ForkRule, call: CallResult, seeded: set, rec: dict) -> None:
    """Retire settled REF lanes; fork at most one GEN lane, else advance a settled GEN lane; seed the
    block a fork or an advance opens."""
    forked = False
    for lane in state.tree.active():
        if state.retire(lane):
            continue
        p = None if forked else _fork_point(cfg, state, rule, lane)
        if p is not None:
            forked = True
            rec["seeded"] += _seed(cfg, state, state.fork(lane, p, rec), call, seeded)
        elif state.settled(lane) and state.tree.advance(lane, state.end):
            rec["seeded"] += _seed(cfg, state, lane, call, seeded)


def _fork_point(cfg, state, rule: ForkRule, lane):
    """The GEN lane's fork boundary, if a lane is free (``max_lanes``) and budget is left after it."""
    if len(state.tree.active()) + 1 > cfg.max_lanes:
        return None
    return fork_point(state.row, state.conf_at, lane.block_start, min(lane.stop, state.end - 1), rule)


def _seed(cfg, state, lane, call: CallResult, seeded: set) -> list:
    """Draft reuse: commit the new block's masked positions this call predicted with confidence
    ``>= draft_threshold``, without a model call; the seeded positions."""
    if not cfg.draft_reuse:
        return []
    out = []
    for p in lane.working:
        if p in call.index and state.row[p] == state.mask_id and call.confidence(p) >= cfg.draft_threshold:
            state.commit(p, call.token(p), call.confidence(p))
            seeded.add(p)
            out.append(p)
    return out
