"""Dream reference sampler: one block, a timestep quota, four position-selection algorithms.

Paper: Ye et al., "Dream 7B: Diffusion Large Language Models", arXiv 2508.15487 (only the
abstract was read; research/baselines_core.md §0.2).
Reference code: ``diffusion_generate`` / ``_sample`` / ``sample_tokens`` / ``top_p_logits`` /
``top_k_logits`` in the HF model repo's ``generation_utils.py`` (Dream-org/Dream-v0-Instruct-7B),
read in the copy vendored by NVlabs/Fast-dLLM ``dream/model/generation_utils.py`` [M], which
differs only by an extra ``confidence_threshold`` branch (baselines_core.md §2).

Algorithm (per batch; every row does the same number of forwards):

1. Left-pad the prompts, append ``gen_length`` mask tokens; padding is hidden from attention and
   positions restart at each row's first real token (the reference's ``tok_idx``).
2. ``t = linspace(1, eps, steps + 1)`` (float32).  For step ``i = 0 .. steps-1``, with
   ``t = t_i``, ``s = t_{i+1}``:
3. One full bidirectional forward; logits aligned (the backbone undoes Dream's shift, so the loop
   is the same on either family).
4. ``alg="origin"``: each masked position (flattened over the batch) independently fires with
   probability ``1 - s/t`` (all at the last step); fired positions get a token from
   ``sample_tokens`` (temperature / top-p / top-k; argmax at T = 0), the rest stay masked.
5. Otherwise: ``sample_tokens`` on every masked row gives a proposal and a confidence —
   ``maskgit_plus``: the proposal's probability, ``topk_margin``: top-1 minus top-2 probability,
   ``entropy``: ``sum p log(p + 1e-10)`` — all on the temperature/top-p/top-k filtered
   distribution.  ``k = int(mean masked per row * (1 - s/t))`` (everything left at the last
   step); commit the ``k`` most confident masked positions of each row, or, with
   ``alg_temp > 0``, ``k`` positions drawn without replacement from ``softmax(conf / alg_temp)``.

NFE = ``steps`` exactly, including steps that commit nothing (with ``steps = gen_length`` the
first step commits 0 tokens and the last 2: float32 rounding of the quota, §2.4).

Hyperparameters (defaults; official evaluation settings in baselines_core.md §2.1, §2.6):

=============  ===================  ===========================================================
key            default              meaning / source
=============  ===================  ===========================================================
gen_length     128 (top level)      answer budget (``max_new_tokens``)
steps          None (= gen_length)  forwards; every official eval uses steps = max_new_tokens [C]
alg            entropy              origin | maskgit_plus | topk_margin | entropy; ``entropy`` in
                                    every official eval (Instruct, Base, Fast-dLLM's baseline)
                                    [C]; the generation config's default is ``origin`` [M]
alg_temp       None                 None/0: top-k positions; > 0: sampled positions [M]
eps            1e-3                 end of the t grid [M]
temperature    0.0                  0: argmax (a greedy variant of the official 0.1 / 0.2) [M]
top_p          None                 nucleus filter; official Instruct 0.9, Base 0.95 [C]
top_k          None                 top-k filter [M]
=============  ===================  ===========================================================

Deviations from reference:

* Randomness comes from the injected ``rng`` instead of the global RNG: the same draws in the
  same order and shapes (``rand`` per masked position for ``origin``; ``Categorical.sample`` is
  its ``multinomial(.., 1, True)`` on renormalised probabilities; ``multinomial`` for
  ``alg_temp``), so a generator seeded like the global RNG reproduces a reference run [M].
* Top-k ties break toward the lower position (stable sort); ``torch.topk`` leaves them
  unspecified [M].
* The argmax fallback of ``sample_tokens`` fires when the probabilities are not finite; the
  reference falls back on *any* exception of ``torch.distributions.Categorical``, whose argument
  validation also rejects rows that do not sum to 1 within 1e-6 — whether that ever happens
  with low-precision logits is [U].
* The mask id's logit is set to ``-inf`` before sampling: the reference samples over the whole
  vocabulary, where a trained model gives the mask ~0 probability; a random or tiny test model
  does not, and a sampled mask would survive the last step.
* ``steps=None`` means ``steps = gen_length``; the generation config's default is a fixed 512 [M].
* No ``generation_tokens_hook_func`` / ``generation_logits_hook_func`` / ``output_history``: the
  harness passes none (Dream's eval wrapper does not use them for scoring) [C].
* ``alg="origin"`` draws one uniform per masked position of the *whole batch* (as the
  reference), so a batch differs from the same prompts run singly with the same seed; the other
  algorithms are batch-invariant (rows always hold the same number of masks, so the batch-mean
  quota is each row's quota).

Backbones: Dream (the family it was written for) and LLaDA (aligned logits already).
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
