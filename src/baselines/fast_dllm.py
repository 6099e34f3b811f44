"""Fast-dLLM: confidence-aware parallel decoding in semi-AR blocks, with an approximate KV cache.

Sources: Wu et al., arXiv 2505.22618 [P]; NVlabs/Fast-dLLM ``llada/generate.py`` and
``dream/model/generation_utils_block.py`` [C] (docs/research/baselines_core.md §3).  Blocks left
to right; a block's first step is a refresh (a full forward that rewrites the cache, its logits
used), then ``prefix`` (block + suffix) or ``dual`` (block only) cached steps until no mask is
left; a step commits every masked block position with confidence >= ``threshold`` (at least the
best), or the ``factor`` rule.  Dream with a cache: the refresh commits only the block's first
token, as the reference does.  Deviations, in brief: one loop for both families; Gumbel noise for
the block's rows only; batch > 1; the mask id is never proposed; ties toward the lower position.
Algorithm, options and every deviation with its source: docs/samplers/fast_dllm.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, check_block_length, finish, init_buffer, padding_mask, register


# --------------------------------------------------------------------------- rules only fast_dllm uses

_NEG_INF = float("-inf")


def first_position_only(masked: torch.Tensor) -> torch.Tensor:
    """(B, n) commit mask of the first position where it is still masked (the rule above)."""
    commit = torch.zeros_like(masked)
    commit[:, 0] = masked[:, 0]
    return commit


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


def block_logits(backbone, x: torch.Tensor, cache, mode: str, block: tuple, refresh: bool, predict, *,
                 positions=None, pad=None) -> torch.Tensor:
    """Logits (B, P, V) of one Fast-dLLM step on the block ``[lo, hi)`` at ``predict``.

    ``predict``: ``(a, b)`` or a (P,) tensor of columns.  Without a cache (``cache`` None) a full
    forward.  With one: ``refresh``, every slot rewritten (the block's first step); ``prefix``, the
    block and the suffix, ``[0, lo)`` read from the cache; ``dual``, the block only, its fresh K/V
    replacing its slots in place before it attends to every slot.
    """
    lo, hi = block
    S = x.shape[1]
    if cache is None:
        cols = torch.arange(*predict, device=x.device) if isinstance(predict, tuple) else predict
        return backbone.forward(x, positions=positions, key_mask=pad, predict=cols.expand(x.shape[0], -1))
    span = (0, S) if refresh else (lo, S) if mode == "prefix" else (lo, hi)
    return backbone.step(x, cache, span, predict=predict)


def block_commit(cfg, logits: torch.Tensor, proposal: torch.Tensor, masked: torch.Tensor, first_only: bool) -> torch.Tensor:
    """(B, n) commit mask of one step over ``n`` block positions: the first masked one (``first_only``,
    the Dream refresh), else the factor rule when ``cfg.factor`` is set, else the threshold rule
    (every masked position with confidence >= ``cfg.threshold``, at least the best)."""
    if first_only:
        return first_position_only(masked)
    score = rules.restrict_confidence(rules.confidence_prob(logits, proposal, torch.float64), masked)
    if cfg.factor is not None:
        return commit_factor(score, cfg.factor, cfg.factor_last_rank_quirk)
    return rules.commit_threshold(score, cfg.threshold)


def close_finished(x: torch.Tensor, P: int, spec) -> torch.Tensor:
    """Early exit: rows final at their first EOS (:func:`finished_at_eos`) get their remaining masks
    filled with EOS; ``x`` (B, S) with the answer from column ``P``."""
    gen = x[:, P:]
    done = finished_at_eos(gen, spec.mask_id, spec.eos_ids)
    x[:, P:] = torch.where(done[:, None] & (gen == spec.mask_id), spec.eos_id, gen)
    return x


CACHES = ("none", "prefix", "dual")


@dataclass
class FastDllmConfig(SamplerConfig):
    """Fast-dLLM settings; see the module docstring for sources."""

    block_length: int = 32
    threshold: float = 0.9
    factor: Optional[float] = None  # set: the factor rule replaces the threshold rule
    cache: str = "prefix"
    refresh_every: Optional[int] = None  # None: at block start only (reference)
    commit_first_after_refresh: Optional[bool] = None  # None: auto (Dream family with a cache)
    factor_last_rank_quirk: bool = False
    early_exit: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r} is not one of {', '.join(CACHES)}")
        check_block_length(self.block_length, self.gen_length)
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold} must be >= 0 (0.9 in the paper; > 1 commits one "
                             "token per step)")
        if self.factor is not None and not self.factor > 0:
            raise ValueError(f"factor={self.factor} must be > 0, or null to use the threshold rule")
        if self.refresh_every is not None and (isinstance(self.refresh_every, bool) or self.refresh_every < 1):
            raise ValueError(f"refresh_every={self.refresh_every} must be a positive integer, or null to "
                             "refresh only at each block start (the reference)")

    def first_after_refresh(self, family: str) -> bool:
        """Whether the block-start refresh commits only the first block token (step 6)."""
        return rules.dream_first_token_after_refresh(self.commit_first_after_refresh, family, self.cache != "none")


@register("fast_dllm")
class FastDllmSampler(BaseSampler):
    """Fast-dLLM ``generate`` / ``generate_with_prefix_cache`` / ``generate_with_dual_cache``."""

    Config = FastDllmConfig

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        first_only = cfg.first_after_refresh(spec.family)
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)  # None: no row is padded, no attention mask at all
        B, Lb = x.shape[0], cfg.block_length
        cache = None if cfg.cache == "none" else backbone.new_cache(B, x.shape[1], key_mask=pad)

        for lo in range(P, P + cfg.gen_length, Lb):
            hi = lo + Lb
            # the block's rows.  The reference's Dream path asks for them by index: its cached steps never
            # read the block's first row, so the call stays the reference's.  Otherwise by range: for Dream
            # a cached step then also processes the block's left neighbour (Backbone.step adds it)
            want = torch.arange(lo, hi, device=x.device) if first_only else (lo, hi)
            step = 0
            while bool((masked := x[:, lo:hi] == spec.mask_id).any()):
                logits = block_logits(backbone, x, cache, cfg.cache, (lo, hi), rules.refresh_due(step, cfg.refresh_every),
                                      want, positions=positions, pad=pad)
                # never propose the mask (Deviations); the confidence keeps the reference's softmax
                proposal = rules.propose(logits, spec.mask_id, cfg.temperature, rng)
                commit = block_commit(cfg, logits, proposal, masked, step == 0 and first_only)
                x[:, lo:hi] = torch.where(commit, proposal, x[:, lo:hi])
                if cfg.early_exit:
                    x = close_finished(x, P, spec)
                step += 1

        return finish(x, P, spec)
