"""Streaming-dLLM: Fast-dLLM's prefix-cache decoding on a pruned suffix, a decaying threshold, EOS exit.

Sources: Xiao et al., "Streaming-dLLM", arXiv 2601.17917 (PDF in the repository) [P];
xiaoshideta/Streaming-dLLM at c4320c2 ``LLaDA-1.5/generate.py`` (``generate_with_prefix_cache``),
``LLaDA-1.5/sampler.py``, ``Dream/model/generation_utils_block.py`` and the eval scripts [C]
(docs/research/baselines_seeds.md §4).  Per block ``[lo, hi)``: one forward over the prefix, the
block, the ``window`` nearest suffix tokens and the answer's last position (original position ids;
``prune``), which rebuilds the prefix cache; then block + kept-suffix steps against it until the block
is decoded, committing every masked block position with confidence >= ``threshold * (1 - alpha *
(1 - r))`` (``decay``; r = mask fraction of block + kept suffix; the block's first forward uses
``threshold``), at least the best; Dream: the first forward commits only the block's first token.
``early_exit``: a finished block holding EOS fills the rest with EOS.  Defaults (both families): the
reference's function defaults, block 32, threshold 0.9, window 32, alpha 0.3; Table 11 settings are
named presets (``conf/sampler/streaming_dllm_<task>.yaml``).  Deviations, in brief: every EOS-like
id exits; batch > 1; Fast-dLLM's proposal/confidence rules for both families; the mask id is never
proposed; the pruned sequence is a column set of the full buffer (attention still spans its slots).
Algorithm, options and every deviation with its source: docs/samplers/streaming_dllm.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from asynclane import rules
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, check_block_length, finish, init_buffer, padding_mask, register
from baselines.fast_dllm import close_finished, first_position_only

Cols = Union[tuple, list]


# --------------------------------------------------------------------------- rules only streaming_dllm uses

def kept_suffix(hi: int, S: int, window, keep_last: bool) -> list:
    """Buffer columns of the suffix ``[hi, S)`` that a block ending at ``hi`` keeps.

    ``deterministic_window_tail_sampler(arange(hi, S), window, tail_keep=1)`` [C]: the whole suffix
    when it has at most ``window`` tokens, else its first ``window`` and (``keep_last``) its last.
    ``window`` None: no pruning.
    """
    if window is None or S - hi <= window:
        return list(range(hi, S))
    return list(range(hi, hi + window)) + ([S - 1] if keep_last else [])


def call_columns(start: int, hi: int, suffix: list) -> Cols:
    """The columns ``[start, hi)`` plus the kept ``suffix`` (which starts at ``hi``): ``(start, end)`` when
    they are contiguous (the call then is Fast-dLLM's prefix-cache call), else a sorted host list."""
    if not suffix or suffix[-1] == hi + len(suffix) - 1:
        return start, hi + len(suffix)
    return list(range(start, hi)) + suffix


def decayed_threshold(threshold: float, alpha: float, mask_ratio):
    """``threshold * (1 - alpha * (1 - mask_ratio))``: ``context_aware_threshold`` [C], the paper's dynamic
    confidence-aware threshold [P]; ``mask_ratio`` a float or a tensor (one per row)."""
    return threshold * (1 - alpha * (1 - mask_ratio))


@dataclass
class StreamingDllmConfig(SamplerConfig):
    """Streaming-dLLM settings; see the module docstring for sources."""

    block_length: int = 32
    threshold: float = 0.9
    window: int = 32  # kept suffix tokens after the block (prune)
    alpha: float = 0.3  # threshold decay strength (decay)
    prune: bool = True
    keep_last: bool = True  # prune keeps the answer's last position too (paper Table 6)
    decay: bool = True
    early_exit: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_block_length(self.block_length, self.gen_length)
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold} must be >= 0 (0.9 in the paper; > 1 commits one "
                             "token per step)")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window={self.window!r} must be an integer >= 0 (suffix tokens kept after the "
                             "block; Table 11 uses 32, 96, 128, 192, 256)")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must lie in [0, 1] (Table 11 uses 0.1 to 0.7; 0 = no decay)")


@register("streaming_dllm")
class StreamingDllmSampler(BaseSampler):
    """``generate_with_prefix_cache`` (LLaDA) / ``_sample`` without dual cache (Dream) of Streaming-dLLM."""

    Config = StreamingDllmConfig

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        # the reference's Dream path (module docstring): every block step reads the prefix cache
        first_only = rules.dream_first_token_after_refresh(None, spec.family, cached=True)
        x, key_mask, _, P = init_buffer(backbone, prompts, cfg.gen_length)
        S, Lb = x.shape[1], cfg.block_length
        # slot == column and the cache's positions table: a call on a column subset keeps original positions
        cache = backbone.new_cache(x.shape[0], S, key_mask=padding_mask(key_mask, prompts))
        window = cfg.window if cfg.prune else None

        for lo in range(P, S, Lb):
            hi = lo + Lb
            suffix = kept_suffix(hi, S, window, cfg.keep_last)
            first_call, later_call = call_columns(0, hi, suffix), call_columns(lo, hi, suffix)
            suffix_idx = torch.tensor(suffix, dtype=torch.long, device=x.device)
            step = 0
            while bool((masked := x[:, lo:hi] == spec.mask_id).any()):
                # Dream: a later step's row for ``lo`` is not a prediction (its p - 1 is cached) and ``lo`` was
                # committed by the first forward, so later steps ask for ``(lo + 1, hi)``; a copy of the next row
                # stands in for ``lo`` (masked out below), so the generator draws for the block's rows (fast_dllm)
                later = first_only and step > 0
                logits = backbone.step(x, cache, later_call if step else first_call, predict=(lo + later, hi))
                if later:
                    logits = torch.cat((logits[:, :1], logits), dim=1)
                proposal = rules.propose(logits, spec.mask_id, cfg.temperature, rng)
                if step == 0 and first_only:
                    commit = first_position_only(masked)
                else:
                    tau = cfg.threshold  # the block's first forward: undecayed (mask ratio 1 in the reference)
                    if step and cfg.decay:
                        kept_masks = (x.index_select(1, suffix_idx) == spec.mask_id).sum(-1, keepdim=True)
                        ratio = (masked.sum(-1, keepdim=True) + kept_masks).double() / (Lb + len(suffix))
                        tau = decayed_threshold(cfg.threshold, cfg.alpha, ratio)
                    score = rules.confidence_prob(logits, proposal, torch.float64)
                    commit = rules.commit_threshold(rules.restrict_confidence(score, masked), tau)
                x[:, lo:hi] = torch.where(commit, proposal, x[:, lo:hi])
                step += 1
            if cfg.early_exit:  # the reference checks once the block is decoded
                x = close_finished(x, P, spec)

        return finish(x, P, spec)
