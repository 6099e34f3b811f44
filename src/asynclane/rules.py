"""Token-selection rules: pure tensor functions shared by every sampler.

Conventions (one function per policy, research/aesthetics.md P4):

* ``logits``: (B, L, V) aligned logits (row i predicts the token at position i).
* ``score``: (B, L) float confidence; ``-inf`` marks a position that may not be committed
  (already decoded, outside the active block, prompt).  :func:`restrict_confidence` builds it.
* commit policies return a (B, L) bool "commit here" mask and never select a ``-inf`` position.
* Randomness only through an injected ``torch.Generator``; nothing writes into its inputs.

Source tags ([C] official code, [M] third-party copy of official code, [P] paper) follow
research/baselines_core.md.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = [
    "confidence_prob", "confidence_margin", "confidence_neg_entropy", "random_confidence",
    "gumbel_argmax", "uniform_transfer_counts", "restrict_confidence",
    "commit_topk", "commit_threshold", "commit_factor",
]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- confidence measures

def confidence_prob(logits: torch.Tensor, tokens: torch.Tensor,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(B, L) probability of ``tokens`` (B, L) under ``softmax(logits)``.

    LLaDA ``low_confidence`` remasking [C]: ``x0_p = softmax(logits)[x0]`` on the *un-noised*
    logits, whichever token ``x0`` was proposed (ML-GSAI/LLaDA ``generate.py``).  ``dtype``
    is the softmax dtype: ``None`` keeps the logits dtype, as LLaDA does since its Jun-2025
    commit; Fast-dLLM and dParallel forks use ``torch.float64`` (baselines_core.md §1.1).
    """
    p = torch.softmax(logits.to(dtype or logits.dtype), dim=-1)
    return p.gather(-1, tokens[..., None]).squeeze(-1)


def confidence_margin(logits: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(B, L) top-1 minus top-2 probability.

    Dream ``alg="topk_margin"`` [M] (after arXiv 2502.06768): ``p(1) - p(2)`` of the softmax.
    """
    top2 = torch.softmax(logits.to(dtype or logits.dtype), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def confidence_neg_entropy(logits: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(B, L) negative entropy ``sum_v p_v log p_v`` (natural log, full vocabulary; <= 0).

    Dream ``alg="entropy"`` [M] and dParallel's certainty [C] (baselines_core.md §2.3, §4.2);
    higher means more certain.  The references add an epsilon (1e-10 / 1e-12 / 1e-8) inside the
    log; here ``xlogy`` gives the exact limit ``0 log 0 = 0`` (so ``-inf`` logits are safe).
    """
    p = torch.softmax(logits.to(dtype or logits.dtype), dim=-1)
    return torch.special.xlogy(p, p).sum(-1)


def random_confidence(shape, rng: torch.Generator, device=None) -> torch.Tensor:
    """Uniform(0, 1) float32 scores of ``shape``: LLaDA ``remasking="random"`` [C].

    The reference draws ``torch.rand((B, L))`` from the global RNG; here from ``rng``, on the
    generator's device, then moved to ``device``.
    """
    return torch.rand(shape, generator=rng, device=rng.device).to(device)


# --------------------------------------------------------------------------- proposals

def gumbel_argmax(logits: torch.Tensor, temperature: float,
                  rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, L) token ids: argmax of Gumbel-perturbed logits, a categorical sample at ``temperature``.

    LLaDA ``add_gumbel_noise`` [C]: in float64, ``exp(logits) / (-log u) ** T`` with
    ``u ~ U(0, 1)`` of the full logits shape; its argmax equals that of ``logits / T + Gumbel``.
    float64 because low-precision Gumbel-max hurts quality (arXiv 2409.02908, cited there).
    ``temperature == 0`` returns the exact argmax without touching ``rng`` (LLaDA's Mar-2025
    early return).  The noise is drawn on ``rng.device`` and moved to the logits' device.
    """
    if temperature == 0:
        return logits.argmax(-1)
    if rng is None:
        raise ValueError("gumbel_argmax needs a torch.Generator when temperature > 0")
    logits64 = logits.to(torch.float64)
    u = torch.rand(logits64.shape, dtype=torch.float64, generator=rng, device=rng.device)
    return (logits64.exp() / (-torch.log(u.to(logits64.device))) ** temperature).argmax(-1)


# --------------------------------------------------------------------------- schedules

def uniform_transfer_counts(is_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) int64 number of tokens to commit at each step of one block.

    LLaDA ``get_num_transfer_tokens`` [C], from the linear noise schedule (paper Eq. 8): the
    block's m masked positions split evenly over ``steps``; the remainder ``m % steps`` goes one
    each to the *first* steps.  ``is_masked``: (B, Lb) bool over the block.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    m = is_masked.sum(-1, keepdim=True)  # (B, 1)
    step = torch.arange(steps, device=is_masked.device)
    return m // steps + (step < m % steps).long()


def restrict_confidence(score: torch.Tensor, allowed: torch.Tensor, lo: Optional[int] = None,
                        hi: Optional[int] = None) -> torch.Tensor:
    """``score`` where ``allowed`` (B, L) and the column lies in ``[lo, hi)``; ``-inf`` elsewhere.

    LLaDA [C]: ``x0_p[:, block_end:] = -inf`` then ``where(mask_index, x0_p, -inf)``.
    """
    col = torch.arange(score.shape[-1], device=score.device)
    keep = allowed
    if lo is not None:
        keep = keep & (col >= lo)
    if hi is not None:
        keep = keep & (col < hi)
    return torch.where(keep, score, torch.full_like(score, _NEG_INF))


# --------------------------------------------------------------------------- commit policies

def _ranks(score: torch.Tensor) -> torch.Tensor:
    """(B, L) rank of each position by descending score; ties go to the lower index."""
    return score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)


def commit_topk(score: torch.Tensor, k: Union[int, torch.Tensor]) -> torch.Tensor:
    """(B, L) bool: the ``k`` highest-scoring eligible (finite) positions of each row.

    LLaDA ``torch.topk(confidence[j], k=num_transfer_tokens[j, i])`` per row [C].  ``k``: int or
    (B,) tensor.  Ties break toward the lower index (stable sort); torch.topk leaves them
    unspecified.  Where ``k`` exceeds the eligible count only the eligible ones are chosen (the
    reference would also pick ``-inf`` positions, which its schedule never lets happen).
    """
    k = torch.as_tensor(k, device=score.device).reshape(-1, 1)
    return (_ranks(score) < k) & (score > _NEG_INF)


def commit_threshold(score: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) bool: every eligible position with ``score >= threshold``, plus each row's best.

    Fast-dLLM threshold rule [P, C] (``get_transfer_index``, baselines_core.md §3.1): rank the
    candidates, always keep rank 1, drop ranks >= 2 whose score ``< threshold``, so a tie at the
    threshold passes.  Rows with no eligible position commit nothing.
    """
    eligible = score > _NEG_INF
    best = (_ranks(score) == 0) & eligible
    return best | (eligible & (score >= threshold))


def commit_factor(score: torch.Tensor, factor: float, last_rank_quirk: bool = False) -> torch.Tensor:
    """(B, L) bool: Fast-dLLM's factor rule over the eligible positions of each row.

    Later official Fast-dLLM ``get_transfer_index_dynamic`` [C] (baselines_core.md §3.1; the
    paper's Theorem 1 [P]): sort scores ``c(1) >= c(2) >= ...`` and keep the longest prefix in
    which every rank ``n >= 2`` has ``c(n) >= 1 - factor / (n + 1)``, i.e.
    ``(n + 1)(1 - c(n)) <= factor`` (equality passes, as in the code's ``<`` fail test).  Rank 1
    is always kept, so a row with any eligible position commits at least one.

    ``last_rank_quirk=True`` reproduces the reference's off-by-one: when the first failing rank
    is the last eligible one, it is committed anyway.  Default: the clean rule.
    """
    order = score.argsort(dim=-1, descending=True, stable=True)
    ranked = score.gather(-1, order).to(torch.float64)  # (B, L), eligible first
    n = torch.arange(1, score.shape[-1] + 1, device=score.device, dtype=torch.float64)
    passes = (ranked >= 1 - factor / (n + 1)) & (ranked > _NEG_INF)
    passes[:, 0] = ranked[:, 0] > _NEG_INF  # rank 1 always (when eligible); `passes` is ours
    count = passes.long().cumprod(-1).sum(-1, keepdim=True)  # (B, 1) length of the prefix
    if last_rank_quirk:
        n_eligible = (score > _NEG_INF).sum(-1, keepdim=True)
        count = torch.where((n_eligible >= 2) & (count == n_eligible - 1), n_eligible, count)
    return order.argsort(-1) < count
