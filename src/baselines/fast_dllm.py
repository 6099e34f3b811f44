"""Fast-dLLM: confidence-aware parallel decoding in semi-AR blocks, with an approximate KV cache.

Paper: Wu et al., "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache
and Parallel Decoding", arXiv 2505.22618 (v1 PDF read [P]; Algorithm 1, Theorem 1, Fig. 3–4).
Reference code: NVlabs/Fast-dLLM ``llada/generate.py`` (``generate``,
``generate_with_prefix_cache``, ``generate_with_dual_cache``, ``get_transfer_index``,
``get_transfer_index_dynamic``) and ``dream/model/generation_utils_block.py`` (``_sample``) [C]
(research/baselines_core.md §3).

Algorithm (per batch; rows share forwards, a row whose block is done waits without committing):

1. Left-pad the prompts, append ``gen_length`` masks; positions restart at each row's first
   real token.  Split the answer into ``gen_length / block_length`` blocks, decoded left to right.
2. Each block ``[lo, hi)`` loops until it has no mask.  Step 0 of a block is a *refresh*: one
   full forward over the whole buffer that (with a cache) also writes every position's K/V;
   its logits are used for that step's commits (refresh-logit reuse, so the refresh costs no
   extra forward).  ``refresh_every = k`` refreshes again at steps k, 2k, ... of the block.
3. Other steps forward only part of the buffer, against the cache:
   ``prefix``: queries = the block and everything after it; keys = cached ``[0, lo)`` + the
   call's own fresh K/V (the block's and the suffix's cached K/V are not used).
   ``dual``: queries = the block only; its fresh K/V overwrite the cache slots ``[lo, hi)`` in
   place, and it attends to the cached (stale) prefix and suffix plus its own fresh K/V.
   ``none``: every step is a full forward.
4. Proposals: argmax of Gumbel-perturbed logits (plain argmax at T = 0); confidence: the
   float64 softmax probability of the proposal under the un-noised logits.
5. Commit among the block's masked positions: ``threshold`` rule = every one with confidence
   >= ``threshold``, and always the best one; or, when ``factor`` is set, the factor rule =
   the longest prefix of the ranked confidences with ``(n + 1)(1 - c_(n)) <= factor``
   (rank 1 always).  ``threshold > 1`` therefore commits exactly one token per step.
6. Dream family (``commit_first_after_refresh``): the block-start refresh commits only the
   block's first position, unconditionally, from its (refresh) logits; rule 5 applies from the
   next step.  The reference's Dream cache path does this because a cached step cannot
   predict the block's first token: Dream's row for position p comes from position p-1, which
   then lives only in the cache (the backbone returns NaN for such a row).
7. ``early_exit``: a row is final once it holds an EOS-like token with nothing masked before
   it; its remaining masks become EOS (the pad-style end token) and it takes no further part;
   decoding stops when every row is final.

NFE = number of forwards, refreshes included; there is no fixed step count.

Hyperparameters (defaults = the paper's main setting, "PrefixCache, block 32, tau 0.9" [P],
official scripts §3.6 [C]):

==========================  =========  =============================================================
key                         default    meaning / source
==========================  =========  =============================================================
gen_length                  128 (top)  answer budget; blocks cover it exactly
block_length                32         semi-AR block (paper Fig. 4 sweep chose 32) [P, C]
threshold                   0.9        commit every masked block position with conf >= threshold,
                                       at least the best [P, C]; > 1: one token per step
factor                      None       set: the factor rule replaces the threshold rule (later
                                       official code) [C]; its tuned value is [U]
cache                       prefix     none | prefix | dual; prefix is the paper's default [P]
temperature                 0.0        Gumbel-max temperature; every official script uses 0 [C]
refresh_every               None       None: refresh at block start only (the reference); k:
                                       also every k steps of a block (1 = exact, no reuse)
commit_first_after_refresh  None       Dream path of step 6; None = auto: on for Dream-family
                                       backbones when a cache is used (as the reference), off
                                       otherwise
factor_last_rank_quirk      False      reproduce ``get_transfer_index_dynamic``'s off-by-one (a
                                       failing last rank is committed) [C]
early_exit                  False      step 7; the reference decodes the whole budget (issue #10) [S]
==========================  =========  =============================================================

Deviations from reference:

* One loop for both families (LLaDA's ``generate*`` functions).  Fast-dLLM's Dream *no-cache*
  "+Parallel" path is not block-wise (a quota-capped threshold over the whole answer, §3.5); here
  Dream without cache is semi-AR block + threshold like every other variant, as §3.5 recommends.
  With a cache, the Dream first-token commit (step 6) follows ``generation_utils_block.py`` [C].
* Dream-family proposals/confidences use LLaDA's ``get_transfer_index`` (Gumbel-max, float64
  softmax of the raw logits); ``generation_utils_block.py`` uses Dream's ``sample_tokens``
  (categorical, confidence in the logits dtype, optional top-p/top-k).  At T = 0 without
  top-p/top-k these agree up to the float64-vs-logits-dtype rounding of the confidence.
* Gumbel noise is drawn for the block's rows only (the reference draws it for every row of the
  call: whole buffer, suffix or block, and its later prefix-cache code draws an unused second
  noise tensor per step); same distribution, different stream, and the cache modes then consume
  the generator identically.
* Batch > 1 works (rows wait for the slowest row of the block; positions restart per row); the
  reference is batch 1, its dual cache mixes rows (PRs #17/#57) and its Dream model ignores
  padding-aware positions (§3.4) [C, S].
* The cache holds post-RoPE K/V in buffer-column slots (backbone.py, ``Backbone.step``); the
  reference caches pre-RoPE K/V and re-rotates; same attention given true absolute positions
  (§3.4) [C].  A prefix step writes the block's and the suffix's fresh K/V into their slots before
  attending (the step seam attends the cache in place, no concatenation); the reference keeps them
  out of the cache.  Same logits: those slots are rewritten before anything reads them again (the
  next step recomputes them, the next block starts with a refresh).
* Steps forward the whole suffix (prefix mode) as the reference, but only the block's rows go
  through the LM head (the suffix rows are never used); NFE and token-forwards are unchanged.
* The quota path (``threshold=None`` + ``steps``: the paper's "+Cache" baseline with LLaDA's
  schedule) is not exposed; ``threshold > 1`` gives its one-token-per-step setting
  (steps = gen_length, the one used in Table 1).  ``remasking="random"`` is not exposed.
* The mask id is never proposed (its logit is ``-inf`` for the argmax / Gumbel-max only; the
  confidence is the reference's softmax over the whole vocabulary): a committed mask would stay
  masked, and at T = 0 the reference's ``while`` loop would then repeat the same step forever.  A
  trained model gives the mask ~0 probability; a random or tiny test model does not.
* Ties in the ranking break toward the lower position (stable sort) instead of ``torch.topk``'s
  unspecified order [C].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.sampler import Generation, SamplerConfig, check_block_length, finish, init_buffer, padding_mask, register

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
class FastDllmSampler:
    """Fast-dLLM ``generate`` / ``generate_with_prefix_cache`` / ``generate_with_dual_cache``."""

    Config = FastDllmConfig
    can_batch = True

    def __init__(self, cfg: FastDllmConfig):
        self.cfg = cfg

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        first_only = cfg.first_after_refresh(spec.family)
        self._check_dream_rows(spec.family, first_only)
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)  # None: no row is padded, no attention mask at all
        B, Lb = x.shape[0], cfg.block_length
        cache = None if cfg.cache == "none" else backbone.new_cache(B, x.shape[1], key_mask=pad)

        for lo in range(P, P + cfg.gen_length, Lb):
            hi = lo + Lb
            block = torch.arange(lo, hi, device=x.device)  # the block's columns: rows asked for by index, so
            step = 0                                       # Dream's row lo stays the reference's (no p-1 added)
            while bool((masked := x[:, lo:hi] == spec.mask_id).any()):
                every = cfg.refresh_every
                if cache is None:
                    logits = backbone.forward(x, positions=positions, key_mask=pad, predict=block.expand(B, -1))
                elif rules.refresh_due(step, every):  # refresh: every slot rewritten
                    logits = backbone.step(x, cache, (0, x.shape[1]), predict=block)
                elif cfg.cache == "prefix":  # the block and the suffix; [0, lo) read from the cache
                    logits = backbone.step(x, cache, (lo, x.shape[1]), predict=block)
                else:  # dual: the block's fresh K/V replace its slots in place, then it attends to all
                    logits = backbone.step(x, cache, (lo, hi))
                # never propose the mask (Deviations); the confidence keeps the reference's softmax
                proposal = rules.propose(logits, spec.mask_id, cfg.temperature, rng)
                if step == 0 and first_only:  # Dream path: the block's first token, unconditionally
                    commit = rules.first_position_only(masked)
                else:
                    score = rules.restrict_confidence(rules.confidence_prob(logits, proposal, torch.float64), masked)
                    if cfg.factor is not None:
                        commit = rules.commit_factor(score, cfg.factor, cfg.factor_last_rank_quirk)
                    else:
                        commit = rules.commit_threshold(score, cfg.threshold)
                x[:, lo:hi] = torch.where(commit, proposal, x[:, lo:hi])
                if cfg.early_exit:
                    x = self._close_finished(x, P, spec)
                step += 1

        return finish(x, P, spec)

    def _check_dream_rows(self, family: str, first_only: bool) -> None:
        """A Dream cached step cannot predict the block's first token; refuse settings that would ask."""
        cfg = self.cfg
        if family == "dream" and cfg.cache != "none" and not first_only and cfg.refresh_every != 1:
            raise ValueError(
                f"commit_first_after_refresh=False with cache={cfg.cache!r} on a Dream-family backbone: a "
                "cached step cannot predict a block's first token (its row comes from position p-1, which "
                "is only in the cache); use commit_first_after_refresh=null/true (the reference's Dream "
                "path), cache='none', or refresh_every=1")

    @staticmethod
    def _close_finished(x: torch.Tensor, P: int, spec) -> torch.Tensor:
        """Early exit: rows final at their first EOS get their remaining masks filled with EOS."""
        gen = x[:, P:]
        done = rules.finished_at_eos(gen, spec.mask_id, spec.eos_ids)
        x[:, P:] = torch.where(done[:, None] & (gen == spec.mask_id), spec.eos_id, gen)
        return x
