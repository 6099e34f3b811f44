"""dParallel's inference sampler: entropy-threshold parallel decoding in semi-AR blocks.

Sources: Chen et al., "dParallel", arXiv 2509.26488 [P]; czg1225/dParallel at 2ca4d14, LLaDA
``generate.py`` and Dream ``generation_utils_semiar.py`` [C] (docs/research/baselines_core.md §4).
Blocks left to right; every step is one full forward; among the block's masked positions it
commits the lowest-entropy one and every other with entropy <= ``threshold`` (nats).  On the base
weights this is the training-free "entropy-threshold (dParallel rule)" baseline; dParallel's
distilled weights load like the base model.  Deviations, in brief: one loop (the LLaDA rule) for
both families; no cache variants; the mask id is never proposed; batch > 1.  Algorithm, options
and every deviation with its source: docs/samplers/dparallel.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from asynclane import rules
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, check_block_length, finish, init_buffer, padding_mask, register


@dataclass
class DParallelConfig(SamplerConfig):
    """dParallel inference settings; see the module docstring for sources."""

    block_length: int = 32
    threshold: float = 0.5  # entropy bound (nats): commit H <= threshold, always the lowest H

    def __post_init__(self):
        super().__post_init__()
        check_block_length(self.block_length, self.gen_length)
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold} must be an entropy >= 0 in nats (0.5 or 0.45 in "
                             "the paper; 0 commits one token per step)")


@register("dparallel")
class DParallelSampler(BaseSampler):
    """dParallel ``generate`` with ``threshold``: entropy-threshold commits, block by block, no cache."""

    Config = DParallelConfig

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)  # None when no row is padded: no attention mask
        B, Lb = x.shape[0], cfg.block_length
        block_rows = torch.arange(Lb, device=x.device).expand(B, Lb)

        # mirrors czg1225/dParallel@2ca4d14:LLaDA/generate.py `generate` with `threshold` set
        for lo in range(P, P + cfg.gen_length, Lb):
            hi = lo + Lb
            while bool((masked := x[:, lo:hi] == spec.mask_id).any()):
                logits = backbone.forward(x, positions=positions, key_mask=pad, predict=block_rows + lo)
                proposal = rules.propose(logits, spec.mask_id, cfg.temperature, rng)
                certainty = rules.confidence_neg_entropy(logits, torch.float64)  # -H
                commit = rules.commit_threshold(rules.restrict_confidence(certainty, masked), -cfg.threshold)
                x[:, lo:hi] = torch.where(commit, proposal, x[:, lo:hi])

        return finish(x, P, spec)
