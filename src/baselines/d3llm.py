"""Inference-only d3LLM: entropy-threshold multi-block decoding with a delayed, refreshed KV cache.

Sources: Qian et al., "d3LLM", arXiv 2601.07568; hao-ai-lab/d3LLM ``d3llm_llada_generate_util.py``
and ``eval_scripts`` [C], loop details read in a third-party copy [M]
(docs/research/asynclane.md §3.10, §5).  Several blocks in flight (the next joins when the last
is ``block_add_threshold`` decoded); each step commits the lowest-entropy masked position plus
every one with entropy <= ``threshold``, with forced progress in the first fully activated block;
cached steps start at the row's settled boundary (blocks complete for ``cache_delay`` forwards)
and a full refresh comes every ``refresh_every`` steps; ``early_stop`` fills after the first EOS.
This is the decoder on the base weights (a baseline of the AsyncLane paper); the distilled
weights load like the base model.  Algorithm, options and every deviation with its source:
docs/samplers/d3llm.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from asynclane import rules
from asynclane.sampler import (BaseSampler, Generation, SamplerConfig, check_block_length, finish,
                              init_buffer, padding_mask, read_host, register)


# --------------------------------------------------------------------------- rules only d3llm uses

_NEG_INF = float("-inf")


def commit_best_in(commit: torch.Tensor, score: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: ``commit`` plus, in each row whose ``region`` got no commit, the region's best position.

    d3LLM forced progress [C] (asynclane.md §5): after the entropy-threshold rule, the first
    fully activated block that still holds masks must decode at least one token; if none of its
    positions was selected, its lowest-entropy (highest-score) masked position is added.  Only
    eligible (finite ``score``) positions of ``region`` (B, L) count; a row whose region has none
    is left as it is.  Ties break toward the lower index.
    """
    eligible = region & (score > _NEG_INF)
    need = eligible.any(-1) & ~(commit & region).any(-1)  # (B,)
    best = torch.where(eligible, score, torch.full_like(score, _NEG_INF)).argmax(-1)  # first max: lowest index
    add = torch.zeros_like(commit)
    add[torch.arange(score.shape[0], device=score.device), best] = True
    return commit | (add & need[:, None])


def fill_after_first_eos(tokens: torch.Tensor, eos_ids, fill_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens', hit): every position after each row's first EOS-like token set to ``fill_id``.

    d3LLM ``handle_early_stop`` [C] (asynclane.md §3.9): as soon as any EOS is *decoded*, the
    rest of the answer becomes EOS (not mask) and takes no further part in decoding, even
    while masks remain before it.  ``tokens``: (B, L) generated region, returned as a new
    tensor; ``hit``: (B,) bool, rows holding an EOS-like token.  The reference tests one id;
    here every id of ``eos_ids`` counts.
    """
    eos = torch.isin(tokens, torch.as_tensor(list(eos_ids), device=tokens.device))
    after = (eos.long().cumsum(-1) - eos.long()) > 0  # strictly after the first EOS-like token
    return tokens.masked_fill(after, fill_id), eos.any(-1)


CACHES = ("none", "delayed")


@dataclass
class D3llmConfig(SamplerConfig):
    """Inference-only d3LLM settings; see the module docstring for sources."""

    block_length: int = 32
    threshold: float = 0.5  # entropy bound (nats)
    block_add_threshold: float = 0.1
    decoded_token_threshold: float = 0.95
    cache: Union[str, bool] = "delayed"
    cache_delay: int = 1
    refresh_every: Optional[int] = 4
    early_stop: bool = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.cache, bool):
            self.cache = "delayed" if self.cache else "none"
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r} is not one of {', '.join(CACHES)} (or true / false)")
        check_block_length(self.block_length, self.gen_length)
        if not self.threshold >= 0:
            raise ValueError(f"threshold={self.threshold} must be an entropy >= 0 in nats (0.4-0.5 in the "
                             "d3LLM scripts; 0 commits one token per step)")
        for key in ("block_add_threshold", "decoded_token_threshold"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be a decoded fraction >= 0 (values > 1 "
                                 "are never reached)")
        if isinstance(self.cache_delay, bool) or self.cache_delay < 1:
            raise ValueError(f"cache_delay={self.cache_delay} must be an integer >= 1 (forwards a completed "
                             "block waits before its K/V freeze)")
        if self.refresh_every is not None and (isinstance(self.refresh_every, bool) or self.refresh_every < 1):
            raise ValueError(f"refresh_every={self.refresh_every} must be a positive integer, or null to "
                             "refresh only at the first step")


@register("d3llm")
class D3llmSampler(BaseSampler):
    """d3LLM ``generate_multi_block`` / ``generate_multi_block_kv_cache`` on any LLaDA/Dream backbone."""

    Config = D3llmConfig

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        x, key_mask, positions, P = init_buffer(backbone, prompts, cfg.gen_length)
        (B, T), Lb, G, dev = x.shape, cfg.block_length, cfg.gen_length, x.device
        nb = G // Lb
        pad = padding_mask(key_mask, prompts)
        cache = None if cfg.cache == "none" else backbone.new_cache(B, T)
        seam = B == 1  # one row: the static decode step (slot == column); rows with their own
        # boundaries: the general call, whose key mask hides each row's cached columns
        # the general call predicts by index, so a Dream row for p needs p - 1 inside its own slice
        lead = 1 if spec.family == "dream" and not seam else 0
        col = torch.arange(T, device=dev)
        block_of = torch.arange(G, device=dev) // Lb  # (G,) block index of each answer position
        blocks = torch.arange(nb, device=dev)
        added = torch.ones(B, dtype=torch.long, device=dev)  # blocks in flight or done, per row
        done_at = torch.full((B, nb), -1, dtype=torch.long, device=dev)  # step that first saw block k done
        stalled = torch.zeros((), dtype=torch.bool, device=dev)
        step = 0

        while True:
            masked = x[:, P:] == spec.mask_id
            live = masked.any(-1)
            left = masked.view(B, nb, Lb).sum(-1)  # (B, nb) masks left per block
            frac = 1 - left.double() / Lb
            done_at = torch.where((left == 0) & (done_at < 0), step, done_at)
            last = (added - 1)[:, None]
            grow = (frac.gather(1, last) >= cfg.block_add_threshold) | (left.gather(1, last) == 0)
            added = added + ((added < nb) & grow[:, 0]).long()  # 2a: at most one block joins
            prev = torch.cat((torch.ones_like(frac[:, :1]), frac[:, :-1]), dim=1)
            full = (blocks < added[:, None]) & (prev >= cfg.decoded_token_threshold)  # 2b
            first = torch.where(live, self._settled_end(done_at, step, P) - lead, T)  # cached steps start here
            # the iteration's one host transfer: anything left, the widest row, each row's boundary
            (left_any,), (stuck,), (widest,), firsts = read_host(live.any(), stalled, (added * live).max(), first)
            if stuck:  # e.g. NaN logits: fail instead of looping forever
                raise RuntimeError("d3llm: a step committed nothing in an unfinished row (non-finite logits?)")
            if not left_any:
                break
            width = widest * Lb  # answer columns [P, P + width) hold every candidate
            every = cfg.refresh_every
            if cache is None or rules.refresh_due(step, every):  # full / refresh
                lo = P
                want = col[P:P + width]
                if cache is None:
                    logits = backbone.forward(x, positions=positions, key_mask=pad, predict=want.expand(B, -1))
                elif seam:
                    logits = backbone.step(x, cache, (0, T), predict=want)
                else:
                    logits = backbone.forward(x, positions=positions, key_mask=key_mask, cache=cache, write=True,
                                              predict=want.expand(B, -1))
            else:  # from each row's settled boundary to the end; the rest from the cache
                start = max(0, min(firsts))
                lo = max(P, start)
                if seam:
                    logits = backbone.step(x, cache, (start, T), predict=(lo, P + width))
                else:
                    own = key_mask[:, start:] & (col[start:] >= first[:, None])  # a row's cached columns are hidden
                    logits = backbone.forward(x[:, start:], positions=positions[:, start:], key_mask=own,
                                              cache=cache, write=True,
                                              predict=(col[lo:P + width] - start).expand(B, -1))

            gen = x[:, P:]
            proposal, certainty = gen.clone(), torch.full((B, G), float("-inf"), dtype=torch.float64, device=dev)
            proposal[:, lo - P:width] = rules.propose(logits, spec.mask_id, cfg.temperature, rng)
            certainty[:, lo - P:width] = rules.confidence_neg_entropy(logits, torch.float64)  # -H
            score = rules.restrict_confidence(certainty, masked & (block_of < added[:, None]))
            commit = rules.commit_threshold(score, -cfg.threshold)
            needy = full & (left > 0)  # forced progress: the first fully activated block with masks
            region = (block_of == needy.long().argmax(-1)[:, None]) & needy.any(-1)[:, None]
            commit = commit_best_in(commit, score, region)
            stalled = (live & ~commit.any(-1)).any()  # checked at the next transfer
            gen = torch.where(commit, proposal, gen)
            if cfg.early_stop:  # the blocks after the EOS now hold no mask: none is decoded or waited for
                gen, _ = fill_after_first_eos(gen, spec.eos_ids, spec.eos_id)
            x[:, P:] = gen
            step += 1

        return finish(x, P, spec)

    def _settled_end(self, done_at: torch.Tensor, step: int, P: int) -> torch.Tensor:
        """(B,) first buffer column past the settled prefix (0 while the prompt itself is not settled).

        Settled: done for at least ``cache_delay`` forwards (the prompt is done from step 0), and
        every block before it settled too.
        """
        delay, Lb = self.cfg.cache_delay, self.cfg.block_length
        if step < delay:
            return torch.zeros(done_at.shape[0], dtype=torch.long, device=done_at.device)
        settled = (done_at >= 0) & (step - done_at >= delay)
        return P + settled.long().cumprod(-1).sum(-1) * Lb
