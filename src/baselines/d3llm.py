"""Inference-only d3LLM: entropy-threshold multi-block decoding with a delayed, refreshed KV cache.

Paper: Qian et al., "d3LLM: Ultra-Fast Diffusion LLM using Pseudo-Trajectory Distillation",
arXiv 2601.07568 (README [C]: "entropy-based multi-block decoding", "KV-cache with periodic
refresh", "early stopping on EOS").
Reference code: hao-ai-lab/d3LLM ``d3llm/d3llm_LLaDA/d3llm_llada_generate_util.py``
(``generate_multi_block``, ``generate_multi_block_kv_cache``, ``handle_early_stop``) and
``eval_scripts/*.sh`` [C] (research/asynclane.md source 9, §3.10, §5).  Loop details below were
read in a third-party copy of that file [M]; the Dream variant was not read [U].

"Inference-only d3LLM" = this decoder on the *base* LLaDA / Dream weights: a baseline of the
AsyncLane paper (asynclane.md §5).  d3LLM's distilled weights, for users who have them, are
meant to load like the base model (``model=llada model.path=...`` / ``model=dream
model.path=...``; not tried here): ``d3LLM/d3LLM_LLaDA``, ``d3LLM/d3LLM_Dream``,
``d3LLM/d3LLM_Dream_Coder`` [C, README].

Algorithm (per row; rows share forwards, a finished row waits without committing):

1. Left-pad the prompts, append ``gen_length`` masks, cut the answer into blocks of
   ``block_length``.  Block 1 is in flight from the start.
2. At the start of each step, on the masks left after the previous step:
   a. *Add*: if the last block in flight has decoded fraction >= ``block_add_threshold``, or no
      mask left, the next block joins (at most one per step).  ``block_add_threshold >= 1``:
      a block joins only when its predecessor is done, i.e. one block in flight (dParallel).
   b. *Fully activated*: a block in flight whose predecessor's decoded fraction is >=
      ``decoded_token_threshold`` (block 1's predecessor, the prompt, counts as decoded; see
      the finding below: only > 1 changes anything).
3. One forward (step 5 says which).  Proposals: Gumbel-max (argmax at T = 0); certainty: the
   float64 predictive entropy ``H`` of the un-noised softmax.
4. Commit, among the masked positions of every block in flight: the lowest-``H`` one, plus
   every one with ``H <= threshold``; then, if the first fully activated block that still has
   masks got nothing, its lowest-``H`` position too (forced progress).
5. Cache (``cache="delayed"``): step 0 and every ``refresh_every``-th step are *refreshes*, one
   full forward that rewrites every position's K/V, whose logits are this step's logits
   (refresh-logit reuse: a refresh costs no extra forward).  Other steps forward the buffer
   from the row's *settled boundary* to its end, writing those positions' fresh K/V and reading
   the settled prefix from the cache.  The settled prefix = the prompt and the leading run of
   blocks that have been complete for ``cache_delay`` forwards; so a block's cached K/V come
   from a forward that already saw it fully decoded (the "delay" lets them stabilise), and
   stay frozen until the next refresh.  ``cache="none"``: every step is a full forward.
6. ``early_stop``: as soon as an EOS-like token is decoded, every later answer position becomes
   EOS (the pad-style end token), masks included, so no later block is decoded.  Decoding
   continues until no mask is left (those before the EOS).

NFE = number of forwards; no fixed step count.

Hyperparameters (defaults from d3LLM's LLaDA eval scripts, asynclane.md §5 [C]):

=======================  =========  ===============================================================
key                      default    meaning / source
=======================  =========  ===============================================================
gen_length               128 (top)  answer budget; blocks cover it exactly
block_length             32         block size; must divide gen_length [C: 32, some tasks 16-64]
threshold                0.5        entropy bound in nats [C: 0.4-0.5]
block_add_threshold      0.1        decoded fraction of the last block that admits the next [C:
                                    0.1, sometimes 1.0]; >= 1: one block in flight
decoded_token_threshold  0.95       predecessor's decoded fraction that fully activates a block [C];
                                    inert while <= 1, > 1: no forced progress (see below)
cache                    delayed    none | delayed (true / false accepted) [C: the kv-cache variant]
cache_delay              1          forwards a completed block waits before its K/V freeze (>= 1)
                                    [C: ``cache_delay_iter`` 1-2]
refresh_every            4          full refresh every k steps; null: only the first step [C:
                                    ``refresh_interval`` 3 / 4 / 10000]; 1: exact (no cache reuse)
early_stop               true       step 6 [C: ``early_stop=True`` in every script]
temperature              0.0        Gumbel-max temperature; the scripts use 0 [C]
=======================  =========  ===============================================================

Reconstruction choices and deviations from reference:

* Names: the reference flags a block ``is_complete`` when the previous block passes
  ``decoded_token_threshold``; it means "fully activated" (D2F's term, arXiv 2508.09192), and
  its only effect is the forced progress of step 4.  A block counts as *done* (and may be
  cached) when it holds no mask.
* Finding, reproduced as is: in this loop ``decoded_token_threshold`` has no effect while it is
  <= 1.  The first block that still has masks always has a done predecessor (decoded fraction
  1), so it is always fully activated and always the forced-progress target; later blocks'
  activation never matters.  Values > 1 switch the forced progress off (progress then comes
  from the lowest-entropy rule alone).  The reference transcription in the tests agrees for
  0, 0.125, 0.25, 0.5, 0.95 and 1.5.
* Cache mechanics (ours, same ingredients) [M]: the reference runs *full* forwards while any
  completed block is "stabilising" (younger than ``cache_delay_iter``), then one forward from
  the old cache end that appends the newly cached blocks; its refresh truncates the rebuilt
  cache at the latest stabilising block without updating its own cache-length bookkeeping.
  Here a stabilising block simply lies past the boundary, so it is recomputed (and its slots
  rewritten) by every step until it settles; no completion ever forces a full forward.  Same
  NFE rule (one forward per step), fewer token-forwards.
* Refresh schedule: steps ``0, k, 2k, ...`` (the first forward always fills the cache); the
  reference refreshes when ``nfe % refresh_interval == 0`` with ``nfe`` counted from 1, and
  runs plain full forwards until the prompt is cached.
* Dream family: a cached step also recomputes the last settled position (its row predicts the
  first unsettled one: Dream's row for ``p`` comes from ``p - 1``, backbone.py).  Its slot is
  rewritten, so that one position is never frozen.
* Early stop tests every EOS-like id of the backbone (EOS and EoT / im_end) and fills with the
  pad-style EOS; the reference tests one ``eos_token_id`` [M].
* The forced-progress token is the step's proposal (the Gumbel sample at T > 0); the
  reference re-takes the un-noised argmax there [M].  Identical at T = 0.
* The mask id is never proposed (as fast_dllm / dparallel); entropies use ``xlogy`` instead of
  ``log(p + 1e-12)``; ties break toward the lower position.  Instead of the ``nfe > 10000``
  guard, a step that commits nothing in an unfinished row (possible only with non-finite
  logits: the lowest-entropy rule always commits one) raises an error.
* Batch > 1 works: block state, cache boundary and early stop are per row.  A cached step's
  query starts at the lowest boundary among unfinished rows, and each row masks out (as keys)
  the columns it has cached, reading those from the cache instead, so a batch equals its rows
  run singly (the general ``Backbone.forward`` with a key mask; one row uses the static
  ``Backbone.step``).  The reference is batch 1.
* One host transfer per step: whether masks are left, the widest row and every row's settled
  boundary come back together (a row that committed nothing is reported at the next transfer).
* ``cache_delay`` is its own key (the reference's ``cache_delay_iter``), ``refresh_every`` is
  ``refresh_interval``; ``lazy_cache_refresh_num`` and the scripts' ``skip_threshold`` are not
  used by this loop and not exposed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from asynclane import rules
from asynclane.sampler import Generation, SamplerConfig, check_block_length, finish, init_buffer, padding_mask, register

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
class D3llmSampler:
    """d3LLM ``generate_multi_block`` / ``generate_multi_block_kv_cache`` on any LLaDA/Dream backbone."""

    Config = D3llmConfig
    can_batch = True

    def __init__(self, cfg: D3llmConfig):
        self.cfg = cfg

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
        lead = 1 if spec.family == "dream" else 0  # Dream's row for p needs p-1 in the same call
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
            host = torch.cat((live.any().view(1), stalled.view(1), (added * live).max().view(1), first)).tolist()
            if host[1]:  # e.g. NaN logits: fail instead of looping forever
                raise RuntimeError("d3llm: a step committed nothing in an unfinished row (non-finite logits?)")
            if not host[0]:
                break
            width = host[2] * Lb  # answer columns [P, P + width) hold every candidate
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
            else:  # from each row's settled boundary (minus Dream's lead) to the end; the rest from the cache
                start = max(0, min(host[3:]))
                lo = max(P, start)
                if seam:
                    logits = backbone.step(x, cache, (start, T), predict=col[lo:P + width])
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
            commit = rules.commit_best_in(commit, score, region)
            stalled = (live & ~commit.any(-1)).any()  # checked at the next transfer
            gen = torch.where(commit, proposal, gen)
            if cfg.early_stop:  # the blocks after the EOS now hold no mask: none is decoded or waited for
                gen, _ = rules.fill_after_first_eos(gen, spec.eos_ids, spec.eos_id)
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
