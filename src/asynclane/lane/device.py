"""What runs on the device each iteration: the model call of either path, the probabilities the
lane rules read, and the one device->host fetch of everything the iteration needs.

The host sends the call's rows in one copy and reads back once (:func:`read_back`): one
host-device sync per iteration; the model calls themselves make none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from asynclane import rules
from asynclane.sampler import read_host

__all__ = ["CallResult", "processed_columns", "call_row", "call_rows", "token_probs", "read_back"]


@dataclass
class CallResult:
    """One iteration's call, read back on the host.

    ``predicted``: the positions whose logits were read, in call order; ``proposal`` / ``conf``:
    per call row, the proposed token at each predicted position and its confidence; ``prob``: the
    probabilities of the tokens checked (drafts), in check order; ``columns``: the buffer columns
    the call processed; ``refresh``: None, ``compact`` or ``full``.
    """

    predicted: list
    proposal: list
    conf: list
    prob: list
    columns: object
    refresh: Optional[str]
    index: dict = field(init=False)  # position -> its index in `predicted`

    def __post_init__(self):
        self.index = {p: i for i, p in enumerate(self.predicted)}

    def token(self, p: int, row: int = 0) -> int:
        return self.proposal[row][self.index[p]]

    def confidence(self, p: int, row: int = 0) -> float:
        return self.conf[row][self.index[p]]


def processed_columns(backbone, state, columns: list, predicted: list) -> list:
    """The buffer columns a one-row call over ``columns`` that reads logits at ``predicted``
    processes: ``columns`` plus whatever the backbone adds for those predictions
    (:meth:`Backbone.plan`; the Dream family's left neighbours).  Without a cache: ``columns``."""
    if state.cache is None:
        return columns
    cols, _ = backbone.plan(state.cache, columns, predicted)
    return list(range(*cols)) if isinstance(cols, tuple) else cols


def call_row(backbone, state, columns: list, predicted: list, write: bool, n_calls: int) -> torch.Tensor:
    """The one-row call: logits (1, len(predicted), V).  Without a cache a full forward; with one a
    :meth:`Backbone.step` over ``columns`` (``(lo, hi)`` when contiguous; ``write=False``: read-only).
    Repeated ``n_calls`` times without lane batching (same inputs, same logits)."""
    x = torch.tensor([state.row], device=backbone.device)
    if state.cache is None:
        predict = None if predicted == columns else torch.tensor([predicted], device=x.device)
    else:
        predict = None if predicted == columns else predicted
        span = (columns[0], columns[-1] + 1) if columns[-1] + 1 - columns[0] == len(columns) else columns
    for _ in range(n_calls):
        logits = (backbone.forward(x, predict=predict) if state.cache is None
                  else backbone.step(x, state.cache, span, predict=predict, write=write))
    return logits


def call_rows(backbone, cache, rows: list, span: tuple, predicted: list, lane_batching: bool) -> torch.Tensor:
    """The speculative call over the lane rows: logits (len(rows), len(predicted), V).

    With a cache: one :meth:`Backbone.step` over the lane cache, every row covering ``span``, the
    cache keeping row 0's K/V; ``lane_batching=False``: one single-row step per row, row 0's
    writing and the others read-only (``write=False``), the same outputs since every row covers
    the same columns.  Without a cache: full forwards.
    """
    x = torch.tensor(rows, device=backbone.device)
    n = x.shape[0]
    if cache is None:
        predict = torch.tensor([predicted], device=x.device).expand(n, -1)
        if lane_batching:
            return backbone.forward(x, predict=predict)
        return torch.cat([backbone.forward(x[i:i + 1], predict=predict[i:i + 1]) for i in range(n)])
    if lane_batching:
        return backbone.step(x, cache, span, predict=predicted)
    return torch.cat([backbone.step(x[i:i + 1], cache, span, predict=predicted, write=i == 0) for i in range(n)])


def token_probs(logits: torch.Tensor, rows: list, cols: list, tokens: list) -> torch.Tensor:
    """(n,) float64 probability of ``tokens[k]`` under ``logits[rows[k], cols[k]]`` (on the device, no sync)."""
    if not tokens:
        return logits.new_zeros(0, dtype=torch.float64)
    dev = logits.device
    pick = logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
    return rules.confidence_prob(pick[None], torch.tensor([tokens], device=dev), torch.float64)[0]


def read_back(proposal: torch.Tensor, conf: torch.Tensor, prob: torch.Tensor, predicted: list, columns,
              refresh: Optional[str]) -> CallResult:
    """The iteration's one fetch: ``proposal`` and ``conf`` (rows, len(predicted)) and ``prob`` (n,)."""
    rows, n = proposal.shape[0], len(predicted)
    proposal, conf, prob = read_host(proposal, conf, prob)
    return CallResult(predicted, [proposal[i * n:(i + 1) * n] for i in range(rows)],
                      [conf[i * n:(i + 1) * n] for i in range(rows)], prob, columns, refresh)
