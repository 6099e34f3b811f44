"""AsyncLane: decoupling refinement from advancement with a tree of generate and refine lanes.

Paper: Ren, Lou, Liu et al., "AsyncLane: Decoupling Refinement from Advancement in Diffusion
Language Model Decoding", arXiv 2606.08411v1 (only title, authors and abstract were readable
[P]; research/asynclane.md).  No official code was found [U].  **Known from the paper [P]:**
generate and refine lanes; a fork when a block shows a delimiter boundary / stable prefix, after
which the prefix stays editable while a continuation lane advances; a lane tree giving
dependencies and stitching order; every step runs the active lanes; four cost mechanisms by name
(shared-prefix lane batching, lookahead draft reuse, cascading termination, compact cache
refresh with refresh-logit reuse); training-free drop-in for block samplers.  **Everything
else below is our reconstruction (ours)**, following research/asynclane.md §3 and §7.

Two decoding paths share the lane tree, the rules and the four switches.  The default is the
*speculative* path (``speculate=True`` with ``draft_reuse=True``, below); steps 1-9 are the
one-row path it grew from (``speculate=False``, or ``draft_reuse=False``).

Algorithm, one-row path (batch 1; one sequence, one lane tree, :mod:`asynclane.lanes`):

1. Buffer = prompt + ``gen_length`` masks.  The root GEN lane owns the first block
   ``[P, P + block_length)``.
2. Each iteration assembles ONE model call for all ACTIVE lanes (``lane_batching``): the lanes
   of a sequence own disjoint spans of the same buffer, so their query positions go into one
   row with explicit positions (no per-lane rows, no copies of the prompt/settled-prefix cache:
   every lane reads the same cache slots).  Which positions, by ``cache``:
   ``none``: the whole buffer; ``prefix``: from the leftmost working block's start to the end
   of the buffer, settled prefix read from the cache; ``dual``: the lanes' working positions only
   (+ lookahead), everything else read from the cache and the call's K/V written in place.
   Dream family: a lane whose working block ``[lo, e)`` starts with a mask also carries
   ``lo - 1`` (that row comes from ``lo - 1``, backbone.py).
3. Refresh.  ``compact_refresh`` off (Fast-dLLM's rule): a full-buffer forward that rewrites
   every slot, at the first step of each GEN block, every ``refresh_every`` GEN steps, and
   whenever the cheap call would read a stale slot; its logits are the step's logits.
   ``compact_refresh`` on: stale slots (token changed since written: a finished REF span, the
   EOS fill) are recomputed inside the same call, ``write=True``, and nothing else is
   (``refresh_every`` still forces a full refresh).  Either way a refresh costs no extra call.
   Which slots: with a prefix cache, everything from the first stale slot on (the call runs to
   the buffer's end anyway); with a dual cache, the stale slots plus every slot from the first
   stale one through the last working position, since their K/V were computed with the old
   token in context (stale slots alone: arith, L=256, 50 problems, 96% -> 76% exact).
   With a prefix cache, once a cascade has fixed the EOS tail ``[end, T)`` and one call has
   written it, later calls stop at ``end`` and read the tail from the cache (compute, not NFE;
   the tail's K/V were computed with the answer as it stood then, as a dual cache's are).
4. GEN lane step (Fast-dLLM rule): in its working block commit every masked position whose
   proposal confidence >= ``threshold``.  Progress guarantee: only the leftmost lane that still
   has masks commits at least its best position (with one lane this is Fast-dLLM's "at least
   the best"); lanes right of it commit only what passes their threshold.  Everything to the
   right is conditioned on that lane, and a per-lane guarantee forced a fresh continuation
   holding one uncertain token to guess it while its prefix was still being refined (arith,
   L=64, 50 problems: 84% exact, against 98% with this rule, NFE 3.3 -> 4.4).  Dream + cache + compact off: the
   block's first step commits only its first token (fast_dllm step 6).
   REF lane step: the same with ``refine_threshold`` over its span; after ``refine_budget``
   steps it fills every remaining mask with its argmax.  A REF lane is DONE when it has no mask.
5. Cascade (``cascade``): the leftmost committed EOS-like id ``q`` (any of ``spec.eos_ids``,
   confidence >= ``eos_threshold``) kills every lane right of ``q``, truncates the lane holding
   it, fills ``(q, end)`` with EOS and ends the answer there.
6. Fork (:func:`asynclane.rules.fork_point`): an ACTIVE GEN lane whose working block holds a
   committed delimiter ``p`` (decoded text contains a newline; committed with confidence >=
   ``delimiter_threshold``), with
   ``1 <= masks in [lo, p] <= max_residual_fraction * (p + 1 - lo)``, ``p + 1 - lo >=
   min_prefix``, room for one more lane (``max_lanes``) and budget left after ``p``, becomes
   FORKED: REF ``[s, p + 1)`` keeps refining, GEN ``[p + 1, p + 1 + block_length)`` decodes from
   the next call.  Rightmost qualifying ``p`` wins; at most one fork per iteration.
7. Advance: a GEN lane with a complete block (and no fork) moves to the next block; DONE at the
   end of the answer.
8. Draft reuse (``draft_reuse``): a GEN lane's call also predicts ``lookahead`` positions past
   its block (free in ``none``/``prefix``; added to a ``dual`` call).  When a GEN block opens
   (advance or fork) at the end of an iteration, its masked positions whose lookahead
   prediction from that same call has confidence >= ``draft_threshold`` are committed without a
   model call.  Guard: at the lane's next forward, a seeded token whose probability falls
   below ``threshold / 2`` is re-masked, and is not committed again in that iteration (that
   call saw the draft token at the position, not a mask, so its proposal there is no
   prediction); the next call decodes it.
9. Stop when no lane is ACTIVE.  Output = the buffer; ``lanes.stitch`` reads the same answer
   from the tree (leaf spans in order, cut at the first EOS).  ``Generation.trace``: one dict
   per iteration; ``Generation.info["lanes"]``: the final tree.

NFE: one call per iteration with ``lane_batching``; one per active lane without it.

Speculative lanes (``speculate``, the default; ours).  Why: on the embedded model the one-row
path's refine lanes settle one or two dependent results per call (arith: each line's result
needs the line above), and its draft guard cannot tell a wrong draft from a right one: a model
trained on masked positions only copies an unmasked input (a wrong result token placed in the
buffer gets probability 0.9997 at its own position).  Checking a draft needs the draft *masked*
in the row that checks it, with its left context filled in.  So lanes become rows:

S1. Each iteration is ONE call with one row per ACTIVE lane, in position order (mechanism 1:
    the rows share the cached prompt/settled prefix by broadcast, no copies).  Lane i's row is
    the buffer with the *drafts* (the previous view's proposals at masked positions, mechanism
    2: lookahead predictions reused as context at no extra call) of the lanes left of it filled
    in; its own masks and everything to its right stay as they are.
S2. Verify, left to right: a REF lane every mask of which holds a draft that its own row
    predicts with probability >= ``refine_threshold`` takes its drafts (committed; the lane is
    DONE).  The first lane that does not, or the first GEN lane, is the *view*.
S3. The view's row is the buffer with only *verified* drafts filled in, so its proposals are
    ordinary predictions: the view lane and every lane right of it take one step of the
    one-row rules on it (``threshold`` / ``refine_threshold`` / ``refine_budget``; Dream's
    first-token rule).  Progress: when nothing was verified and nothing passed a threshold,
    the leftmost lane with masks commits its best position.  Rows right of the view are
    discarded (they were conditioned on a draft that failed).
S4. New drafts: the view's proposals at every mask it predicted (working blocks + lookahead).
S5. Cascade (mechanism 3) as step 5.  Fork at *every* committed delimiter of a GEN block whose
    line (since the previous fork) still holds a mask and has >= ``min_prefix`` tokens
    (:func:`asynclane.rules.line_forks`), while ``max_lanes`` allows: each such line becomes its
    own REF lane, so a line's drafts are verified on their own, given the drafts of the lines
    above; no residual-fraction test (the masks are what the REF lane verifies).  Advance as
    step 7; no seeding (a new block's lookahead predictions are already its drafts).
S6. Cache (mechanism 4): every row covers the same contiguous range, from the first predicted
    position (or the first stale slot below it: compact refresh; or 0: a full refresh, with
    ``compact_refresh`` off or ``refresh_every``) to the buffer's end (the answer's end once
    the EOS tail is written).  Row 0 (the leftmost lane's) is the buffer itself: its K/V are
    written into the cache (``write_row``) while the other rows only read it.  ``dual`` behaves
    as ``prefix`` here (rows differ to the right, so their right context cannot come from one
    cache).  The call's logits are the step's logits (refresh-logit reuse).

Measured (embedded model, first 50 held-out problems, L=256, ``python scripts/benchmark.py``):
arith 4.4 -> 2.6 calls per answer at 96% -> 98% exact; listops 2.0 -> 1.8 at 96%.  Cost: the
rows multiply the tokens per call (arith L=256: 18 -> 38 token-forwards per generated token).
With ``max_lanes=1`` nothing forks, one row is left, and the path is the one-row path without
seeding (test: same tokens and NFE with ``cache=none``).  ``lane_batching=False``: one call per
row, same outputs.

Hyperparameters (all [U] for the paper; defaults ours, asynclane.md §4):

=========================  =======  ===============================================================
key                        default  meaning; justification
=========================  =======  ===============================================================
gen_length                 128      answer budget (top-level override)
block_length               32       GEN block; Fast-dLLM / AdaBlock convention [C]
threshold                  0.9      GEN commit confidence (fast_dllm's); Fast-dLLM default [P, C]
refine_threshold           0.9      REF commit confidence, and the probability a draft needs to be
                                    verified (S2); same rule as GEN until evidence differs
delimiter_threshold        0.3      commit confidence a delimiter needs; AdaBlock's LLaDA value [C]
draft_threshold            0.9      (one-row path) lookahead confidence to seed a token; = threshold, so a seed is
                                    as sure as a normal commit
max_residual_fraction      0.25     (one-row path) "mostly settled": at most 1/4 of the prefix still masked
min_prefix                 4        no fork for tiny prefixes (limits lane explosion)
max_lanes                  4        active-lane cap (speculative: rows per call); 1 disables forking
                                    (= fast_dllm); 8 or 16 measured the same calls on the tiny model
refine_budget              8        REF steps before argmax-fill: bounds a stalled prefix
lookahead                  32       predicted positions past a GEN block (one block of drafts)
refresh_every              null     null: refresh at GEN block starts (fast_dllm); k: every k steps
eos_threshold              0.0      any committed EOS cascades (d3LLM's early stop [C])
cache                      prefix   none | prefix | dual, as fast_dllm (paper default prefix)
lane_batching              true     mechanism 1 (off: one call per lane, same inputs)
draft_reuse                true     mechanism 2
cascade                    true     mechanism 3 (off: decode the whole budget, as fast_dllm)
compact_refresh            true     mechanism 4 (off: fast_dllm's full refreshes)
speculate                  true     lanes speculate on the drafts of the lanes left of them (S1-S6;
                                    needs draft_reuse); false: the one-row path
commit_first_after_refresh null     null = auto: Dream + cache + compact off (fast_dllm step 6)
delimiter_ids              null     explicit delimiter ids; null: derived from backbone.tokenizer
                                    (no tokenizer, no ids: forks never happen)
temperature                0.0      Gumbel-max temperature
=========================  =======  ===============================================================

Deviations / reconstruction choices (tags as research/asynclane.md):

* Lane batching packs all lanes of the sequence into one query row (asynclane.md §3.5
  "packed" layout, without a block-sparse mask): lanes attend to each other's current tokens
  (a REF lane sees the continuation's committed tokens and masks: ``ref_sees_right=draft``).
  Per-lane rows would need a per-row attention mask the backbone does not take (ours).
* ``lane_batching=False`` is the ablation's cost model: each lane gets its own call with the
  same inputs, so outputs are identical and only calls / token-forwards grow (ours).
* Drafts live for one iteration (``draft_max_age = 1``); no stable-prefix fallback fork; no
  re-masking of committed prefix tokens (``ref_remask`` off) (ours, §3.4, §3.7, §3.8).
* The EOS-filled tail stays in the model's context (LLaDA/Dream pad answers with EOS) (ours).
* Batch 1 only (``can_batch = False``): forks are per sequence.  Batch > 1 needs one tree per
  row and ragged per-row query sets (padding + key masks, per-row cache boundaries).
* The mask id is never proposed; ties break toward the lower position (as fast_dllm).
* Degenerate case (tests/asynclane/test_asynclane.py): ``max_lanes=1`` with ``draft_reuse``,
  ``cascade`` and ``compact_refresh`` off reproduces fast_dllm (same threshold, block length,
  cache mode, ``refresh_every``) token for token, with the same NFE and token-forwards, on both
  families.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.lanes import DONE, GEN, REF, LaneTree, stitch
from asynclane.sampler import Generation, SamplerConfig, left_pad, register

CACHES = ("none", "prefix", "dual")


@dataclass
class AsyncLaneConfig(SamplerConfig):
    """AsyncLane settings; see the module docstring for meanings and sources."""

    block_length: int = 32
    threshold: float = 0.9
    refine_threshold: float = 0.9
    delimiter_threshold: float = 0.3
    draft_threshold: float = 0.9
    max_residual_fraction: float = 0.25
    min_prefix: int = 4
    max_lanes: int = 4
    refine_budget: int = 8
    lookahead: int = 32
    refresh_every: Optional[int] = None
    eos_threshold: float = 0.0
    cache: str = "prefix"
    lane_batching: bool = True
    draft_reuse: bool = True
    cascade: bool = True
    compact_refresh: bool = True
    speculate: bool = True
    commit_first_after_refresh: Optional[bool] = None
    delimiter_ids: Optional[Sequence[int]] = None

    def __post_init__(self):
        super().__post_init__()
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r} is not one of {', '.join(CACHES)}")
        if self.block_length <= 0 or self.gen_length % self.block_length:
            valid = [d for d in range(1, self.gen_length + 1) if self.gen_length % d == 0]
            raise ValueError(f"block_length={self.block_length} must divide gen_length={self.gen_length}; "
                             f"valid block lengths: {valid}")
        for key in ("threshold", "refine_threshold", "delimiter_threshold", "draft_threshold", "eos_threshold"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        if not 0 <= self.max_residual_fraction <= 1:
            raise ValueError(f"max_residual_fraction={self.max_residual_fraction} must lie in [0, 1]")
        for key in ("max_lanes", "refine_budget", "min_prefix"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.lookahead < 0:
            raise ValueError(f"lookahead={self.lookahead} must be >= 0")
        if self.refresh_every is not None and (isinstance(self.refresh_every, bool) or self.refresh_every < 1):
            raise ValueError(f"refresh_every={self.refresh_every} must be a positive integer or null")

    def first_after_refresh(self, family: str) -> bool:
        if self.commit_first_after_refresh is None:
            return family == "dream" and self.cache != "none" and not self.compact_refresh
        return bool(self.commit_first_after_refresh)


def delimiter_set(backbone, explicit: Optional[Sequence[int]]) -> frozenset:
    """Delimiter ids: ``explicit`` when given, else every id whose decoded text has a newline."""
    if explicit is not None:
        return frozenset(int(t) for t in explicit)
    tok = getattr(backbone, "tokenizer", None)
    if tok is None:
        return frozenset()
    special = set(backbone.spec.eos_ids) | {backbone.spec.mask_id, backbone.spec.pad_id}
    return frozenset(i for i in range(backbone.spec.vocab_size)
                     if i not in special and "\n" in tok.decode([i]))


@register("asynclane")
class AsyncLaneSampler:
    """Lane-tree decoding (batch 1); ``max_lanes=1`` and mechanisms 2-4 off is fast_dllm."""

    Config = AsyncLaneConfig
    can_batch = False

    def __init__(self, cfg: AsyncLaneConfig):
        self.cfg = cfg
        self._delims = {}

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        cfg, spec = self.cfg, backbone.spec
        if len(prompts) != 1:
            raise ValueError(f"asynclane decodes one prompt per call (can_batch = False), got {len(prompts)}")
        key = id(getattr(backbone, "tokenizer", None))
        if key not in self._delims:
            self._delims[key] = delimiter_set(backbone, cfg.delimiter_ids)
        delims = self._delims[key]
        if cfg.draft_reuse and cfg.speculate:
            return self._generate_speculative(backbone, prompts, rng, delims)
        dream = spec.family == "dream"
        first_only = cfg.first_after_refresh(spec.family)
        x, key_mask, P, T, cache, written, conf_at, mask_col, eos_t, tree = self._start(backbone, prompts)
        end, it = T, 0
        seeded: set = set()  # positions committed from drafts, not yet re-verified
        trace = []

        while active := tree.active():
            row = x[0]
            gen = [l for l in active if l.kind == GEN]
            want_full = cache is not None and self._wants_full(gen)
            pred = {p for l in active for p in l.working}  # rows whose logits the step reads
            if cfg.draft_reuse:
                pred |= {p for g in gen for p in range(g.e, min(g.e + cfg.lookahead, end))}
            pred = sorted(pred)
            need = set(pred)
            if dream:  # a masked first position needs its left neighbour in the call (backbone.py)
                need |= {l.lo - 1 for l in active if row[l.lo] == spec.mask_id}
            need = sorted(need)
            stale = (written != row).nonzero().flatten().tolist() if cache is not None else []
            cols, write, kind = self._plan(cache, want_full, need, stale, T, end)
            n_calls = 1 if cfg.lane_batching else len(active)
            logits = self._call(backbone, x, cols, pred, cache, write, key_mask if len(cols) == T else None, n_calls)
            if write:
                w = torch.tensor(cols, device=x.device)
                written[w] = row[w]
            at = {p: i for i, p in enumerate(pred)}
            proposal = rules.gumbel_argmax(logits.index_fill(-1, mask_col, float("-inf")), cfg.temperature, rng)[0]
            conf = rules.confidence_prob(logits, proposal[None], torch.float64)[0]

            rec = {"iteration": it, "calls": n_calls, "positions": len(cols),
                   "refresh": kind, "lanes": [], "forks": [], "kills": [], "seeded": [], "remasked": []}
            # ----- lane steps: thresholds per lane, the progress guarantee per iteration
            steps, forced = [], None  # forced: (index in steps, position) of the leftmost masked lane's best
            for l in active:
                region = list(l.working)
                if seeded:  # guard: re-verify drafts at the lane's first forward
                    for p in [p for p in region if p in seeded]:
                        seeded.discard(p)
                        prob = float(rules.confidence_prob(logits[:, at[p]:at[p] + 1], row[p].view(1, 1),
                                                           torch.float64))
                        if prob < cfg.threshold / 2:
                            row[p] = spec.mask_id
                            rec["remasked"].append(p)
                idx = torch.tensor([at[p] for p in region], device=x.device)
                masked = (row[region[0]:region[-1] + 1] == spec.mask_id)[None]
                for p in rec["remasked"]:  # its logits came from a call that saw the draft, not a mask:
                    if region[0] <= p <= region[-1]:  # it waits for the next call
                        masked[0, p - region[0]] = False
                if bool(torch.isnan(conf[idx][masked[0]]).any()):  # a Dream row without its p - 1
                    raise RuntimeError(f"lane {l.id}: NaN logits for masked positions of {region[0]}..{region[-1]} "
                                       f"(call positions {cols[0]}..{cols[-1]}, cache={cfg.cache})")
                first = l.kind == GEN and l.steps == 0 and first_only and kind == "full"
                score = rules.restrict_confidence(conf[idx][None], masked)
                commit = self._lane_commit(l, score, masked, first)
                if not first and bool(masked.any()) and forced is None:  # the leftmost lane with masks
                    forced = (len(steps), region[int(score[0].argmax())])
                steps.append(self._entry(l, [region[j] for j in commit[0].nonzero().flatten().tolist()]))
                l.steps += 1
            if forced is not None and not steps[forced[0]]["committed"]:
                # progress: the leftmost lane with masks (everything right of it is conditioned on
                # it) commits at least its best position, Fast-dLLM's "at least the best"; lanes to
                # its right commit only what passes their threshold, so a fresh continuation
                # holding one uncertain token is not forced to guess it while its prefix settles
                steps[forced[0]]["committed"].append(forced[1])
            for entry in steps:
                for p in entry["committed"]:
                    row[p] = proposal[at[p]]
                    conf_at[p] = conf[at[p]]
                rec["lanes"].append(entry)
            # ----- cascading termination
            end = self._cascade(row, conf_at, P, end, tree, eos_t, spec, rec)
            seeded = {p for p in seeded if p < end}
            # ----- retire, fork, advance
            forked = False
            for l in tree.active():
                settled = bool(row[l.lo:l.e].ne(spec.mask_id).all())
                if l.kind == REF:
                    if settled:
                        l.state = DONE
                    continue
                p = None if forked else self._fork_point(l, row, conf_at, delims, end, len(tree.active()), spec)
                if p is not None:
                    r, c = tree.fork(l, p, end, it + 1)
                    forked = True
                    rec["forks"].append({"parent": l.id, "at": p, "ref": r.id, "gen": c.id})
                    rec["seeded"] += self._seed(c, row, proposal, conf, at, seeded, conf_at, spec)
                elif settled and tree.advance(l, end):
                    rec["seeded"] += self._seed(l, row, proposal, conf, at, seeded, conf_at, spec)
            tree.check()
            trace.append(rec)
            it += 1
        return self._finish(x, P, tree, trace, eos_t, spec)

    def _start(self, backbone, prompts) -> tuple:
        """Both paths' set-up: buffer, key mask, prompt length P, length T, cache (None without one),
        ``written`` (the token whose K/V is in each slot, -1: none), ``conf_at`` (the confidence each
        token was committed with), the mask id and EOS ids as tensors, and the lane tree."""
        cfg, spec = self.cfg, backbone.spec
        x, key_mask, P = left_pad(prompts, cfg.gen_length, spec.pad_id, spec.mask_id, device=backbone.device)
        T = x.shape[1]
        cache = None if cfg.cache == "none" else backbone.new_cache(1, T)
        written = torch.full((T,), -1, dtype=torch.long, device=x.device)
        conf_at = torch.zeros(T, dtype=torch.float64, device=x.device)
        return (x, key_mask, P, T, cache, written, conf_at, torch.tensor([spec.mask_id], device=x.device),
                torch.tensor(spec.eos_ids, device=x.device), LaneTree(P, T, cfg.block_length))

    def _wants_full(self, gen) -> bool:
        """A full refresh this call (with a cache): fast_dllm's block-start rule when compact refresh is
        off, or ``refresh_every``."""
        every = self.cfg.refresh_every
        return any((g.steps == 0 and not self.cfg.compact_refresh) if every is None else g.steps % every == 0
                   for g in gen)

    def _lane_commit(self, l, score, masked, first_token_only: bool) -> torch.Tensor:
        """(1, n) positions lane ``l`` commits on ``score``: the threshold of its kind (REF: every mask
        once ``refine_budget`` is spent), or only its block's first position (``first_token_only``:
        Dream + cache + compact off at a full refresh, fast_dllm step 6)."""
        cfg = self.cfg
        if first_token_only:
            commit = torch.zeros_like(masked)
            commit[:, 0] = masked[:, 0]
            return commit
        tau = cfg.threshold if l.kind == GEN else cfg.refine_threshold
        if l.kind == REF and l.steps + 1 >= cfg.refine_budget:
            tau = float("-inf")
        return rules.commit_above(score, tau)

    @staticmethod
    def _entry(l, committed: list, **extra) -> dict:
        """A lane's trace record for one iteration."""
        return {"id": l.id, "kind": l.kind, "span": [l.s, l.e], "block": [l.lo, l.e], "committed": committed,
                **extra}

    @staticmethod
    def _finish(x, P, tree, trace, eos_t, spec) -> Generation:
        """The Generation: the buffer, the trace, the final tree and the answer stitched from it."""
        finished = torch.isin(x[:, P:], eos_t).any(-1)
        answer = stitch(x[0].tolist(), tree, spec.eos_ids)
        return Generation(sequences=x, prompt_length=P, finished=finished, trace=trace,
                          info={"lanes": tree.to_dicts(), "stitched": answer, "iterations": len(trace)})

    def _cascade(self, row, conf_at, P, end, tree, eos_t, spec, rec) -> int:
        """Cascading termination (step 5): the answer's new end (``end`` when nothing cascades)."""
        if not self.cfg.cascade:
            return end
        hits = (torch.isin(row[P:end], eos_t) & (conf_at[P:end] >= self.cfg.eos_threshold)).nonzero()
        if len(hits) and P + int(hits[0]) + 1 < end:
            q = P + int(hits[0])
            rec["kills"] = tree.cascade(q)
            row[q + 1:] = spec.eos_id
            return q + 1
        return end

    @torch.no_grad()
    def _generate_speculative(self, backbone, prompts, rng, delims) -> Generation:
        """Lanes that speculate on their left neighbours' drafts (``speculate``; docstring, "Speculative drafts")."""
        cfg, spec = self.cfg, backbone.spec
        M = spec.mask_id
        dream = spec.family == "dream"
        first_only = cfg.first_after_refresh(spec.family)
        x, key_mask, P, T, cache, written, conf_at, mask_col, eos_t, tree = self._start(backbone, prompts)
        end, it = T, 0
        drafts: dict = {}  # masked position -> the view's proposal there (the latest call's)
        trace = []

        while active := tree.active():
            row = x[0]
            B = len(active)
            # lane i's row: the buffer with the drafts of the lanes left of it filled in
            fills, filled = [], row.clone()
            for l in active:
                fills.append(filled.clone())
                for p in l.working:
                    if p in drafts:
                        filled[p] = drafts[p]
            gen = [l for l in active if l.kind == GEN]
            pred = sorted({p for l in active for p in l.working}
                          | {p for g in gen for p in range(g.e, min(g.e + cfg.lookahead, end))})
            lo, hi, kind = self._rows_span(cache, gen, pred, written, row, T, end, dream)
            write = cache is not None  # row 0's K/V (the buffer's own) are written
            at = {p: i for i, p in enumerate(pred)}
            ids = torch.stack([f[lo:hi] for f in fills])
            pos = torch.arange(lo, hi, device=x.device)[None].expand(B, -1)
            predict = torch.tensor([[p - lo for p in pred]], device=x.device).expand(B, -1)
            km = key_mask.expand(B, -1) if hi - lo == T else None
            # row 0 is the buffer itself (no drafts): its K/V update the cache; the other rows only read it
            one = write and B == 1
            if cfg.lane_batching:
                logits = backbone.forward(ids, positions=pos, key_mask=km, cache=cache, write=one, predict=predict,
                                          write_row=0 if write and not one else None)
            else:  # the ablation: one call per lane, each its own row
                logits = torch.cat([backbone.forward(ids[i:i + 1], positions=pos[i:i + 1],
                                                     key_mask=None if km is None else km[i:i + 1], cache=cache,
                                                     write=one, predict=predict[i:i + 1],
                                                     write_row=0 if write and not one and i == 0 else None)
                                    for i in range(B)])
            if write:
                written[lo:hi] = row[lo:hi]
            logits = logits.index_fill(-1, mask_col, float("-inf"))
            proposal = rules.gumbel_argmax(logits, cfg.temperature, rng)
            conf = rules.confidence_prob(logits, proposal, torch.float64)
            rec = {"iteration": it, "calls": 1 if cfg.lane_batching else B, "rows": B, "positions": hi - lo,
                   "refresh": kind, "lanes": [], "forks": [], "kills": [], "accepted": [], "drafts": 0}

            # ----- verify: a REF lane whose every mask holds a draft its own row (drafts of lanes left of
            # it filled, its own masked) predicts with >= refine_threshold takes its drafts; the first that
            # does not is the view, and so is the GEN lane when every REF lane before it passed
            f = B  # B: every lane verified, no view
            for i, l in enumerate(active):
                masked = [p for p in l.working if row[p] == M]
                if l.kind != REF or not masked or any(p not in drafts for p in masked):
                    f = i
                    break
                idx = torch.tensor([at[p] for p in masked], device=x.device)
                toks = torch.tensor([drafts[p] for p in masked], device=x.device)
                prob = rules.confidence_prob(logits[i:i + 1, idx], toks[None], torch.float64)[0]
                if not bool((prob >= cfg.refine_threshold).all()):
                    f = i
                    break
                row[masked] = toks
                conf_at[masked] = prob
                l.steps += 1
                rec["accepted"] += masked
                rec["lanes"].append(self._entry(l, masked, accepted=True))
            # ----- the view's lanes step on row f (their drafts masked there), the fast_dllm rule per lane
            steps = []
            for l in active[f:]:
                region = list(l.working)
                idx = torch.tensor([at[p] for p in region], device=x.device)
                masked = (row[region[0]:region[-1] + 1] == M)[None]
                score = rules.restrict_confidence(conf[f:f + 1, idx], masked)
                commit = self._lane_commit(l, score, masked, l.kind == GEN and l.steps == 0 and first_only
                                           and kind == "full")
                steps.append((self._entry(l, [region[j] for j in commit[0].nonzero().flatten().tolist()]),
                              region, score))
                l.steps += 1
            if not rec["accepted"] and not any(e["committed"] for e, _, _ in steps):
                # progress: nothing accepted, nothing confident: the leftmost lane with masks commits its best
                for entry, region, score in steps:
                    if bool(torch.isfinite(score).any()):
                        entry["committed"].append(region[int(score[0].argmax())])
                        break
            for entry, _, _ in steps:
                for p in entry["committed"]:
                    row[p] = proposal[f, at[p]]
                    conf_at[p] = conf[f, at[p]]
                rec["lanes"].append(entry)
            end = self._cascade(row, conf_at, P, end, tree, eos_t, spec, rec)
            # ----- drafts for the next call: the view's proposals at every mask it predicted
            view_lo = active[f].lo if f < B else end  # lanes are in position order
            drafts = {p: int(proposal[f, at[p]]) for p in pred if view_lo <= p < end and row[p] == M}
            rec["drafts"] = len(drafts)
            # ----- retire, fork at every line that still holds masks, advance
            for l in tree.active():
                if l.kind == REF:
                    if bool(row[l.lo:l.e].ne(M).all()):
                        l.state = DONE
                    continue
                g = l
                for p in rules.line_forks(row, conf_at, l.lo, min(l.e, end - 1), M, delims,
                                          cfg.delimiter_threshold, cfg.min_prefix):
                    if len(tree.active()) + 1 > cfg.max_lanes or p + 1 >= end:
                        break
                    r, c = tree.fork(g, p, end, it + 1)
                    rec["forks"].append({"parent": g.id, "at": p, "ref": r.id, "gen": c.id})
                    g = c
                if g is l and bool(row[l.lo:l.e].ne(M).all()):
                    tree.advance(l, end)
            tree.check()
            trace.append(rec)
            it += 1
        return self._finish(x, P, tree, trace, eos_t, spec)

    def _rows_span(self, cache, gen, pred, written, row, T, end, dream):
        """Speculative calls: every row covers ``[lo, hi)``; (lo, hi, refresh kind).

        Rows differ (each fills different drafts); row 0, the leftmost lane's, is the buffer
        itself, and only its K/V are written (``write_row``; a one-row call writes as the one-row
        path does).  ``lo``: the first
        predicted position, or the first stale slot below it (compact refresh), or 0 (a full
        refresh: ``compact_refresh`` off, or ``refresh_every``); Dream rows start one earlier (a
        row's first position has no left neighbour).  ``hi``: the buffer's end, or the answer's
        end once the EOS tail is written (compact).
        """
        cfg = self.cfg
        if cache is None:
            return 0, T, None
        want_full = self._wants_full(gen)
        stale = (written != row).nonzero().flatten().tolist()
        lo, kind = pred[0], None
        if want_full:
            lo, kind = 0, "full"
        elif stale and stale[0] < lo:
            lo, kind = (stale[0], "compact") if cfg.compact_refresh else (0, "full")
        if dream and lo > 0:
            lo -= 1
        hi = T
        if cfg.compact_refresh and end < T and (not stale or stale[-1] < end):
            hi = end
        return lo, hi, kind

    def _plan(self, cache, want_full, need, stale, T, end):
        """The call's positions, whether it writes K/V, and its refresh kind (None / compact / full).

        ``need``: positions the lanes read logits from (plus Dream left neighbours); ``stale``:
        slots whose cached K/V no longer match the buffer; ``end``: the answer's end after a
        cascade (the EOS tail ``[end, T)`` is fixed).  Without a cache every call is full.
        """
        cfg = self.cfg
        if cache is None:
            return list(range(T)), False, None
        if want_full:
            return list(range(T)), True, "full"
        if cfg.cache == "prefix":  # the call runs from `start` to the end of the buffer
            start, kind = need[0], None
            if stale and stale[0] < start:  # the cache would be read stale below `start`
                start, kind = (stale[0], "compact") if cfg.compact_refresh else (0, "full")
            hi = T
            if cfg.compact_refresh and end < T and (not stale or stale[-1] < end):
                hi = end  # compact: the fixed EOS tail, once written, is read from the cache
            return list(range(start, hi)), cfg.compact_refresh or kind == "full", kind
        # dual: only the needed positions, written in place; everything else read from the cache
        outside = sorted(set(stale) - set(need))
        if not outside:
            return need, True, None
        if cfg.compact_refresh:
            # slots between a changed token and the lanes saw the old token: rewrite them too
            span = range(outside[0], need[-1] + 1) if outside[0] < need[-1] else ()
            return sorted(set(need) | set(outside) | set(span)), True, "compact"
        return list(range(T)), True, "full"

    def _fork_point(self, g, row, conf_at, delims, end, n_active, spec):
        """Boundary for GEN lane ``g`` (rules.fork_point), if a lane is free and budget is left after it."""
        cfg = self.cfg
        if n_active + 1 > cfg.max_lanes:
            return None
        p = rules.fork_point(row, conf_at, g.lo, min(g.e, end - 1), spec.mask_id, delims, cfg.delimiter_threshold,
                             cfg.max_residual_fraction, cfg.min_prefix)
        return p

    def _seed(self, g, row, proposal, conf, at, seeded, conf_at, spec) -> list:
        """Draft reuse: commit a new block's masked positions predicted confidently in this call."""
        if not self.cfg.draft_reuse:
            return []
        out = []
        for p in g.working:
            if p in at and row[p] == spec.mask_id and conf[at[p]] >= self.cfg.draft_threshold:
                row[p] = proposal[at[p]]
                conf_at[p] = conf[at[p]]
                seeded.add(p)
                out.append(p)
        return out

    @staticmethod
    def _call(backbone, x, cols, pred_pos, cache, write, key_mask, n_calls):
        """One model call (repeated ``n_calls`` times without lane batching: same inputs, same logits)."""
        lo, hi = cols[0], cols[-1] + 1
        contiguous = hi - lo == len(cols)
        pos = torch.arange(lo, hi, device=x.device)[None] if contiguous else torch.tensor([cols], device=x.device)
        ids = x[:, lo:hi] if contiguous else x[:, pos[0]]
        at = {p: i for i, p in enumerate(cols)}
        rows = [at[p] for p in pred_pos]
        predict = None if rows == list(range(len(cols))) else torch.tensor([rows], device=x.device)
        for _ in range(n_calls):
            logits = backbone.forward(ids, positions=pos, key_mask=key_mask, cache=cache, write=write,
                                      predict=predict)
        return logits
