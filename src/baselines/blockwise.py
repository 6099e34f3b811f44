"""LLaDA reference sampler: semi-autoregressive blocks, a fixed per-step quota, low-confidence remasking.

Sources: Nie et al., "Large Language Diffusion Models", arXiv 2502.09992, App. B [P]; ML-GSAI/LLaDA
``generate.py`` at b7e6c35 [C] (docs/research/baselines_core.md §1).  The answer is split into
blocks decoded left to right, each with ``steps / num_blocks`` full forwards; a step commits its
quota (LLaDA's uniform split of the block's masks) of the most confident masked positions of the
block (``remasking="random"``: random scores); optional EOS / EoT logit rules.  NFE = ``steps``.
Deviations, in brief: the EOS/EoT confidence rule as intended at every temperature; positions
restart at each row's first real token; the given generator instead of the global RNG; no
classifier-free guidance; ties break toward the lower position.  Algorithm, options and every
deviation with its source: docs/samplers/blockwise.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, block_steps, check_block_length, finish, init_buffer, padding_mask, register


# --------------------------------------------------------------------------- rules only blockwise uses

def random_confidence(shape, rng: torch.Generator, device=None) -> torch.Tensor:
    """Uniform(0, 1) float32 scores of ``shape``: LLaDA ``remasking="random"`` [C].

    The reference draws ``torch.rand((B, L))`` from the global RNG; here from ``rng``, on the
    generator's device, then moved to ``device``.
    """
    return torch.rand(shape, generator=rng, device=rng.device).to(device)


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


REMASKING = ("low_confidence", "random")


@dataclass
class BlockwiseConfig(SamplerConfig):
    """LLaDA reference sampler settings; see the module docstring for sources."""

    steps: Optional[int] = None  # total forwards; None = gen_length (one token per step)
    block_length: int = 32
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r} is not one of {', '.join(REMASKING)}")
        check_block_length(self.block_length, self.gen_length)
        block_steps(self.steps, self.block_length, self.gen_length)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return block_steps(self.steps, self.block_length, self.gen_length)


@register("blockwise")
class BlockwiseSampler(BaseSampler):
    """LLaDA ``generate``: one full forward per step, quota-many commits per step."""

    Config = BlockwiseConfig

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)  # None when no row is padded: no attention mask
        eos_col = torch.tensor([spec.eos_id], device=x.device)
        eos_eot_cols = torch.tensor(spec.eos_ids, device=x.device)

        # mirrors ML-GSAI/LLaDA@b7e6c35:generate.py `generate` (one loop per block, then per step)
        for lo in range(P, P + cfg.gen_length, cfg.block_length):
            hi = lo + cfg.block_length
            quota = uniform_transfer_counts(x[:, lo:hi] == spec.mask_id, cfg.steps_per_block)
            for step in range(cfg.steps_per_block):
                is_masked = x == spec.mask_id
                logits = backbone.forward(x, positions=positions, key_mask=pad)
                if cfg.logits_eos_inf:
                    logits = logits.index_fill(-1, eos_col, float("-inf"))
                x0 = rules.gumbel_argmax(logits, cfg.temperature, rng)
                if cfg.remasking == "low_confidence":
                    if cfg.confidence_eos_eot_inf:  # the intended rule (see Deviations)
                        logits = logits.index_fill(-1, eos_eot_cols, float("-inf"))
                    score = rules.confidence_prob(logits, x0)
                else:
                    score = random_confidence(x0.shape, rng, device=x.device)
                score = rules.restrict_confidence(score, is_masked, lo, hi)
                commit = rules.commit_topk(score, quota[:, step])
                x = torch.where(commit, x0, x)

        return finish(x, P, spec)
