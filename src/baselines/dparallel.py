"""dParallel's inference sampler: entropy-threshold parallel decoding in semi-AR blocks.

Paper: Chen et al., "dParallel: Learnable Parallel Decoding for dLLMs", arXiv 2509.26488 (ICLR
2026); Tables 1-2 read from the repository's images [P].
Reference code: czg1225/dParallel at 2ca4d14 (research/baselines_core.md §4): LLaDA
``generate.py`` (``generate`` + ``get_transfer_index_entropy``, the path of every reported
LLaDA number) and Dream ``model/generation_utils_semiar.py`` (``_sample`` with
``alg="entropy_threshold"``) [C].

dParallel's contribution is the *training* (certainty-forcing distillation, §4.1); at inference
it is this sampler.  Released weights, for users who have them; they are meant to load like the
base model (``model=llada model.path=<dir or hub id>``, ``model=dream model.path=...``; not tried
here):

* ``Zigeng/dParallel-LLaDA-8B-instruct`` (merged LoRA on LLaDA-8B-Instruct)
* ``Zigeng/dParallel_Dream_7B_Instruct`` (on Dream-v0-Instruct-7B)

On the base weights the same rule is a training-free baseline, "Entropy-threshold (dParallel
rule)" (§4.4); expect few tokens per step there, since θ = 0.5 forces top-1 probability >= 0.8.

Algorithm (per batch; rows share forwards, a row whose block is done waits without committing):

1. Left-pad the prompts, append ``gen_length`` masks; positions restart at each row's first
   real token.  Split the answer into ``gen_length / block_length`` blocks, left to right.
2. Each block ``[lo, hi)`` loops until it has no mask; every step is one full forward over
   the whole buffer (no cache; only the block's rows go through the LM head).
3. Proposals: argmax of Gumbel-perturbed logits (plain argmax at T = 0).  Certainty: the
   predictive entropy ``H = -sum p log p`` of the un-noised softmax, in float64, natural log,
   over the full vocabulary.
4. Commit among the block's masked positions: the one with the lowest ``H``, plus every other
   one with ``H <= threshold``.  ``threshold = 0`` therefore commits exactly one token per step
   (the lowest-entropy one); a huge threshold commits the whole block in one step.

NFE = number of forwards; no fixed step count, no early exit (the reference's EOS exit is
commented out [C]).

Hyperparameters (defaults = the reported setting [C, P], §4.2):

============  =========  ==================================================================
key           default    meaning / source
============  =========  ==================================================================
gen_length    128 (top)  answer budget; the papers use 256
block_length  32         semi-AR block, must divide gen_length [C]
threshold     0.5        entropy bound in nats; 0.45 for LLaDA MBPP and Dream GSM8K/MATH [C]
temperature   0.0        Gumbel-max temperature; every reported dParallel run uses 0 [C]
============  =========  ==================================================================

Deviations from reference:

* One loop for both families: the LLaDA rule (keep ``H <= threshold``, float64 entropy).  The
  Dream reference keeps ``H < threshold`` with the entropy in the logits dtype and ``+1e-8``
  inside the log; at T = 0 these differ only at exact equality and by rounding near the
  threshold (bf16 on the real model: §4.7) [C].
* The entropy uses ``xlogy`` (exact ``0 log 0 = 0``) instead of ``log(p + 1e-12)`` [C]; the
  difference is below 1e-9 nats for any vocabulary here.
* At T > 0 the Dream reference samples ``multinomial(softmax(logits / T))``; here Gumbel-max in
  float64 as in LLaDA: same distribution, different random stream [C].
* No cache.  The LLaDA code also has prefix- and dual-cache variants (Fast-dLLM's mechanics with
  this rule) [C], but every reported number uses none (README [C]).  They are not reproduced
  here: they are the fast_dllm loop with a different score, and the design keeps one loop per
  sampler, so the natural home is an entropy-confidence switch in ``fast_dllm`` (not done).
* The mask id is never proposed (its logit is ``-inf`` for the argmax only; the entropy keeps
  the full softmax), as in ``fast_dllm``: a committed mask would stay masked and the reference's
  ``while`` loop would repeat the same step forever at T = 0.  Trained models give the mask ~0
  probability; random test models might not.
* Batch > 1 works (rows wait for the slowest row of the block; positions restart per row); the
  reference is batch 1 (its Dream selection loop indexes row 0 only) [C].
* Ties in the entropy ranking break toward the lower position (stable sort) instead of
  ``torch.topk``'s unspecified order [C].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from asynclane import rules
from asynclane.sampler import Generation, SamplerConfig, check_block_length, finish, init_buffer, padding_mask, register


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
class DParallelSampler:
    """dParallel ``generate`` with ``threshold``: entropy-threshold commits, block by block, no cache."""

    Config = DParallelConfig
    can_batch = True

    def __init__(self, cfg: DParallelConfig):
        self.cfg = cfg

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
