"""The Dream family's compensations, in one place (a later change removes them).

A Dream backbone predicts the token at ``p`` from the row of ``p - 1`` (backbone.py), so a
prediction needs its left neighbour in the call.  The paths make sure it is there:

* one-row path: a lane whose working block starts with a mask also carries ``block_start - 1``
  (:func:`with_left_neighbours`);
* speculative path: every row starts one column earlier (:func:`rows_start`);
* a one-row step names its predictions itself, and one whose ``p - 1`` is still missing gets a
  NaN row, as a general forward gives it (:func:`step_predict`, :func:`blank_rows`).
"""
from __future__ import annotations

import torch

__all__ = ["with_left_neighbours", "rows_start", "step_predict", "blank_rows"]


def with_left_neighbours(predicted: list, lanes, state) -> list:
    """The columns a one-row call needs: ``predicted`` plus, for Dream, the left neighbour of every
    lane whose working block starts with a mask."""
    need = set(predicted)
    if state.dream:
        need |= {l.block_start - 1 for l in lanes if state.row[l.block_start] == state.mask_id}
    return sorted(need)


def rows_start(lo: int, state) -> int:
    """The first column of a speculative call whose first prediction is at ``lo``."""
    return lo - 1 if state.dream and lo > 0 else lo


def step_predict(pred: list, cols: list, dream: bool) -> tuple:
    """A one-row step's ``predict`` (None: every processed column, in order) and the rows to blank.

    Dream: a prediction whose ``p - 1`` is not in the call has no row: NaN, as a general forward
    gave it (never committed, never re-masked).  For a host-named prediction the step would add
    ``p - 1`` to the call instead, so such a row asks for a column that has its left neighbour and
    is blanked afterwards: the call keeps its columns, and the head its rows, while
    :func:`with_left_neighbours` decides what the call holds.
    """
    if pred == cols:
        return None, []
    have = set(cols)
    blank = [i for i, p in enumerate(pred) if dream and p > 0 and p - 1 not in have]
    if not blank:
        return pred, []
    stand = next((c for c in cols if c == 0 or c - 1 in have), cols[0])
    gone = set(blank)
    return [stand if i in gone else p for i, p in enumerate(pred)], blank


def blank_rows(logits: torch.Tensor, blank: list) -> torch.Tensor:
    """``logits`` (1, P, V) with the rows ``blank`` (from :func:`step_predict`) set to NaN."""
    if not blank:
        return logits
    return logits.index_fill(1, torch.tensor(blank, device=logits.device), float("nan"))
