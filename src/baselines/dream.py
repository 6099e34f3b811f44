"""Dream reference sampler: one block, a timestep quota, four position-selection algorithms.

Sources: Ye et al., "Dream 7B", arXiv 2508.15487 [P]; ``generation_utils.py`` of
Dream-org/Dream-v0-Instruct-7B, read in NVlabs/Fast-dLLM's vendored copy [M]
(docs/research/baselines_core.md §2).  ``steps`` full forwards over a t grid; each step commits
``int(mean masks * (1 - s/t))`` positions chosen by ``alg`` (entropy / maskgit_plus / topk_margin
confidence, or ``origin``'s random firing), with temperature / top-p / top-k sampling.
Deviations, in brief: the given generator instead of the global RNG; ties break toward the lower
position; the mask id is never sampled; no generation hooks.  Algorithm, options and every
deviation with its source: docs/samplers/dream.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.sampler import Generation, SamplerConfig, finish, init_buffer, padding_mask, register

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
_MEASURE = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


@dataclass
class DreamConfig(SamplerConfig):
    """Dream ``diffusion_generate`` settings; see the module docstring for sources."""

    steps: Optional[int] = None  # None = gen_length
    alg: str = "entropy"
    alg_temp: Optional[float] = None
    eps: float = 1e-3
    top_p: Optional[float] = None
    top_k: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.alg not in ALGS:
            raise ValueError(f"alg={self.alg!r} is not one of {', '.join(ALGS)}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps={self.steps} must be a positive integer, or null for steps = gen_length")
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ValueError(f"alg_temp={self.alg_temp} must be >= 0, or null (0/null: top-k positions)")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps={self.eps} must lie in (0, 1) (the end of the t grid; reference 1e-3)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1], or null for no nucleus filter")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be a positive integer, or null for no top-k filter")

    @property
    def num_steps(self) -> int:
        return self.gen_length if self.steps is None else self.steps


@register("dream")
class DreamSampler:
    """Dream ``diffusion_generate``: one full forward per step, timestep quota, one block."""

    Config = DreamConfig
    can_batch = True  # alg=origin excepted: its uniforms are drawn over the whole batch (see Deviations)

    def __init__(self, cfg: DreamConfig):
        self.cfg = cfg

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)  # None when no row is padded: no attention mask
        timesteps = rules.dream_timesteps(cfg.num_steps, cfg.eps, device=x.device)
        sample = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, rng=rng)

        # mirrors generation_utils.py `_sample` (one loop over steps; no blocks)
        for i in range(cfg.num_steps):
            t, s, last = timesteps[i], timesteps[i + 1], i == cfg.num_steps - 1
            is_masked = x == spec.mask_id
            logits = backbone.forward(x, positions=positions, key_mask=pad)
            logits = rules.without_mask(logits, spec.mask_id)  # never propose the mask (Deviations)
            masked_logits = logits[is_masked]  # (N, V), row-major over (batch, position)
            if cfg.alg == "origin":
                fire = rules.dream_origin_fire(masked_logits.shape[0], t, s, last, rng)
                fill = torch.full_like(x[is_masked], spec.mask_id)
                if bool(fire.any()):
                    fill[fire] = rules.dream_sample_tokens(masked_logits[fire], **sample)[1]
                x = x.masked_scatter(is_masked, fill)
                continue
            confidence, proposal = rules.dream_sample_tokens(masked_logits, measure=_MEASURE[cfg.alg], **sample)
            k = rules.dream_transfer_count(is_masked, t, s, last)
            if k <= 0:
                continue
            score = torch.full(x.shape, float("-inf"), dtype=confidence.dtype, device=x.device)
            score = score.masked_scatter(is_masked, confidence)
            if cfg.alg_temp:  # None or 0: deterministic top-k
                commit = rules.commit_sampled(score, k, cfg.alg_temp, rng)
            else:
                commit = rules.commit_topk(score, k)
            x = torch.where(commit, x.masked_scatter(is_masked, proposal), x)

        return finish(x, P, spec)
