"""The commit rules both paths apply on the host: a lane's step, its trace record, and cascade.

A lane step (Fast-dLLM's threshold rule per lane): commit every masked working position whose
proposal confidence passes the lane's threshold (``threshold`` for GEN, ``refine_threshold`` for
REF; a REF lane fills every mask once ``refine_budget`` steps are spent).  Which lane must commit
at least its best position is each path's own progress rule.
"""
from __future__ import annotations

from asynclane.lane.tree import GEN, REF

__all__ = ["NEG_INF", "restrict", "first_argmax", "first_token_only", "lane_commit", "lane_record",
           "apply_lane_steps", "cascade"]

NEG_INF = float("-inf")


def restrict(conf: list, allowed: list) -> list:
    """One lane's scores: its confidences where allowed, ``-inf`` elsewhere (host
    :func:`asynclane.rules.restrict_confidence`)."""
    return [c if a else NEG_INF for c, a in zip(conf, allowed)]


def first_argmax(values: list) -> int:
    """The index of the first largest value (``torch.argmax``'s tie rule)."""
    return max(range(len(values)), key=values.__getitem__)


def first_token_only(cfg, state, lane, refresh) -> bool:
    """Dream + cache + compact refresh off: a GEN block's first step, a full refresh, commits only its
    first position (fast_dllm step 6; ``commit_first_after_refresh``)."""
    return (lane.kind == GEN and lane.steps == 0 and cfg.first_after_refresh(state.spec.family)
            and refresh == "full")


def lane_commit(cfg, lane, score: list, masked: list, first_only: bool) -> list:
    """Indices into ``score`` that ``lane`` commits this step: its threshold's passes, or only its
    block's first position (``first_only``, :func:`first_token_only`)."""
    if first_only:
        return [0] if masked[0] else []
    tau = cfg.threshold if lane.kind == GEN else cfg.refine_threshold
    if lane.kind == REF and lane.steps + 1 >= cfg.refine_budget:
        tau = NEG_INF
    return [j for j, s in enumerate(score) if s > NEG_INF and s >= tau]


def lane_record(lane, committed: list, **extra) -> dict:
    """A lane's trace record for one iteration."""
    return {"id": lane.id, "kind": lane.kind, "span": [lane.start, lane.stop], "block": [lane.block_start, lane.stop],
            "committed": committed, **extra}


def apply_lane_steps(state, records: list, call, rec: dict, row: int = 0) -> None:
    """Write each lane record's commits into the buffer (tokens and confidences from the call's row
    ``row``) and add the records to the iteration's ``rec``."""
    for lane_rec in records:
        for p in lane_rec["committed"]:
            state.commit(p, call.token(p, row), call.confidence(p, row))
        rec["lanes"].append(lane_rec)


def cascade(cfg, state, rec: dict) -> None:
    """Cascading termination: the leftmost committed EOS-like id ``q`` of the answer (confidence
    ``>= eos_threshold``) kills every lane right of it, truncates the one holding it, fills
    ``(q, end)`` with EOS and moves the answer's end to ``q + 1``."""
    if not cfg.cascade:
        return
    eos, row = set(state.spec.eos_ids), state.row
    q = next((q for q in range(state.prompt_length, state.end)
              if row[q] in eos and state.conf_at[q] >= cfg.eos_threshold), None)
    if q is not None and q + 1 < state.end:
        rec["kills"] = state.tree.cascade(q)
        row[q + 1:] = [state.spec.eos_id] * (len(row) - q - 1)
        state.end = q + 1
