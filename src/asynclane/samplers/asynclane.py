"""AsyncLane: decoupling refinement from advancement with a tree of generate and refine lanes.

Source: Ren, Lou, Liu et al., "AsyncLane: Decoupling Refinement from Advancement in Diffusion
Language Model Decoding", arXiv 2606.08411.  Only its title, authors and abstract were readable,
and no official code was found.  From the abstract: generate (GEN) and refine (REF) lanes; a fork
at a delimiter boundary, after which the prefix stays editable while a continuation lane advances;
a lane tree giving dependencies and stitching order; every step runs the active lanes; four cost
mechanisms (shared-prefix lane batching, lookahead draft reuse, cascading termination, compact
cache refresh with refresh-logit reuse); training-free, a drop-in for block samplers.  Everything
else is our reconstruction, in :mod:`asynclane.lane`.

Two paths share the lane tree, the rules and the four switches: the *speculative* path (the
default, ``speculate`` with ``draft_reuse``: one call row per lane, each lane's drafts verified
against the drafts of the lanes left of it) and the *one-row* path it grew from (all lanes in one
row).  Deviations in brief: batch > 1 by row pooling (one lane tree per row); the one-row path packs every lane into one row without a
block-sparse mask; drafts live one iteration; committed prefix tokens are never re-masked; the
EOS-filled tail stays in context.

The algorithm step by step, the options with their justifications, the measured numbers and the
deviations in detail: docs/samplers/asynclane.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.lane import one_row, speculative
from asynclane.rowpool import pooled_generate
from asynclane.sampler import delimiter_set
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, check_block_length, register

__all__ = ["AsyncLaneConfig", "AsyncLaneSampler"]

CACHES = ("none", "prefix", "dual")


@dataclass
class AsyncLaneConfig(SamplerConfig):
    """AsyncLane's options and their defaults (meanings and justifications: docs/samplers/asynclane.md)."""

    block_length: int = 32
    threshold: float = 0.9
    refine_threshold: float = 0.9
    delimiter_threshold: float = 0.3
    draft_threshold: float = 0.9
    max_residual_fraction: float = 0.25
    min_prefix: int = 4
    max_lanes: int = 4
    refine_budget: int = 8
    lookahead: int = 32
    refresh_every: Optional[int] = None
    eos_threshold: float = 0.0
    cache: str = "prefix"
    lane_batching: bool = True
    draft_reuse: bool = True
    cascade: bool = True
    compact_refresh: bool = True
    speculate: bool = True
    commit_first_after_refresh: Optional[bool] = None
    delimiter_ids: Optional[Sequence[int]] = None

    def __post_init__(self):
        super().__post_init__()
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r} is not one of {', '.join(CACHES)}")
        check_block_length(self.block_length, self.gen_length)
        for key in ("threshold", "refine_threshold", "delimiter_threshold", "draft_threshold", "eos_threshold"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if not 0 <= self.max_residual_fraction <= 1:
            raise ValueError(f"max_residual_fraction={self.max_residual_fraction} must lie in [0, 1]")
        for key in ("max_lanes", "refine_budget", "min_prefix"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.lookahead < 0:
            raise ValueError(f"lookahead={self.lookahead} must be >= 0")
        if self.refresh_every is not None and (isinstance(self.refresh_every, bool) or self.refresh_every < 1):
            raise ValueError(f"refresh_every={self.refresh_every} must be a positive integer or null")

    def first_after_refresh(self, family: str) -> bool:
        # compact refresh recomputes the block's left neighbour with it: only full refreshes need the rule
        return rules.dream_first_token_after_refresh(self.commit_first_after_refresh, family,
                                                     self.cache != "none" and not self.compact_refresh)


@register("asynclane")
class AsyncLaneSampler(BaseSampler):
    """Lane-tree decoding (one tree per row; batch > 1 by row pooling); ``max_lanes=1`` and mechanisms
    2-4 off is fast_dllm."""

    Config = AsyncLaneConfig
    can_batch = True  # by row pooling (asynclane.rowpool): one decoding per row, the calls shared
    pools_rows = True

    def __init__(self, cfg: AsyncLaneConfig):
        super().__init__(cfg)
        self._delimiters = {}  # id(tokenizer) -> delimiter ids

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        if len(prompts) != 1:  # per-row rules: the rows decode side by side, their calls pooled
            return pooled_generate(self.generate, backbone, prompts, rng)
        key = id(getattr(backbone, "tokenizer", None))
        if key not in self._delimiters:
            self._delimiters[key] = delimiter_set(backbone, self.cfg.delimiter_ids)
        path = speculative if self.cfg.draft_reuse and self.cfg.speculate else one_row
        return path.decode(self.cfg, backbone, prompts, rng, self._delimiters[key])
