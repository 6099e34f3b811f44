"""When a GEN lane forks (ours): the fork test of each decoding path.

The paper names the trigger, "a delimiter boundary" after which the prefix stays editable; the
tests below are our reconstruction (docs/research/asynclane.md §3.4).  Both read a window
``[lo, hi)`` of the buffer (``tokens``) and of the confidence each token was committed with, as
1-D tensors or Python lists indexed by absolute position, and return absolute positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ForkRule", "fork_point", "line_forks"]


@dataclass(frozen=True)
class ForkRule:
    """What makes a committed token a fork boundary: a delimiter id committed with confidence
    ``>= delimiter_threshold`` closing a prefix of ``>= min_prefix`` tokens that still holds a
    mask; :func:`fork_point` also wants at most ``max_residual_fraction`` of the prefix masked."""

    mask_id: int
    delimiters: frozenset
    delimiter_threshold: float
    min_prefix: int
    max_residual_fraction: float = 1.0

    @classmethod
    def of(cls, cfg, mask_id: int, delimiters) -> "ForkRule":
        """The rule an AsyncLane config sets."""
        return cls(mask_id, frozenset(int(d) for d in delimiters), cfg.delimiter_threshold, cfg.min_prefix,
                   cfg.max_residual_fraction)

    def is_boundary(self, token: int, confidence: float) -> bool:
        """A delimiter committed with enough confidence."""
        return token in self.delimiters and confidence >= self.delimiter_threshold


def _values(seq, lo: int, hi: int) -> list:
    """``seq[lo:hi]`` as a Python list, for a 1-D tensor or a list."""
    part = seq[lo:hi]
    return part.tolist() if isinstance(part, torch.Tensor) else list(part)


def fork_point(tokens, confidence, lo: int, hi: int, rule: ForkRule) -> Optional[int]:
    """The one-row path's fork: the rightmost boundary ``p`` in ``[lo, hi)``, or ``None``.

    ``p`` qualifies when ``tokens[p]`` is a boundary (:meth:`ForkRule.is_boundary`) and the prefix
    ``[lo, p]`` has ``>= min_prefix`` tokens, of which at least one (something left to refine)
    and at most ``max_residual_fraction`` of them (mostly settled) are masks.
    """
    if not rule.delimiters or hi <= lo:
        return None
    block, conf = _values(tokens, lo, hi), _values(confidence, lo, hi)
    prefix_masks, masks = [], 0  # masks in [lo, lo + j]
    for t in block:
        masks += t == rule.mask_id
        prefix_masks.append(masks)
    for j in range(hi - lo - 1, -1, -1):
        if block[j] == rule.mask_id or not rule.is_boundary(block[j], conf[j]):
            continue
        n, r = j + 1, prefix_masks[j]
        if n >= rule.min_prefix and 1 <= r <= rule.max_residual_fraction * n:
            return lo + j
    return None


def line_forks(tokens, confidence, lo: int, hi: int, rule: ForkRule) -> list:
    """The speculative path's forks: every boundary in ``[lo, hi)`` closing a line that still holds
    a mask, left to right.

    A line runs from the previous qualifying boundary (or ``lo``) and needs ``>= min_prefix``
    tokens.  Each such line becomes its own REF lane, so its drafts are verified on their own; no
    residual-fraction test (the masks left are what the REF lane verifies).
    """
    out, start, masks = [], lo, 0
    block, conf = _values(tokens, lo, hi), _values(confidence, lo, hi)
    for j, t in enumerate(block):
        if t == rule.mask_id:
            masks += 1
        elif rule.is_boundary(t, conf[j]) and masks and lo + j + 1 - start >= rule.min_prefix:
            out.append(lo + j)
            start, masks = lo + j + 1, 0
    return out
