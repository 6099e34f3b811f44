"""AdaBlock-dLLM: Fast-dLLM's threshold decoding with each block ended at a confident delimiter.

Sources: Lu et al., "AdaBlock-dLLM: Semantic-Aware Diffusion LLM Inference via Adaptive Block
Size", arXiv 2509.26432; lgxi24/AdaBlock-dLLM at 491b205, ``llada/generate_adablock.py``,
``dream/model/generation_utils_adablock.py``, ``*/eval_adablock.sh`` [C]
(docs/research/baselines_seeds.md §2).  Blocks left to right, each of a length chosen at its first
step, the refresh forward (no extra call): among the proposals of the look-ahead window (the next
``window_fraction * gen_length`` positions, capped by what remains) the most confident delimiter
ends the block right after it if its confidence >= ``delimiter_threshold``, else the block is
``block_length`` (capped by what remains).  Then Fast-dLLM's loop: refresh-logit reuse, the
threshold rule, cache none / prefix / dual; Dream with a cache: the refresh commits only the
block's first token, as the reference.  Defaults: threshold 0.9, block 32, window 0.25, dual
cache; delimiter threshold 0.3 (LLaDA family) / 0.5 (Dream) [C].  Deviations, in brief: the
delimiter ids come from the tokenizer (every newline-bearing id; the reference lists 198 for LLaDA
and 24 ids for Dream); a prefix cache on Dream too; batch > 1 by row pooling (the reference: batch 1); the mask id is
never proposed; float32 delimiter confidence; ties toward the lower position.  Algorithm,
options and every deviation with its source: docs/samplers/adablock.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from asynclane import rules
from asynclane.rowpool import pooled_generate
from asynclane.sampler import (BaseSampler, Generation, SamplerConfig, delimiter_set, finish, init_buffer,
                               padding_mask, read_host, register)
from baselines.fast_dllm import CACHES, block_commit, block_logits

# the official scripts' delimiter threshold per backbone family (llada/eval_adablock.sh, dream/eval_adablock.sh)
DELIMITER_THRESHOLDS = {"llada": 0.3, "dream": 0.5}


# --------------------------------------------------------------------------- the rule only adablock uses

def delimiter_block_length(logits: torch.Tensor, proposal: torch.Tensor, delimiters: torch.Tensor,
                           fallback: int, threshold: float) -> torch.Tensor:
    """(B,) int64: the length of a block whose look-ahead window is ``logits`` (B, W, V) / ``proposal``
    (B, W), window row 0 = the block's first position.

    ``compute_block_length`` [C]: among the window positions whose proposal is a delimiter id, take
    the one whose proposal has the highest softmax probability (``exp(logit - logsumexp)``, float32
    here); if that is >= ``threshold`` the block ends right after it (length = its offset + 1), else
    the block is ``fallback`` long.  Ties go to the lower position.
    """
    flat = logits.float()
    conf = (flat.gather(-1, proposal[..., None]).squeeze(-1) - torch.logsumexp(flat, -1)).exp()
    conf = torch.where(torch.isin(proposal, delimiters), conf, torch.full_like(conf, float("-inf")))
    best = conf.argmax(-1)  # the first maximum
    qualifies = conf.gather(-1, best[:, None]).squeeze(-1) >= threshold
    return torch.where(qualifies, best + 1, torch.full_like(best, fallback))


# --------------------------------------------------------------------------- config

@dataclass
class AdaBlockConfig(SamplerConfig):
    """AdaBlock-dLLM settings; see the module docstring for sources."""

    block_length: int = 32  # the fixed block a refresh falls back to (the reference's init_block_length)
    threshold: float = 0.9
    delimiter_threshold: Optional[float] = None  # None: auto per family (DELIMITER_THRESHOLDS)
    window_fraction: float = 0.25  # look-ahead window = int(window_fraction * gen_length) positions
    delimiter_ids: Optional[Sequence[int]] = None  # None: every newline-bearing id of the tokenizer
    cache: str = "dual"
    commit_first_after_refresh: Optional[bool] = None  # None: auto (Dream family with a cache)

    # fast_dllm.block_commit reads it: AdaBlock has the threshold rule only, never Fast-dLLM's factor rule
    factor: ClassVar[Optional[float]] = None

    def __post_init__(self):
        super().__post_init__()
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r} is not one of {', '.join(CACHES)}")
        if isinstance(self.block_length, bool) or not isinstance(self.block_length, int) or self.block_length < 1:
            raise ValueError(f"block_length={self.block_length!r} must be a positive integer (the fixed block; "
                             "each block is capped by what remains of gen_length)")
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold} must be >= 0 (0.9 in the paper; > 1 commits one "
                             "token per step)")
        if self.delimiter_threshold is not None and not self.delimiter_threshold >= 0:
            raise ValueError(f"delimiter_threshold={self.delimiter_threshold} must be >= 0, or null for the "
                             "family's value (LLaDA 0.3, Dream 0.5); > 1: fixed blocks")
        if not 0 <= self.window_fraction <= 1:
            raise ValueError(f"window_fraction={self.window_fraction} must lie in [0, 1] (0.25 in the reference)")
        ids = self.delimiter_ids
        if ids is not None and (isinstance(ids, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            raise ValueError(f"delimiter_ids={ids!r} must be a list of non-negative token ids, or null for "
                             "every newline-bearing id of the tokenizer")

    def delimiter_threshold_for(self, family: str) -> float:
        """``delimiter_threshold``, or the official scripts' value for the backbone family when None."""
        return DELIMITER_THRESHOLDS[family] if self.delimiter_threshold is None else self.delimiter_threshold

    def first_after_refresh(self, family: str) -> bool:
        """Whether a block's refresh commits only its first token (the reference's Dream cache path)."""
        return rules.dream_first_token_after_refresh(self.commit_first_after_refresh, family, self.cache != "none")


# --------------------------------------------------------------------------- sampler

@register("adablock")
class AdaBlockSampler(BaseSampler):
    """``generate_adablock`` / ``_prefix_cache`` / ``_dual_cache`` and Dream's ``_sample_adablock(_cache)``."""

    Config = AdaBlockConfig
    can_batch = True  # by row pooling (asynclane.rowpool): one decoding per row, the calls shared
    pools_rows = True

    def __init__(self, cfg: AdaBlockConfig):
        super().__init__(cfg)
        self._delimiters = {}  # id(tokenizer) -> (tokenizer, delimiter ids): one vocabulary scan per tokenizer

    def delimiters(self, backbone) -> frozenset:
        """The delimiter ids for ``backbone``: ``delimiter_ids``, else its tokenizer's newline-bearing ids."""
        tok = getattr(backbone, "tokenizer", None)
        held = self._delimiters.get(id(tok))
        if held is None or held[0] is not tok:
            held = self._delimiters[id(tok)] = (tok, delimiter_set(backbone, self.cfg.delimiter_ids))
        return held[1]

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        if len(prompts) != 1:  # per-row rules: the rows decode side by side, their calls pooled
            return pooled_generate(self.generate, backbone, prompts, rng)
        cfg, spec = self.cfg, backbone.spec
        first_only = cfg.first_after_refresh(spec.family)
        delta = cfg.delimiter_threshold_for(spec.family)
        delimiters = self.delimiters(backbone)
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)
        cache = None if cfg.cache == "none" else backbone.new_cache(1, x.shape[1], key_mask=pad)
        ids = torch.tensor(sorted(delimiters), dtype=torch.long, device=x.device)
        window = int(cfg.window_fraction * cfg.gen_length) if delimiters else 0

        def cols(lo, hi):  # as fast_dllm: by index on the reference's Dream path, else by range
            return torch.arange(lo, hi, device=x.device) if first_only else (lo, hi)

        lengths, done = [], 0
        while done < cfg.gen_length:
            lo, rest = P + done, cfg.gen_length - done
            fallback, look = min(cfg.block_length, rest), min(window, rest)
            # the refresh: rows for the window and the fallback block (fast_dllm's exact call when the
            # window fits in the block, so fixed blocks reproduce it: docs, "Equivalence")
            rows = max(look, fallback)
            logits = block_logits(backbone, x, cache, cfg.cache, (lo, lo + rows), True, cols(lo, lo + rows),
                                  positions=positions, pad=pad)
            proposal = rules.propose(logits, spec.mask_id, cfg.temperature, rng)
            n = fallback
            if look:
                n = read_host(delimiter_block_length(logits[:, :look], proposal[:, :look], ids, fallback, delta))[0][0]
            hi = lo + n
            commit = block_commit(cfg, logits[:, :n], proposal[:, :n], x[:, lo:hi] == spec.mask_id, first_only)
            x[:, lo:hi] = torch.where(commit, proposal[:, :n], x[:, lo:hi])
            want = cols(lo, hi)
            while bool((masked := x[:, lo:hi] == spec.mask_id).any()):
                logits = block_logits(backbone, x, cache, cfg.cache, (lo, hi), False, want, positions=positions, pad=pad)
                proposal = rules.propose(logits, spec.mask_id, cfg.temperature, rng)
                commit = block_commit(cfg, logits, proposal, masked, False)
                x[:, lo:hi] = torch.where(commit, proposal, x[:, lo:hi])
            lengths.append(n)
            done += n

        return finish(x, P, spec, info={"block_lengths": lengths})
