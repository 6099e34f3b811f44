"""LocalLeap (Local Determinism Propagation): Fast-dLLM's threshold rule, relaxed next to anchors.

Sources: Kong et al., arXiv 2510.07081 (abstract [P], body via summaries [S]); reference code
friedrichor/LocalLeap, not read here: its selection loop is known from the spec's reading of public
mirrors [M] (docs/research/baselines_seeds.md §1, §8).  Semi-AR blocks, a full forward every step
(no cache: the paper's setting).  A step's *anchors* are the block's masked positions with
confidence >= ``threshold``; it commits the best masked position, every anchor, and every masked
position within ``radius`` (index distance) of an anchor whose confidence is >= ``relaxed_threshold``.
``relaxed_threshold == threshold`` (or ``radius == 0``) is ``fast_dllm`` with ``cache=none``.
Defaults 0.9 / 0.75 / 4 / block 32 for both families (Dream's own are [U]).  Choices the paper
leaves open, all ours: ``relaxed_threshold <= threshold`` enforced; batch > 1 (per-row anchors);
T > 0 sampling, mask never proposed and lower-position ties as fast_dllm; ``early_exit`` checked
every step on every EOS-like id (reference: at block end, one id); no cache option.  Algorithm,
options and every choice with its source: docs/samplers/localleap.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from asynclane import rules
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, check_block_length, finish, init_buffer, padding_mask, register
from baselines.fast_dllm import block_logits, close_finished


# --------------------------------------------------------------------------- the rule only localleap uses

_NEG_INF = float("-inf")


def near_anchors(anchors: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, n) bool: positions at index distance <= ``radius`` from some anchor of their row.

    ``anchors`` (B, n) bool.  The neighbourhood is a hard window ``[a - radius, a + radius]`` around
    each anchor ``a``, clipped to the ``n`` columns, and the union over anchors [M]
    (baselines_seeds.md §1.2: no distance-graded threshold in the code; a graded variant is [U]).
    """
    width = 2 * radius + 1
    padded = F.pad(anchors.to(torch.float32), (radius, radius))
    return padded.unfold(-1, width, 1).amax(-1) > 0


def commit_local_leap(score: torch.Tensor, threshold: float, relaxed_threshold: float, radius: int) -> torch.Tensor:
    """(B, n) bool: LocalLeap's commit set over ``score`` (B, n), ``-inf`` = not eligible.

    [M] (baselines_seeds.md §1.2): anchors = eligible positions with ``score >= threshold``, found
    afresh from this step's scores only (committed tokens are not eligible, so never anchors);
    commit = each row's best (ties to the lower index) | the anchors | eligible positions within
    ``radius`` of an anchor with ``score >= relaxed_threshold``.  Rows with nothing eligible commit
    nothing.  With ``relaxed_threshold >= threshold`` or ``radius == 0`` this is
    :func:`asynclane.rules.commit_threshold`.
    """
    anchors = rules.commit_above(score, threshold)
    relaxed = near_anchors(anchors, radius) & rules.commit_above(score, relaxed_threshold)
    return rules.commit_threshold(score, threshold) | relaxed


# --------------------------------------------------------------------------- sampler

@dataclass
class LocalLeapConfig(SamplerConfig):
    """LocalLeap settings; see the module docstring for sources."""

    block_length: int = 32
    threshold: float = 0.9  # strict threshold; anchors are the positions that pass it
    relaxed_threshold: float = 0.75  # within ``radius`` of an anchor
    radius: int = 4
    early_exit: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_block_length(self.block_length, self.gen_length)
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold} must be >= 0 (0.9 in the paper; > 1 commits one "
                             "token per step)")
        if not 0 <= self.relaxed_threshold <= self.threshold:
            raise ValueError(f"relaxed_threshold={self.relaxed_threshold} must lie in [0, threshold={self.threshold}] "
                             "(0.75 in the paper; equal to threshold: the fast_dllm rule)")
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or self.radius < 0:
            raise ValueError(f"radius={self.radius!r} must be an integer >= 0 (4 in the paper; 0: the fast_dllm rule)")


@register("localleap")
class LocalLeapSampler(BaseSampler):
    """Semi-AR blocks, a full forward per step, :func:`commit_local_leap` over the block."""

    Config = LocalLeapConfig

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)  # None: no row is padded, no attention mask at all

        for lo in range(P, P + cfg.gen_length, cfg.block_length):
            hi = lo + cfg.block_length
            while bool((masked := x[:, lo:hi] == spec.mask_id).any()):
                # the full forward of fast_dllm's cache=none path (no cache: the paper's setting)
                logits = block_logits(backbone, x, None, "none", (lo, hi), True, (lo, hi), positions=positions, pad=pad)
                proposal = rules.propose(logits, spec.mask_id, cfg.temperature, rng)
                score = rules.restrict_confidence(rules.confidence_prob(logits, proposal, torch.float64), masked)
                commit = commit_local_leap(score, cfg.threshold, cfg.relaxed_threshold, cfg.radius)
                x[:, lo:hi] = torch.where(commit, proposal, x[:, lo:hi])
                if cfg.early_exit:
                    x = close_finished(x, P, spec)

        return finish(x, P, spec)
