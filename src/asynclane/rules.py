"""Token-selection rules: pure tensor functions shared by several samplers (a rule only one sampler
uses lives in that sampler's module).

Conventions (one function per policy):

* ``logits``: (B, L, V) aligned logits (row i predicts the token at position i).
* ``score``: (B, L) float confidence; ``-inf`` marks a position that may not be committed
  (already decoded, outside the active block, prompt).  :func:`restrict_confidence` builds it.
* commit policies return a (B, L) bool "commit here" mask and never select a ``-inf`` position.
* Randomness only through an injected ``torch.Generator``; nothing writes into its inputs.

Source tags ([C] official code, [M] third-party copy of official code, [P] paper) follow
docs/research/baselines_core.md.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = [
    "confidence_prob", "confidence_neg_entropy",
    "gumbel_argmax", "without_mask", "propose", "refresh_due", "dream_first_token_after_refresh",
    "restrict_confidence", "ranks", "commit_topk", "commit_above", "commit_threshold",
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


def confidence_neg_entropy(logits: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(B, L) negative entropy ``sum_v p_v log p_v`` (natural log, full vocabulary; <= 0).

    Dream ``alg="entropy"`` [M] and dParallel's certainty [C] (baselines_core.md §2.3, §4.2);
    higher means more certain.  The references add an epsilon (1e-10 / 1e-12 / 1e-8) inside the
    log; here ``xlogy`` gives the exact limit ``0 log 0 = 0`` (so ``-inf`` logits are safe).
    """
    p = torch.softmax(logits.to(dtype or logits.dtype), dim=-1)
    return torch.special.xlogy(p, p).sum(-1)


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


def without_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``logits`` with the mask id's column at ``-inf``: a proposal never is the mask (a committed mask
    would stay masked; a trained model gives it ~0 probability, a random or tiny one does not)."""
    out = logits.clone()
    out.select(-1, mask_id).fill_(_NEG_INF)
    return out


def propose(logits: torch.Tensor, mask_id: int, temperature: float,
            rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """:func:`gumbel_argmax` over :func:`without_mask` logits: the proposals every sampler commits from."""
    return gumbel_argmax(without_mask(logits, mask_id), temperature, rng)


# --------------------------------------------------------------------------- schedules

def refresh_due(step: int, every: Optional[int]) -> bool:
    """Whether step ``step`` of a block (or of the run) refreshes the whole cache: step 0, and with
    ``every = k`` also steps k, 2k, ... (Fast-dLLM's block-start refresh, d3LLM's interval)."""
    return step == 0 if every is None else step % every == 0


def dream_first_token_after_refresh(setting: Optional[bool], family: str, cached: bool) -> bool:
    """Fast-dLLM's Dream path: whether a block's refresh commits only its first position.  ``setting``
    None = auto: on for a Dream-family backbone whose block steps read a cache (``cached``), where a
    step cannot predict the block's first token (its row comes from the position before it)."""
    return family == "dream" and cached if setting is None else bool(setting)


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

def ranks(score: torch.Tensor) -> torch.Tensor:
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
    return (ranks(score) < k) & (score > _NEG_INF)


def commit_above(score: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) bool: every eligible position (score > -inf) with ``score >= threshold``; no
    progress guarantee (callers that need one add the best themselves)."""
    return (score > _NEG_INF) & (score >= threshold)


def commit_threshold(score: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) bool: every eligible position with ``score >= threshold``, plus each row's best.

    Fast-dLLM threshold rule [P, C] (``get_transfer_index``, baselines_core.md §3.1): rank the
    candidates, always keep rank 1, drop ranks >= 2 whose score ``< threshold``, so a tie at the
    threshold passes.  Rows with no eligible position commit nothing.
    """
    best = (ranks(score) == 0) & (score > _NEG_INF)
    return best | commit_above(score, threshold)
