"""Planning a model call: which positions it predicts, which columns it processes, whether it
writes K/V, and its refresh (None, ``compact``: the stale slots ride along, ``full``: every slot).

Refresh rules (both paths): with ``compact_refresh`` off, a full refresh at each GEN block's first
step (Fast-dLLM's rule), every ``refresh_every`` steps, and whenever the call would read a stale
slot; with it on, the stale slots are recomputed inside the call and only ``refresh_every``
forces a full refresh.  Either way the refresh is the step's own call (its logits are the step's).
"""
from __future__ import annotations

from asynclane import rules
from asynclane.lane.tree import GEN

__all__ = ["predicted_positions", "wants_full_refresh", "plan_row_call", "cached_row_columns", "rows_span"]


def predicted_positions(lanes, lookahead: int, end: int) -> list:
    """Sorted positions whose logits the lanes read: their working positions, plus ``lookahead``
    positions past each GEN block (capped at the answer's ``end``)."""
    pred = {p for l in lanes for p in l.working}
    pred |= {p for g in lanes if g.kind == GEN for p in range(g.stop, min(g.stop + lookahead, end))}
    return sorted(pred)


def wants_full_refresh(cfg, lanes) -> bool:
    """A full refresh this call (with a cache): a GEN lane at a block start when compact refresh is
    off, or at a ``refresh_every`` step."""
    every = cfg.refresh_every
    return any(rules.refresh_due(g.steps, every) and (every is not None or not cfg.compact_refresh)
               for g in lanes if g.kind == GEN)


def _prefix_start(first: int, stale: list, compact_refresh: bool) -> tuple:
    """A prefix call's first column and refresh: ``first``, or the first stale slot below it (compact
    refresh), or 0 (a full refresh)."""
    if stale and stale[0] < first:  # the cache would be read stale below `first`
        return (stale[0], "compact") if compact_refresh else (0, "full")
    return first, None


def _prefix_stop(stale: list, length: int, end: int, compact_refresh: bool) -> int:
    """A prefix call's end: the buffer's, or (compact) the answer's once the EOS tail is written."""
    if compact_refresh and end < length and (not stale or stale[-1] < end):
        return end  # the fixed EOS tail, once written, is read from the cache
    return length


def plan_row_call(cfg, state, lanes, need: list) -> tuple:
    """The one-row call: (columns, write, refresh).  Without a cache every call is a full forward."""
    if state.cache is None:
        return list(range(state.length)), False, None
    return cached_row_columns(cfg, wants_full_refresh(cfg, lanes), need, state.stale(), state.length, state.end)


def cached_row_columns(cfg, want_full: bool, need: list, stale: list, length: int, end: int) -> tuple:
    """A cached one-row call's (columns, write, refresh).

    ``need``: the columns the call must process (:func:`~asynclane.lane.device.processed_columns`); ``stale``:
    slots whose K/V no longer match the buffer; ``end``: the answer's end.  ``prefix``: from the
    first needed column (or stale slot) to the end; ``dual``: the needed columns only, written in
    place, plus (compact) every slot from the first stale one through the last needed column,
    since their K/V were computed with the old token in context.
    """
    if want_full:
        return list(range(length)), True, "full"
    if cfg.cache == "prefix":
        start, refresh = _prefix_start(need[0], stale, cfg.compact_refresh)
        stop = _prefix_stop(stale, length, end, cfg.compact_refresh)
        return list(range(start, stop)), cfg.compact_refresh or refresh == "full", refresh
    outside = sorted(set(stale) - set(need))
    if not outside:
        return need, True, None
    if cfg.compact_refresh:
        between = range(outside[0], need[-1] + 1) if outside[0] < need[-1] else ()
        return sorted(set(need) | set(outside) | set(between)), True, "compact"
    return list(range(length)), True, "full"


def rows_span(cfg, state, lanes, predicted: list) -> tuple:
    """A speculative call's columns ``(lo, hi)``, shared by every row, and its refresh.

    ``lo``: the first predicted position, or the first stale slot below it (compact refresh), or 0
    (a full refresh); the backbone may add columns left of it (Dream's left neighbour).  ``hi``: as a prefix call's end.  ``dual``
    behaves as ``prefix`` here: the rows differ to the right, so no cache can hold their right
    context.
    """
    if state.cache is None:
        return 0, state.length, None
    stale = state.stale()
    if wants_full_refresh(cfg, lanes):
        lo, refresh = 0, "full"
    else:
        lo, refresh = _prefix_start(predicted[0], stale, cfg.compact_refresh)
    return lo, _prefix_stop(stale, state.length, state.end, cfg.compact_refresh), refresh
