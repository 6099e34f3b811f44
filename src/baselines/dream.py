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
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, finish, init_buffer, padding_mask, register


# --------------------------------------------------------------------------- rules only dream uses

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
class DreamSampler(BaseSampler):
    """Dream ``diffusion_generate``: one full forward per step, timestep quota, one block."""

    Config = DreamConfig
    can_batch = True  # alg=origin excepted: its uniforms are drawn over the whole batch (see Deviations)

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)  # None when no row is padded: no attention mask
        timesteps = dream_timesteps(cfg.num_steps, cfg.eps, device=x.device)
        sample = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, rng=rng)

        # mirrors generation_utils.py `_sample` (one loop over steps; no blocks)
        for i in range(cfg.num_steps):
            t, s, last = timesteps[i], timesteps[i + 1], i == cfg.num_steps - 1
            is_masked = x == spec.mask_id
            logits = backbone.forward(x, positions=positions, key_mask=pad)
            logits = rules.without_mask(logits, spec.mask_id)  # never propose the mask (Deviations)
            masked_logits = logits[is_masked]  # (N, V), row-major over (batch, position)
            if cfg.alg == "origin":
                fire = dream_origin_fire(masked_logits.shape[0], t, s, last, rng)
                fill = torch.full_like(x[is_masked], spec.mask_id)
                if bool(fire.any()):
                    fill[fire] = dream_sample_tokens(masked_logits[fire], **sample)[1]
                x = x.masked_scatter(is_masked, fill)
                continue
            confidence, proposal = dream_sample_tokens(masked_logits, measure=_MEASURE[cfg.alg], **sample)
            k = dream_transfer_count(is_masked, t, s, last)
            if k <= 0:
                continue
            score = torch.full(x.shape, float("-inf"), dtype=confidence.dtype, device=x.device)
            score = score.masked_scatter(is_masked, confidence)
            if cfg.alg_temp:  # None or 0: deterministic top-k
                commit = commit_sampled(score, k, cfg.alg_temp, rng)
            else:
                commit = rules.commit_topk(score, k)
            x = torch.where(commit, x.masked_scatter(is_masked, proposal), x)

        return finish(x, P, spec)
