"""FreeDave: lossless draft-and-verify of future greedy steps, one batched forward per verification.

Sources: Wu, Zhang, "Free Draft-and-Verification: Toward Lossless Parallel Decoding for Diffusion
Large Language Models", arXiv 2510.00294 [P-abstract]; cychomatica/FreeDave ``generation/core.py``
(``block_decode_with_full_attention_FreeDave``, ``token_transfer``, ``draft_verification``) and
``eval/scripts/eval_{llada,dream}.sh`` at 8b48121 [C] (docs/research/baselines_seeds.md §6).
The reference sampler takes one greedy step at a time (top-1 confidence, semi-AR blocks).  From a
state and its own logits, ``freedave`` drafts the next 1..d greedy steps (the top-k masked block
positions), runs every draft as one row of a single call, and accepts the longest chain of drafts
each of which the previous draft's own next step confirms; the output is the reference's, token for
token, in fewer calls.  ``freedave_pp`` (FreeDave++) does the same around Fast-dLLM's threshold
step.  Defaults: block 32, draft steps 4 (LLaDA) / 8 (Dream) [C].  Deviations, in brief: no cache
by default (the reference sampler here, ``blockwise``, has none; ``cache=dual`` is the scripts'
setting); early exit off; batch replication or a lane cache instead of a tree mask; batch > 1 by
row pooling (the reference: batch 1); a reference step that completes the block is taken without a call; FreeDave++'s
confidence in float64; its reference ``subset`` verification (the default) is not lossless,
``exact`` is.  Algorithm, options and every deviation with its source: docs/samplers/freedave.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.rowpool import pooled_generate
from asynclane.sampler import (BaseSampler, Generation, SamplerConfig, check_block_length, finish,
                              init_buffer, read_host, register)

_NEG_INF = float("-inf")

CACHES = ("none", "prefix", "dual")
MATCH_RULES = ("subset", "exact")
DRAFT_STEPS = {"llada": 4, "dream": 8}  # eval/scripts/eval_{llada,dream}.sh [C]


# --------------------------------------------------------------------------- rules only freedave uses

def build_drafts(blk: torch.Tensor, proposal: torch.Tensor, score: torch.Tensor, n: int,
                 first) -> torch.Tensor:
    """(n, Lb) drafts of one block: draft k = ``blk`` with its ``first + k`` best-scored masked positions
    set to their proposals.

    ``blk`` / ``proposal`` / ``score``: (Lb,) the block, the proposals of its own (or, for a stale
    state, an earlier) call, and their confidence restricted to the masked positions (-inf
    elsewhere).  ``first``: how many positions draft 0 commits (int or 0-d tensor): 1 for FreeDave
    (draft k = the greedy step k + 1 ahead), the threshold step's count for FreeDave++, 0 when the
    logits are stale (draft 0 is the state itself).  ``token_transfer`` [C]; ranks break ties toward
    the lower position, counts beyond the masked ones commit every masked position.
    """
    rank = rules.ranks(score[None])[0]
    k = torch.arange(n, device=blk.device)[:, None]
    commit = (score > _NEG_INF) & (rank < first + k)
    return torch.where(commit, proposal, blk)


def agreement(drafts: torch.Tensor, targets: torch.Tensor, mask_id: int, rule: str) -> torch.Tensor:
    """(n, n) bool ``A[i, j]``: draft j agrees with target i (the step taken from draft i).

    ``subset`` (the reference's rule): every unmasked position of draft j holds target i's token;
    ``exact``: the two are equal.  ``draft_verification_vectorized`` [C].
    """
    same = drafts[None, :, :] == targets[:, None, :]
    if rule == "subset":
        same = same | (drafts[None, :, :] == mask_id)
    return same.all(-1)


def accepted_chain(agree: list) -> int:
    """The draft accepted from a host ``agree`` matrix (list of rows): from draft 0, move to the largest
    later draft that agrees with the current one's target, until none does (``best`` of [C])."""
    best = 0
    while True:
        later = [j for j in range(best + 1, len(agree)) if agree[best][j]]
        if not later:
            return best
        best = later[-1]


# --------------------------------------------------------------------------- configs

@dataclass
class FreeDaveConfig(SamplerConfig):
    """FreeDave settings (one greedy token per reference step); see the module docstring for sources."""

    block_length: int = 32
    draft_steps: Optional[int] = None  # None: the family's default (DRAFT_STEPS)
    cache: str = "none"
    early_exit: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_block_length(self.block_length, self.gen_length)
        if self.draft_steps is not None and (isinstance(self.draft_steps, bool) or self.draft_steps < 1):
            raise ValueError(f"draft_steps={self.draft_steps} must be a positive integer (1 = no drafting), "
                             f"or null for the family default ({DRAFT_STEPS})")
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r} is not one of {', '.join(CACHES)}")

    def drafts_for(self, family: str) -> int:
        return DRAFT_STEPS[family] if self.draft_steps is None else self.draft_steps


@dataclass
class FreeDavePPConfig(FreeDaveConfig):
    """FreeDave++ settings: the reference step is Fast-dLLM's threshold step."""

    threshold: float = 0.95
    match_rule: str = "subset"

    def __post_init__(self):
        super().__post_init__()
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold} must be >= 0 (0.95 in the scripts; > 1 commits one "
                             "token per step)")
        if self.match_rule not in MATCH_RULES:
            raise ValueError(f"match_rule={self.match_rule!r} is not one of {', '.join(MATCH_RULES)}")


# --------------------------------------------------------------------------- samplers

@register("freedave")
class FreeDaveSampler(BaseSampler):
    """``block_decode_with_full_attention_FreeDave`` with ``confidence_threshold=None``."""

    Config = FreeDaveConfig
    can_batch = True  # by row pooling (asynclane.rowpool): one decoding per row, the calls shared
    pools_rows = True
    threshold: Optional[float] = None  # None: the reference step commits the single best position
    conf_dtype: Optional[torch.dtype] = None  # blockwise's softmax dtype (the logits')
    match_rule = "subset"  # for one-token steps "subset" and "exact" accept the same drafts

    def _step(self, score: torch.Tensor) -> torch.Tensor:
        """The reference step's commits over restricted scores (rows, Lb)."""
        if self.threshold is None:
            return rules.commit_topk(score, 1)
        return rules.commit_threshold(score, self.threshold)

    def _read(self, logits, mask_id, rng, masked):
        """Proposals and restricted confidence (rows, Lb) of a call's block logits."""
        proposal = rules.propose(logits, mask_id, self.cfg.temperature, rng)
        score = rules.restrict_confidence(rules.confidence_prob(logits, proposal, self.conf_dtype), masked)
        return proposal, score

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        if len(prompts) != 1:  # per-row rules: the rows decode side by side, their calls pooled
            return pooled_generate(self.generate, backbone, prompts, rng)
        cfg, spec = self.cfg, backbone.spec
        d = cfg.drafts_for(spec.family)
        first_only = rules.dream_first_token_after_refresh(None, spec.family, cfg.cache != "none")
        x, _, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        S, Lb, dev = x.shape[1], cfg.block_length, x.device
        cache = None if cfg.cache == "none" else backbone.new_cache(1, S, lanes=d)
        eos = torch.tensor(spec.eos_ids, device=dev)
        trace = []

        def call(rows: torch.Tensor, lo: int, hi: int, refresh: bool) -> torch.Tensor:
            # block logits (rows, Lb, V).  Dream with the first-token rule asks for the block by index, as
            # fast_dllm: the cached call then processes the reference's columns (row lo is not used)
            want = torch.arange(lo, hi, device=dev) if first_only else (lo, hi)
            if cache is None:
                cols = torch.arange(lo, hi, device=dev).expand(rows.shape[0], -1)
                return backbone.forward(rows, positions=positions.expand(rows.shape[0], -1), predict=cols)
            span = (0, S) if refresh else (lo, S) if cfg.cache == "prefix" else (lo, hi)
            # refresh: every slot rewritten in every lane; a draft call is read-only, each lane row
            # attending the shared cache plus its own fresh K/V (the reference's tree attention)
            return backbone.step(rows, cache, span, predict=want, write=refresh)

        for lo in range(P, P + cfg.gen_length, Lb):
            hi = lo + Lb
            blk = x[0, lo:hi]
            proposal, score = self._read(call(x, lo, hi, True), spec.mask_id, rng, (blk == spec.mask_id)[None])
            proposal, score = proposal[0], score[0]
            masks = Lb
            if first_only:  # Dream with a cache: the refresh commits the block's first token (§0.2)
                blk = blk.clone()
                blk[0] = proposal[0]
                score = torch.where(blk == spec.mask_id, score, _NEG_INF)
                masks, fresh = Lb - 1, False
                trace.append({"block": lo - P, "call": "refresh", "rows": 1, "committed": 1})
            else:
                fresh = True
                trace.append({"block": lo - P, "call": "refresh", "rows": 1, "committed": 0})
            step0 = None  # (commits, masks left) of the next reference step, once known
            while masks:
                if fresh:
                    if step0 is None:
                        commit0 = self._step(score[None])[0]
                        # FreeDave: one commit (host-known); FreeDave++: the threshold step's count (read)
                        c0 = 1 if self.threshold is None else read_host(commit0.sum())[0][0]
                        step0 = (commit0, masks - c0)
                    commit0, left0 = step0
                    if left0 == 0:  # the next reference step completes the block: no call needed
                        blk = torch.where(commit0, proposal, blk)
                        trace[-1]["then"] = masks  # committed from this call's logits, with no call
                        break
                    n, first = min(d, left0 + 1), masks - left0
                else:
                    n, first = min(d, masks), 0
                drafts = build_drafts(blk, proposal, score, n, first)
                rows = x.expand(n, -1).clone()
                rows[:, lo:hi] = drafts
                masked = drafts == spec.mask_id
                props, scores = self._read(call(rows, lo, hi, False), spec.mask_id, rng, masked)
                commits = self._step(scores)
                targets = torch.where(commits, props, drafts)
                agree, left_d, left_t = read_host(agreement(drafts, targets, spec.mask_id, self.match_rule),
                                                  masked.sum(-1), (targets == spec.mask_id).sum(-1))
                best = accepted_chain([agree[i * n:(i + 1) * n] for i in range(n)])
                trace.append({"block": lo - P, "call": "verify", "rows": n, "committed": masks - left_d[best]})
                blk, proposal, score = drafts[best], props[best], scores[best]
                step0 = (commits[best], left_t[best])
                masks, fresh = left_d[best], True
            x[0, lo:hi] = blk
            if cfg.early_exit and hi < S and bool(torch.isin(blk, eos).all()):
                x[0, hi:] = spec.eos_id  # the whole block is EOS-like: the answer is final (§6.2)
                break

        return finish(x, P, spec, trace=trace, info={"draft_steps": d})


@register("freedave_pp")
class FreeDavePPSampler(FreeDaveSampler):
    """FreeDave++: ``block_decode_with_full_attention_FreeDave`` with a ``confidence_threshold``."""

    Config = FreeDavePPConfig
    conf_dtype = torch.float64  # fast_dllm's confidence (the sampler it is checked against)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold, self.match_rule = cfg.threshold, cfg.match_rule
