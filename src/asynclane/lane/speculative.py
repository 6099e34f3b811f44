"""The speculative path (``speculate`` with ``draft_reuse``, the default): one call row per lane.

Lane i's row is the buffer with the drafts (the previous call's proposals at masked positions) of
the lanes left of it filled in.  Verify, left to right: a REF lane whose own row confirms every one
of its drafts takes them.  The first lane that does not, or the first GEN lane, is the *view*: its
row holds only verified drafts, so the view lane and every lane right of it step on its ordinary
predictions, and its proposals become the next drafts.  Then cascade, a fork at every line that
still holds masks (:func:`~asynclane.lane.forks.line_forks`), and advance.
docs/samplers/asynclane.md, steps S1-S6.
"""
from __future__ import annotations

import torch

from asynclane import rules
from asynclane.lane.commit import (NEG_INF, apply_lane_steps, cascade, first_argmax, first_token_only, lane_commit,
                                   lane_record, restrict)
from asynclane.lane.device import CallResult, call_rows, read_back, token_probs
from asynclane.lane.forks import ForkRule, line_forks
from asynclane.lane.plan import predicted_positions, rows_span
from asynclane.lane.state import DecodeState
from asynclane.lane.tree import REF
from asynclane.sampler import Generation

__all__ = ["decode", "lane_rows", "verify_plan"]


def decode(cfg, backbone, prompts, rng, delimiters) -> Generation:
    """Decode one prompt on the speculative path (``cfg``: an AsyncLaneConfig)."""
    state = DecodeState.start(cfg, backbone, prompts, lanes=cfg.max_lanes)
    rule = ForkRule.of(cfg, state.mask_id, delimiters)
    drafts: dict = {}  # masked position -> the view's proposal there (the latest call's)
    while active := state.tree.active():
        checks = verify_plan(active, state.row, drafts, state.mask_id)
        call = _call(cfg, backbone, state, active, drafts, checks, rng)
        rec = {"iteration": state.iteration, "calls": 1 if cfg.lane_batching else len(active), "rows": len(active),
               "positions": len(call.columns), "refresh": call.refresh, "lanes": [], "forks": [], "kills": [],
               "accepted": [], "drafts": 0}
        view = _verify(cfg, state, active, checks, drafts, call, rec)
        _step_from_view(cfg, state, active, view, call, rec)
        cascade(cfg, state, rec)
        drafts = _next_drafts(state, active, view, call)
        rec["drafts"] = len(drafts)
        _fork_lines_or_advance(cfg, state, rule, rec)
        state.close_iteration(rec)
    return state.finish()


def lane_rows(active, row: list, drafts: dict) -> list:
    """The call's rows, one per active lane in position order: lane i's is the buffer with the
    drafts of the lanes left of it filled in (row 0 is the buffer itself)."""
    rows, filled = [], list(row)
    for lane in active:
        rows.append(list(filled))
        for p in lane.working:
            if p in drafts:
                filled[p] = drafts[p]
    return rows


def verify_plan(active, row: list, drafts: dict, mask_id: int) -> list:
    """The lanes verify may reach, left to right: the masked positions of each REF lane every mask
    of which holds a draft, up to the first lane that is not one (no later lane is checked)."""
    out = []
    for lane in active:
        masked = [p for p in lane.working if row[p] == mask_id]
        if lane.kind != REF or not masked or any(p not in drafts for p in masked):
            break
        out.append(masked)
    return out


def _call(cfg, backbone, state, active, drafts: dict, checks: list, rng) -> CallResult:
    """Plan and run the iteration's call over the lane rows; every row's proposals and confidences,
    and each checked draft's probability under its own lane's row, read back in one fetch."""
    predicted = predicted_positions(active, cfg.lookahead, state.end)
    lo, hi, refresh = rows_span(cfg, state, active, predicted)
    logits = call_rows(backbone, state.cache, lane_rows(active, state.row, drafts), (lo, hi), predicted,
                       cfg.lane_batching)
    columns = range(lo, hi) if state.cache is None else range(*backbone.plan(state.cache, (lo, hi), predicted)[0])
    if state.cache is not None:  # row 0's K/V (the buffer's own) are what the cache keeps
        state.mark_written(columns)
    logits = rules.without_mask(logits, state.mask_id)  # the drafts' probabilities too: under the same logits
    proposal = rules.gumbel_argmax(logits, cfg.temperature, rng)
    conf = rules.confidence_prob(logits, proposal, torch.float64)
    index = {p: i for i, p in enumerate(predicted)}
    flat = [(i, p) for i, masked in enumerate(checks) for p in masked]
    prob = token_probs(logits, [i for i, _ in flat], [index[p] for _, p in flat], [drafts[p] for _, p in flat])
    return read_back(proposal, conf, prob, predicted, columns, refresh)


def _verify(cfg, state, active, checks: list, drafts: dict, call: CallResult, rec: dict) -> int:
    """Each checked REF lane whose row predicts every one of its drafts with probability
    ``>= refine_threshold`` takes them (committed; it retires).  The view's index: the first lane
    not verified (``len(active)`` when every lane was)."""
    offset = 0
    for i, masked in enumerate(checks):
        probs, offset = call.prob[offset:offset + len(masked)], offset + len(masked)
        if not all(q >= cfg.refine_threshold for q in probs):
            return i
        lane = active[i]
        for p, q in zip(masked, probs):
            state.commit(p, drafts[p], q)
        lane.steps += 1
        rec["accepted"] += masked
        rec["lanes"].append(lane_record(lane, masked, accepted=True))
    return len(checks)


def _step_from_view(cfg, state, active, view: int, call: CallResult, rec: dict) -> None:
    """The view lane and every lane right of it take one lane step on the view's row (its drafts
    masked there; rows right of it are discarded).  Progress: when nothing was verified and nothing
    passed a threshold, the leftmost lane with masks commits its best position."""
    steps = []  # (record, region, score) per lane
    for lane in active[view:]:
        region = list(lane.working)
        masked = [state.row[p] == state.mask_id for p in region]
        score = restrict([call.confidence(p, view) for p in region], masked)
        commit = lane_commit(cfg, lane, score, masked, first_token_only(cfg, state, lane, call.refresh))
        steps.append((lane_record(lane, [region[j] for j in commit]), region, score))
        lane.steps += 1
    if not rec["accepted"] and not any(lane_rec["committed"] for lane_rec, _, _ in steps):
        for lane_rec, region, score in steps:
            if any(s > NEG_INF for s in score):
                lane_rec["committed"].append(region[first_argmax(score)])
                break
    apply_lane_steps(state, [lane_rec for lane_rec, _, _ in steps], call, rec, row=view)


def _next_drafts(state, active, view: int, call: CallResult) -> dict:
    """The next call's drafts: the view's proposals at every still-masked position it predicted
    (working blocks and lookahead), from the view lane on."""
    view_start = active[view].block_start if view < len(active) else state.end  # lanes are in position order
    return {p: call.token(p, view) for p in call.predicted
            if view_start <= p < state.end and state.row[p] == state.mask_id}


def _fork_lines_or_advance(cfg, state, rule: ForkRule, rec: dict) -> None:
    """Retire settled REF lanes; fork a GEN lane at every line that still holds masks while
    ``max_lanes`` allows (each line its own REF lane); advance a settled GEN lane that did not fork."""
    for lane in state.tree.active():
        if state.retire(lane):
            continue
        gen = lane
        for p in line_forks(state.row, state.conf_at, lane.block_start, min(lane.stop, state.end - 1), rule):
            if len(state.tree.active()) + 1 > cfg.max_lanes or p + 1 >= state.end:
                break
            gen = state.fork(gen, p, rec)
        if gen is lane and state.settled(lane):
            state.tree.advance(lane, state.end)
