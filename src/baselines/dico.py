"""DiCo-style (reconstructed): Divide and Conquer adaptive parallel decoding.

Paper: Luo, An, Yu, Liu, Yang, "DiCo", arXiv 2602.23792 (abstract [P]; the rest only through
secondary summaries [S]).  No reference code: none is public (docs/research/baselines_seeds.md
§0.1, §3), so this is the spec's labelled reconstruction (§3.4), *not the authors' algorithm*.
Each step is one full forward (no cache, §3.3) over the active region (default one block = the whole
answer, the paper's "non-AR" mode [S]; ``block_length`` gives semi-AR).  While a row has more than
``R_final = max(final_tokens, final_fraction * region)`` masks: *Divide* -- score ``c * stab * W``
(argmax stability over ``stable_steps`` steps, trajectory weight ``exp(-trajectory_decay * d / region)``
from the leftmost mask), up to ``n_seeds`` seeds with ``c >= seed_confidence`` by greedy Soft-NMS
(Gaussian width ``nms_sigma``), each grown left/right over masks with ``c >= grow_confidence``,
overlapping or touching clusters merged; *Conquer* -- Fast-dLLM's factor rule (``factor`` = 1) per cluster,
plus the seeds (``always_commit_seeds``).  Then *Finalize*: the best ``c + margin_weight * sigmoid(margin)`` and every mask with
logit margin > ``final_margin``.  Same defaults for both families (per-family ones are [U]).  Choices
the spec leaves open, all [ours]: ``trajectory_decay`` 2 and ``final_margin`` 3; the frontier is the
leftmost mask; a step with no seed-eligible mask seeds its best-scored one; batch > 1 (per-row
phases); T > 0 and the mask never proposed as fast_dllm.  Details: docs/samplers/dico.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, check_block_length, finish, init_buffer, padding_mask, read_host, register
from baselines.fast_dllm import block_logits, commit_factor

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- pure rules (all [ours], §3.4)

def trajectory_weight(masked: torch.Tensor, decay: float) -> torch.Tensor:
    """(B, n) float64 ``W(i, t) = exp(-decay * max(0, i - f_t) / n)``, ``f_t`` = each row's leftmost
    masked column (the decoded frontier), ``n`` = the region's length (§3.4's ``B``)."""
    n = masked.shape[-1]
    col = torch.arange(n, device=masked.device)
    frontier = masked.long().argmax(-1, keepdim=True)  # first True (argmax returns the first maximum)
    dist = (col - frontier).clamp(min=0).to(torch.float64)
    return torch.exp(-decay * dist / n)


def stability_weight(run: torch.Tensor, steps: int, unstable: float) -> torch.Tensor:
    """(B, n) float64: 1 where the argmax has been the same for the last ``steps`` steps (``run``: how
    many consecutive steps, this one included), ``unstable`` elsewhere (§3.4's ``stab_i``)."""
    return torch.full(run.shape, float(unstable), dtype=torch.float64, device=run.device).masked_fill(run >= steps, 1.0)


def divide_score(conf: torch.Tensor, stab: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, n) float64 ``c * stab * W``; ``-inf`` stays ``-inf`` (not a candidate)."""
    conf = conf.to(torch.float64)
    return torch.where(conf > _NEG_INF, conf * stab * weight, _NEG_INF)


def soft_nms(score: torch.Tensor, n_seeds: int, sigma: float) -> torch.Tensor:
    """(B, n) bool: up to ``n_seeds`` picks per row by greedy Soft-NMS over ``score`` (``-inf``: not
    pickable).  Each round takes the row's highest remaining score (ties: the lower column) and
    multiplies every other score by ``1 - exp(-(i - j)^2 / (2 sigma^2))`` (§3.4).  A row stops
    when nothing pickable is left."""
    B, n = score.shape
    col = torch.arange(n, device=score.device, dtype=torch.float64)
    s = score.to(torch.float64)
    picked = torch.zeros(B, n, dtype=torch.bool, device=score.device)
    for _ in range(n_seeds):
        j = s.argmax(-1, keepdim=True)  # the first maximum
        ok = s.gather(-1, j) > _NEG_INF
        pick = (col == j) & ok
        picked |= pick
        keep = 1 - torch.exp(-(col - j.to(torch.float64)) ** 2 / (2 * sigma ** 2))
        s = torch.where(pick, _NEG_INF, torch.where(ok & (s > _NEG_INF), s * keep, s))
    return picked


def select_seeds(score: torch.Tensor, conf: torch.Tensor, seed_confidence: float, n_seeds: int,
                 sigma: float) -> torch.Tensor:
    """(B, n) bool seeds: :func:`soft_nms` over the candidates with ``conf >= seed_confidence``; a row
    with candidates but none of them seed-eligible gets its best-scored candidate as its one seed
    ([ours]: every step makes progress, and the trajectory weight still chooses)."""
    eligible = score > _NEG_INF
    seedable = eligible & (conf >= seed_confidence)
    seeds = soft_nms(torch.where(seedable, score.to(torch.float64), _NEG_INF), n_seeds, sigma)
    fallback = (rules.ranks(score) == 0) & eligible & ~seedable.any(-1, keepdim=True)
    return seeds | fallback


def _reach_right(seeds: torch.Tensor, growable: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: a seed ``s <= p`` exists with every column of ``(s, p]`` growable."""
    n = seeds.shape[-1]
    col = torch.arange(n, device=seeds.device)
    brk = torch.where(growable, -1, col).cummax(-1).values  # last non-growable column <= p (-1: none)
    cs = seeds.long().cumsum(-1)
    before = torch.where(brk >= 1, cs.gather(-1, (brk - 1).clamp(min=0)), 0)  # seeds in [0, brk)
    return cs - before > 0  # a seed in [brk, p]: brk itself may be a (non-growable) seed


def grow_clusters(seeds: torch.Tensor, growable: torch.Tensor) -> torch.Tensor:
    """(B, n) long cluster labels, ``-1`` outside every cluster.

    Each seed grows left and right while the next column is ``growable`` (masked, ``c >= c_grow``);
    overlapping or touching clusters are merged ([ours]: a run with no decoded token in it is one
    cluster), so the clusters are the maximal runs of member columns, labelled 0, 1, ... from the
    left.  They never overlap, and each holds at least one seed.
    """
    right = _reach_right(seeds, growable)
    left = _reach_right(seeds.flip(-1), growable.flip(-1)).flip(-1)
    member = seeds | (growable & (left | right))
    start = member.clone()
    start[:, 1:] &= ~member[:, :-1]
    return torch.where(member, start.long().cumsum(-1) - 1, -1)


def conquer(conf: torch.Tensor, labels: torch.Tensor, n_clusters: int, factor: float) -> torch.Tensor:
    """(B, n) bool: :func:`baselines.fast_dllm.commit_factor` applied to each cluster's confidences on
    its own (labels ``0 .. n_clusters - 1``; §3.4's Conquer, ``factor`` = 1 in DiCo [S])."""
    B, n = conf.shape
    k = torch.arange(n_clusters, device=conf.device)[None, :, None]
    per = torch.where(labels[:, None, :] == k, conf.to(torch.float64)[:, None, :], _NEG_INF)  # (B, K, n)
    return commit_factor(per.reshape(B * n_clusters, n), factor).reshape(B, n_clusters, n).any(1)


def finalize_commit(conf: torch.Tensor, margin: torch.Tensor, margin_weight: float,
                    final_margin: Optional[float]) -> torch.Tensor:
    """(B, n) bool: the best ``c + margin_weight * sigmoid(margin)`` candidate (ties: the lower column)
    and, unless ``final_margin`` is None, every candidate with ``margin > final_margin`` (§3.4)."""
    eligible = conf > _NEG_INF
    score = torch.where(eligible, conf.to(torch.float64) + margin_weight * torch.sigmoid(margin.to(torch.float64)),
                        _NEG_INF)
    commit = (rules.ranks(score) == 0) & eligible
    if final_margin is not None:
        commit |= eligible & (margin.to(torch.float64) > final_margin)
    return commit


def proposal_margin(masked_logits: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:
    """(B, n): the proposal's logit minus the best other token's (mask id excluded: ``masked_logits``
    has it at ``-inf``).  At T = 0 the proposal is the argmax: §3.4's ``top1 - top2``."""
    own = masked_logits.gather(-1, proposal[..., None]).squeeze(-1)
    other = masked_logits.scatter(-1, proposal[..., None], _NEG_INF).amax(-1)
    return own - other


def divide_and_conquer(conf: torch.Tensor, run: torch.Tensor, masked: torch.Tensor, cfg) -> tuple:
    """One Divide + Conquer step over a region: ``(commit, seeds, labels)``, each (B, n).  ``conf``:
    confidences, ``-inf`` off the masked columns; ``run``: consecutive steps of unchanged argmax."""
    score = divide_score(conf, stability_weight(run, cfg.stable_steps, cfg.unstable_weight),
                         trajectory_weight(masked, cfg.trajectory_decay))
    seeds = select_seeds(score, conf, cfg.seed_confidence, cfg.n_seeds, cfg.nms_sigma)
    labels = grow_clusters(seeds, conf >= cfg.grow_confidence)  # conf is -inf off the masks
    commit = conquer(conf, labels, cfg.n_seeds, cfg.factor)  # every cluster holds a seed: < n_seeds of them
    if cfg.always_commit_seeds:
        commit = commit | seeds
    return commit, seeds, labels


def final_size(cfg, region: int) -> float:
    """R_final: a row with at most this many masks in its region is in the Finalize phase."""
    return max(cfg.final_tokens, cfg.final_fraction * region)


# --------------------------------------------------------------------------- sampler

def _unit(name: str, v) -> None:
    if not 0 <= v <= 1:
        raise ValueError(f"{name}={v} must lie in [0, 1]")


def _integer(name: str, v, least: int, note: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ValueError(f"{name}={v!r} must be an integer >= {least} ({note})")


@dataclass
class DiCoConfig(SamplerConfig):
    """DiCo-style (reconstructed) settings; sources in docs/samplers/dico.md."""

    block_length: Optional[int] = None  # None: one block over the whole answer (the paper's non-AR mode)
    n_seeds: int = 5  # N, §3.4 "4-6"
    seed_confidence: float = 0.5  # c_seed
    grow_confidence: float = 0.7  # c_grow
    nms_sigma: float = 4.0  # sigma of the Soft-NMS suppression
    trajectory_decay: float = 2.0  # lambda of W [ours]; 0: no trajectory guidance
    stable_steps: int = 2  # k
    unstable_weight: float = 0.5  # stab_i when the argmax changed within the last k steps
    factor: float = 1.0  # Conquer's factor rule
    always_commit_seeds: bool = True  # "(at least the seed itself)"
    final_tokens: int = 8  # R_final = max(final_tokens, final_fraction * region)
    final_fraction: float = 0.1
    margin_weight: float = 1.0  # beta
    final_margin: Optional[float] = 3.0  # M [ours]; None: one token per Finalize step

    def __post_init__(self):
        super().__post_init__()
        if self.block_length is not None:
            check_block_length(self.block_length, self.gen_length)
        _integer("n_seeds", self.n_seeds, 1, "N; 5 by default, the spec suggests 4-6")
        _unit("seed_confidence", self.seed_confidence)
        _unit("grow_confidence", self.grow_confidence)
        if not (self.nms_sigma > 0 and math.isfinite(self.nms_sigma)):
            raise ValueError(f"nms_sigma={self.nms_sigma} must be a finite number > 0 (the Soft-NMS width, 4 by default)")
        if not (self.trajectory_decay >= 0 and math.isfinite(self.trajectory_decay)):
            raise ValueError(f"trajectory_decay={self.trajectory_decay} must be a finite number >= 0 "
                             "(0: no trajectory guidance)")
        _integer("stable_steps", self.stable_steps, 1, "k; 1: every argmax counts as stable")
        _unit("unstable_weight", self.unstable_weight)
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ValueError(f"factor={self.factor} must be a finite number > 0 (1 in DiCo)")
        _integer("final_tokens", self.final_tokens, 0, "0 with final_fraction 0: never finalize")
        _unit("final_fraction", self.final_fraction)
        if not (self.margin_weight >= 0 and math.isfinite(self.margin_weight)):
            raise ValueError(f"margin_weight={self.margin_weight} must be a finite number >= 0 (beta; 0: confidence only)")
        if self.final_margin is not None and not self.final_margin >= 0:
            raise ValueError(f"final_margin={self.final_margin} must be >= 0, or null for one token per Finalize step")


@register("dico")
class DiCoSampler(BaseSampler):
    """One full forward per step; per row, Divide + Conquer while many masks remain, then Finalize."""

    Config = DiCoConfig

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        pad = padding_mask(key_mask, prompts)  # None: no row is padded, no attention mask at all
        B, Lb = x.shape[0], cfg.block_length or cfg.gen_length
        r_final = final_size(cfg, Lb)
        phases = {"divide_steps": 0, "finalize_steps": 0}

        for lo in range(P, P + cfg.gen_length, Lb):
            hi = lo + Lb
            last = torch.full((B, Lb), -1, dtype=torch.long, device=x.device)  # previous step's argmax
            run = torch.zeros((B, Lb), dtype=torch.long, device=x.device)
            while True:
                masked = x[:, lo:hi] == spec.mask_id
                (left,) = read_host(masked.sum(-1))  # the iteration's one device->host read
                if not any(left):
                    break
                finalize = [0 < m <= r_final for m in left]  # each row's phase (§3.4)
                logits = block_logits(backbone, x, None, "none", (lo, hi), True, (lo, hi), positions=positions, pad=pad)
                # rules.propose, spelled out: the mask-free logits are reused for the argmax history and the margin
                free = rules.without_mask(logits, spec.mask_id)
                argmax = free.argmax(-1)
                proposal = argmax if cfg.temperature == 0 else rules.gumbel_argmax(free, cfg.temperature, rng)
                conf = rules.restrict_confidence(rules.confidence_prob(logits, proposal, torch.float64), masked)
                run = torch.where(argmax == last, run + 1, 1)
                last = argmax
                commit = None
                if any(m > r_final for m in left):
                    commit, _, _ = divide_and_conquer(conf, run, masked, cfg)
                    phases["divide_steps"] += 1
                if any(finalize):
                    fin = finalize_commit(conf, proposal_margin(free, proposal), cfg.margin_weight, cfg.final_margin)
                    rows = torch.tensor(finalize, device=x.device)[:, None]
                    commit = fin if commit is None else torch.where(rows, fin, commit)
                    phases["finalize_steps"] += 1
                x[:, lo:hi] = torch.where(commit, proposal, x[:, lo:hi])

        return finish(x, P, spec, info=phases)
