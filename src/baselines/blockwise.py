"""LLaDA reference sampler: semi-autoregressive blocks, fixed per-step quota, low-confidence remasking.

Paper: Nie et al., "Large Language Diffusion Models", arXiv 2502.09992 (NeurIPS 2025);
Appendix B (remasking strategies, EOS-confidence trick).
Reference code: ML-GSAI/LLaDA ``generate.py`` (``generate``, ``get_num_transfer_tokens``,
``add_gumbel_noise``) at head b7e6c35, the Oct-2025 version with left padding and the
EOS/EoT flags (research/baselines_core.md §1).

Algorithm (per batch; every row does the same number of forwards):

1. Left-pad the prompts, append ``gen_length`` mask tokens; padding is hidden from attention and
   positions restart at each row's first real token.
2. Split the answer into ``gen_length / block_length`` blocks, decoded strictly left to right;
   each block gets ``steps_per_block = steps / num_blocks`` forwards.
3. At the start of a block, the quota of each step is LLaDA's uniform split of the block's
   masked count (:func:`asynclane.rules.uniform_transfer_counts`).
4. Each step: one full bidirectional forward over the whole buffer (no cache).
5. If ``logits_eos_inf``: the EOS logit is set to -inf (the model can never emit EOS).
6. Proposals ``x0`` for every position: argmax of Gumbel-perturbed logits (plain argmax at T=0).
7. Scores: ``low_confidence`` = softmax probability of ``x0`` under the un-noised logits
   (with ``confidence_eos_eot_inf``, EOS and EoT columns removed first, so such proposals score
   0); ``random`` = Uniform(0, 1).
8. Restrict scores to masked positions of the current block; commit the ``quota[step]``
   highest of each row (``x[pos] <- x0[pos]``).  Committed tokens are never revisited.

NFE = ``steps`` exactly; nothing stops early at EOS (the reference has no early exit).

Hyperparameters (defaults; the official harness settings are in baselines_core.md §1.9, §6.1):

=========================  ===================  ===============================================
key                        default              meaning / source
=========================  ===================  ===============================================
gen_length                 128 (top level)      answer budget; blocks cover it exactly
temperature                0.0                  Gumbel-max temperature; all official evals use 0
steps                      None (= gen_length)  total forwards over all blocks; paper's best
                                                quality is one token per step [P]
block_length               32                   semi-AR block; 32 in Fast-dLLM/dParallel baselines
                                                and LLaDA Table 8 [P]; == gen_length is pure
                                                diffusion (paper Table 2)
remasking                  low_confidence       ``low_confidence`` | ``random`` [C]
logits_eos_inf             False                EOS logit -inf (official HumanEval config) [C]
confidence_eos_eot_inf     False                EOS/EoT proposals get confidence 0 (paper App.
                                                B.4: GSM8K, Math, MBPP, GPQA, HumanEval) [P, C]
=========================  ===================  ===============================================

Deviations from reference:

* ``confidence_eos_eot_inf`` implements the *intended* rule: both EOS and EoT columns are removed
  from the clean logits before the confidence softmax.  The reference's chained assignment does
  exactly this at T = 0 (noised and clean logits are one tensor there, so output is identical),
  but at T > 0 clears only EoT in the clean logits [C] (baselines_core.md §1.7).
* Position ids restart at each row's first real token (``cumsum(key_mask) - 1``); the reference
  passes no position ids with left padding, and whether its HF model shifts RoPE is [U] (§1.8).
  Identical for unpadded rows; makes a batch equal the rows run singly.
* Randomness (Gumbel noise, random scores) comes from the injected ``rng`` instead of the global
  RNG; same draws, same order and shapes, so a generator seeded like the global RNG matches [C].
* ``steps=None`` means ``steps = gen_length`` (the reference's default is a fixed 128) [C].
* Classifier-free guidance (``cfg_scale``) is not implemented: no reported main-table number uses
  it, and the Oct-2025 code raises NameError with it and an attention mask [P, C] (§1.6).
* Top-k ties break toward the lower position (stable sort) instead of torch.topk's unspecified
  order; only exact-tie cases can differ [C].
* The confidence softmax runs in the logits dtype, as the reference does since Jun 2025; Fast-dLLM
  and dParallel forks, pinned earlier, use float64 [C] (§1.1).

Backbones: LLaDA (logits aligned) and Dream (the backbone undoes the shift, so the loop is the
same); the Dream reference sampler is a different algorithm (one block, timestep quota).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.sampler import Generation, SamplerConfig, check_block_length, finish, init_buffer, padding_mask, register

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
        if self.steps is not None and (self.steps <= 0 or self.steps % self.num_blocks):
            raise ValueError(f"steps={self.steps} must be a positive multiple of the number of blocks "
                             f"({self.num_blocks} = gen_length {self.gen_length} / block_length "
                             f"{self.block_length}), e.g. {self.num_blocks}, {2 * self.num_blocks} or "
                             f"{self.gen_length}; or null for steps = gen_length")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return (self.gen_length if self.steps is None else self.steps) // self.num_blocks


@register("blockwise")
class BlockwiseSampler:
    """LLaDA ``generate``: one full forward per step, quota-many commits per step."""

    Config = BlockwiseConfig
    can_batch = True

    def __init__(self, cfg: BlockwiseConfig):
        self.cfg = cfg

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
            quota = rules.uniform_transfer_counts(x[:, lo:hi] == spec.mask_id, cfg.steps_per_block)
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
                    score = rules.random_confidence(x0.shape, rng, device=x.device)
                score = rules.restrict_confidence(score, is_masked, lo, hi)
                commit = rules.commit_topk(score, quota[:, step])
                x = torch.where(commit, x0, x)

        return finish(x, P, spec)
