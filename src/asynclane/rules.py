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
    "confidence_prob", "confidence_neg_entropy", "random_confidence",
    "gumbel_argmax", "without_mask", "propose", "refresh_due", "dream_first_token_after_refresh",
    "first_position_only", "uniform_transfer_counts", "restrict_confidence",
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


def first_position_only(masked: torch.Tensor) -> torch.Tensor:
    """(B, n) commit mask of the first position where it is still masked (the rule above)."""
    commit = torch.zeros_like(masked)
    commit[:, 0] = masked[:, 0]
    return commit

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
    best = (_ranks(score) == 0) & (score > _NEG_INF)
    return best | commit_above(score, threshold)


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


# =========================================================================== appended: Dream reference
# Dream's ``diffusion_generate`` (HF ``generation_utils.py``, read in Fast-dLLM's copy [M];
# research/baselines_core.md §2) and the early-exit test of the Fast-dLLM sampler.

__all__ += [
    "filter_top_p", "filter_top_k", "categorical_sample", "dream_sample_tokens", "DREAM_MEASURES",
    "dream_timesteps", "dream_transfer_count", "dream_origin_fire", "commit_sampled", "finished_at_eos",
]

DREAM_MEASURES = ("prob", "margin", "neg_entropy")


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches ``top_p``.

    Dream ``top_p_logits`` [M]: sort descending, cumulative softmax; drop a token when the mass
    *before* it already exceeds ``top_p`` (the first token is always kept).  Dropped logits become
    ``finfo(dtype).min`` (not ``-inf``), as in the reference.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mass = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = torch.zeros_like(mass, dtype=torch.bool)
    drop_sorted[..., 1:] = mass[..., :-1] > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep logits >= the ``top_k``-th largest (ties at the cut survive); others -> ``finfo.min``.

    Dream ``top_k_logits`` [M]; ``top_k`` is capped at the vocabulary size.
    """
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def categorical_sample(probs: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """(N,) one draw per row of ``probs`` (N, V), as ``torch.distributions.Categorical(probs).sample()``.

    Same arithmetic as the distribution (rows renormalised, then ``multinomial(.., 1, True)``), so a
    generator seeded like the global RNG reproduces the reference's draws [M].  Runs on
    ``rng.device``; the result comes back on ``probs.device``.
    """
    p = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(p.to(rng.device), 1, True, generator=rng).squeeze(-1).to(probs.device)


def dream_sample_tokens(logits: torch.Tensor, temperature: float, top_p: Optional[float],
                        top_k: Optional[int], rng: Optional[torch.Generator],
                        measure: str = "prob") -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence (N,), tokens (N,)) for N rows of logits (N, V): Dream ``sample_tokens`` [M].

    Order as the reference: divide by ``temperature`` (if > 0), nucleus filter (if
    ``top_p < 1``), top-k filter, softmax.  Tokens: a categorical draw at ``temperature > 0``
    (argmax when the probabilities are not a valid distribution: the reference catches the
    distribution's exception and falls back), else argmax.  ``measure``: ``prob`` = probability
    of the chosen token (``maskgit_plus``), ``margin`` = top-1 minus top-2 probability
    (``topk_margin``), ``neg_entropy`` = ``sum p log(p + 1e-10)`` (``entropy``; the reference's
    epsilon, unlike :func:`confidence_neg_entropy`).  The filters change the confidence even at
    temperature 0 (baselines_core.md §2.3).
    """
    if measure not in DREAM_MEASURES:
        raise ValueError(f"measure={measure!r} is not one of {', '.join(DREAM_MEASURES)}")
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = filter_top_p(logits, top_p)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    # a categorical draw needs a valid distribution (one host check, only when sampling)
    if temperature > 0 and probs.shape[0] > 0 and bool((torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).all()):
        if rng is None:
            raise ValueError("dream_sample_tokens needs a torch.Generator when temperature > 0")
        tokens = categorical_sample(probs, rng)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    if measure == "margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif measure == "neg_entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, tokens


def dream_timesteps(steps: int, eps: float, device=None) -> torch.Tensor:
    """(steps + 1,) float32 ``linspace(1, eps, steps + 1)``: Dream's t grid [M]; step i goes t_i -> t_{i+1}."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_transfer_count(is_masked: torch.Tensor, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """Tokens to commit this step (every row): Dream's timestep quota [M] (baselines_core.md §2.4).

    ``int(m * (1 - s / t))`` with ``m`` the *batch-mean* masked count (float32, truncated), and
    ``int(m)`` at the last step.  ``is_masked``: (B, L) over the whole buffer.  With steps ==
    masked count, the first step commits 0 and the last 2 (float32 rounding, as the reference).
    """
    mean = is_masked.sum() / is_masked.shape[0]
    return int(mean) if last else int(mean * (1 - s / t))


def dream_origin_fire(n: int, t: torch.Tensor, s: torch.Tensor, last: bool, rng: torch.Generator) -> torch.Tensor:
    """(n,) bool: which of the ``n`` masked positions (flattened over the batch) are decoded now.

    Dream ``alg="origin"`` [M]: each fires independently with probability ``1 - s / t``
    (``uniform < p``, float32), all of them at the last step.  One uniform per masked position,
    drawn from ``rng`` on its device and compared on ``t``'s device.
    """
    u = torch.rand(n, generator=rng, device=rng.device).to(t.device)
    return u < (1 if last else 1 - s / t)


def commit_sampled(score: torch.Tensor, k: int, temperature: float, rng: torch.Generator) -> torch.Tensor:
    """(B, L) bool: ``k`` positions per row drawn without replacement from ``softmax(score / temperature)``.

    Dream ``alg_temp > 0`` [M]: ``multinomial(softmax(conf / alg_temp), k)``; ``-inf`` (ineligible)
    positions get probability 0.  Requires at least ``k`` eligible positions per row.
    """
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    p = torch.softmax(score / temperature, dim=-1)
    picked = torch.multinomial(p.to(rng.device), k, generator=rng).to(score.device)
    return torch.zeros_like(score, dtype=torch.bool).scatter(-1, picked, True)


def finished_at_eos(tokens: torch.Tensor, mask_id: int, eos_ids) -> torch.Tensor:
    """(B,) bool: the row holds an EOS-like token and every position before its first one is decoded.

    ``tokens``: (B, L) generated region.  Such a row's answer is final whatever its later masks
    become, which is what an early exit may rely on.
    """
    eos = torch.isin(tokens, torch.as_tensor(list(eos_ids), device=tokens.device))
    has = eos.any(-1)
    first = torch.where(has, eos.float().argmax(-1), torch.full_like(has, tokens.shape[-1], dtype=torch.long))
    before = torch.arange(tokens.shape[-1], device=tokens.device) < first[:, None]
    return has & ~((tokens == mask_id) & before).any(-1)


# =========================================================================== appended: d3LLM multi-block
# d3LLM's inference-only multi-block decoder (research/asynclane.md §3.10, §5; src/baselines/d3llm.py).

__all__ += ["commit_best_in", "fill_after_first_eos"]


def commit_best_in(commit: torch.Tensor, score: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: ``commit`` plus, in each row whose ``region`` got no commit, the region's best position.

    d3LLM forced progress [C] (asynclane.md §5): after the entropy-threshold rule, the first
    fully activated block that still holds masks must decode at least one token; if none of its
    positions was selected, its lowest-entropy (highest-score) masked position is added.  Only
    eligible (finite ``score``) positions of ``region`` (B, L) count; a row whose region has none
    is left as it is.  Ties break toward the lower index.
    """
    eligible = region & (score > _NEG_INF)
    need = eligible.any(-1) & ~(commit & region).any(-1)  # (B,)
    best = torch.where(eligible, score, torch.full_like(score, _NEG_INF)).argmax(-1)  # first max: lowest index
    add = torch.zeros_like(commit)
    add[torch.arange(score.shape[0], device=score.device), best] = True
    return commit | (add & need[:, None])


def fill_after_first_eos(tokens: torch.Tensor, eos_ids, fill_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens', hit): every position after each row's first EOS-like token set to ``fill_id``.

    d3LLM ``handle_early_stop`` [C] (asynclane.md §3.9): as soon as any EOS is *decoded*, the
    rest of the answer becomes EOS (not mask) and takes no further part in decoding, even
    while masks remain before it.  ``tokens``: (B, L) generated region, returned as a new
    tensor; ``hit``: (B,) bool, rows holding an EOS-like token.  The reference tests one id;
    here every id of ``eos_ids`` counts.
    """
    eos = torch.isin(tokens, torch.as_tensor(list(eos_ids), device=tokens.device))
    after = (eos.long().cumsum(-1) - eos.long()) > 0  # strictly after the first EOS-like token
    return tokens.masked_fill(after, fill_id), eos.any(-1)
