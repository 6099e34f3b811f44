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
   ``lo - 1`` (that row comes from ``lo - 1``, backbone.py).  With a cache the call is one
   :meth:`Backbone.step` over those columns (slot == column; ``write=False`` for a call that
   writes nothing: ``prefix`` with ``compact_refresh`` off between refreshes); without one, a
   full :meth:`Backbone.forward`.
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

Host and device (both paths): the lane tree and every piece of bookkeeping (the buffer row,
``written``: the token whose K/V each slot holds, ``conf_at``, the drafts and seeds) are Python
lists and dicts on the host, where the rules above run.  Each iteration sends its call's rows to
the device in one copy, computes there everything the iteration reads from the logits (the
proposals, their confidences, and the probability of each draft a verify or guard checks) and
reads it back in ONE transfer: one host-device sync per iteration (the model calls make none).

Speculative lanes (``speculate``, the default; ours).  Why: on the embedded model the one-row
path's refine lanes settle one or two dependent results per call (arith: each line's result
needs the line above), and its draft guard cannot tell a wrong draft from a right one: a model
trained on masked positions only copies an unmasked input (a wrong result token placed in the
buffer gets probability 0.9997 at its own position).  Checking a draft needs the draft *masked*
in the row that checks it, with its left context filled in.  So lanes become rows:

S1. Each iteration is ONE call with one row per ACTIVE lane, in position order (mechanism 1:
    the rows share the cached prompt/settled prefix through a lane cache, no copies).  Lane i's row is
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
    the EOS tail is written).  The cache is a *lane cache* (``new_cache(1, T, lanes=max_lanes)``:
    the one state kept in ``max_lanes`` identical rows) and the call one :meth:`Backbone.step`:
    each row attends the shared state plus its own fresh K/V, and afterwards the cache keeps row
    0's (the leftmost lane's row, the buffer itself), so no draft enters the cache.
    ``lane_batching=False``: one single-row step per row, row 0's writing, the others read-only
    (``write=False``; the same outputs, since every row covers the same columns).  ``dual``
    behaves as ``prefix`` here (rows differ to the right, so their right context cannot come
    from one cache).  The call's logits are the step's logits (refresh-logit reuse).

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

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from asynclane import rules
from asynclane.lanes import DONE, GEN, REF, LaneTree, stitch
from asynclane.sampler import Generation, SamplerConfig, check_block_length, finish, left_pad, register

CACHES = ("none", "prefix", "dual")
_NEG_INF = float("-inf")


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
        check_block_length(self.block_length, self.gen_length)
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
        # compact refresh recomputes the block's left neighbour with it: only full refreshes need the rule
        return rules.dream_first_token_after_refresh(self.commit_first_after_refresh, family,
                                                     self.cache != "none" and not self.compact_refresh)


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
        M, dev = spec.mask_id, backbone.device
        dream = spec.family == "dream"
        first_only = cfg.first_after_refresh(spec.family)
        row, P, T, cache, written, conf_at, tree = self._start(backbone, prompts)
        end, it = T, 0
        seeded: set = set()  # positions committed from drafts, not yet re-verified
        trace = []

        while active := tree.active():
            gen = [l for l in active if l.kind == GEN]
            want_full = cache is not None and self._wants_full(gen)
            pred = {p for l in active for p in l.working}  # rows whose logits the step reads
            if cfg.draft_reuse:
                pred |= {p for g in gen for p in range(g.e, min(g.e + cfg.lookahead, end))}
            pred = sorted(pred)
            need = set(pred)
            if dream:  # a masked first position needs its left neighbour in the call (backbone.py)
                need |= {l.lo - 1 for l in active if row[l.lo] == M}
            need = sorted(need)
            stale = [p for p in range(T) if written[p] != row[p]] if cache is not None else []
            cols, write, kind = self._plan(cache, want_full, need, stale, T, end)
            n_calls = 1 if cfg.lane_batching else len(active)
            logits = self._call(backbone, row, cols, pred, cache, write, n_calls, dream)
            if write:
                for p in cols:
                    written[p] = row[p]
            at = {p: i for i, p in enumerate(pred)}
            # the guard's checks: drafts seeded into the lanes' working positions, re-verified at this forward
            checks = [p for l in active for p in l.working if p in seeded]
            proposal = rules.propose(logits, M, cfg.temperature, rng)
            conf = rules.confidence_prob(logits, proposal, torch.float64)
            prob = self._probs(logits, [0] * len(checks), [at[p] for p in checks], [row[p] for p in checks], dev)
            proposal, conf, prob = self._fetch(proposal, conf, prob)
            prob = dict(zip(checks, prob))

            rec = {"iteration": it, "calls": n_calls, "positions": len(cols),
                   "refresh": kind, "lanes": [], "forks": [], "kills": [], "seeded": [], "remasked": []}
            # ----- lane steps: thresholds per lane, the progress guarantee per iteration
            steps, forced = [], None  # forced: (index in steps, position) of the leftmost masked lane's best
            for l in active:
                region = list(l.working)
                for p in [p for p in region if p in seeded]:  # guard: re-verify drafts at the lane's first forward
                    seeded.discard(p)
                    if prob[p] < cfg.threshold / 2:
                        row[p] = M
                        rec["remasked"].append(p)
                # a re-masked draft's logits came from a call that saw the draft, not a mask: it waits
                masked = [row[p] == M and p not in rec["remasked"] for p in region]
                if any(m and math.isnan(conf[at[p]]) for p, m in zip(region, masked)):  # a Dream row without p - 1
                    raise RuntimeError(f"lane {l.id}: NaN logits for masked positions of {region[0]}..{region[-1]} "
                                       f"(call positions {cols[0]}..{cols[-1]}, cache={cfg.cache})")
                first = l.kind == GEN and l.steps == 0 and first_only and kind == "full"
                score = _restrict([conf[at[p]] for p in region], masked)
                commit = self._lane_commit(l, score, masked, first)
                if not first and any(masked) and forced is None:  # the leftmost lane with masks
                    forced = (len(steps), region[_argmax(score)])
                steps.append(self._entry(l, [region[j] for j in commit]))
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
            end = self._cascade(row, conf_at, P, end, tree, spec, rec)
            seeded = {p for p in seeded if p < end}
            # ----- retire, fork, advance
            forked = False
            for l in tree.active():
                settled = M not in row[l.lo:l.e]
                if l.kind == REF:
                    if settled:
                        l.state = DONE
                    continue
                p = None if forked else self._fork_point(l, row, conf_at, delims, end, len(tree.active()), spec)
                if p is not None:
                    r, c = tree.fork(l, p, end, it + 1)
                    forked = True
                    rec["forks"].append({"parent": l.id, "at": p, "ref": r.id, "gen": c.id})
                    rec["seeded"] += self._seed(c, row, proposal, conf, at, seeded, conf_at, M)
                elif settled and tree.advance(l, end):
                    rec["seeded"] += self._seed(l, row, proposal, conf, at, seeded, conf_at, M)
            tree.check()
            trace.append(rec)
            it += 1
        return self._finish(row, P, tree, trace, spec, dev)

    def _start(self, backbone, prompts, lanes: int = 1) -> tuple:
        """Both paths' set-up, kept on the host: the buffer row (a list), prompt length P, length T,
        the cache (None without one; ``lanes`` rows: a lane cache), ``written`` (the token whose K/V is
        in each slot, -1: none), ``conf_at`` (the confidence each token was committed with), the tree."""
        cfg, spec = self.cfg, backbone.spec
        x, _, P = left_pad(prompts, cfg.gen_length, spec.pad_id, spec.mask_id)  # batch 1: no padding
        row = x[0].tolist()
        T = len(row)
        cache = None if cfg.cache == "none" else backbone.new_cache(1, T, lanes=lanes)
        return row, P, T, cache, [-1] * T, [0.0] * T, LaneTree(P, T, cfg.block_length)

    def _wants_full(self, gen) -> bool:
        """A full refresh this call (with a cache): fast_dllm's block-start rule when compact refresh is
        off, or ``refresh_every``."""
        every = self.cfg.refresh_every
        # without refresh_every, block starts refresh only when compact refresh is off
        return any(rules.refresh_due(g.steps, every) and (every is not None or not self.cfg.compact_refresh)
                   for g in gen)

    def _lane_commit(self, l, score: list, masked: list, first_token_only: bool) -> list:
        """Indices into ``score`` that lane ``l`` commits: the threshold of its kind (REF: every mask once
        ``refine_budget`` is spent; :func:`rules.commit_above`), or only its block's first position
        (``first_token_only``: Dream + cache + compact off at a full refresh, fast_dllm step 6)."""
        cfg = self.cfg
        if first_token_only:
            return [0] if masked[0] else []
        tau = cfg.threshold if l.kind == GEN else cfg.refine_threshold
        if l.kind == REF and l.steps + 1 >= cfg.refine_budget:
            tau = _NEG_INF
        return [j for j, s in enumerate(score) if s > _NEG_INF and s >= tau]

    @staticmethod
    def _entry(l, committed: list, **extra) -> dict:
        """A lane's trace record for one iteration."""
        return {"id": l.id, "kind": l.kind, "span": [l.s, l.e], "block": [l.lo, l.e], "committed": committed,
                **extra}

    @staticmethod
    def _finish(row, P, tree, trace, spec, device) -> Generation:
        """The Generation: the buffer (on ``device``), the trace, the final tree and the answer stitched from it."""
        return finish(torch.tensor([row], device=device), P, spec, trace=trace,
                      info={"lanes": tree.to_dicts(), "stitched": stitch(row, tree, spec.eos_ids),
                            "iterations": len(trace)})

    def _cascade(self, row, conf_at, P, end, tree, spec, rec) -> int:
        """Cascading termination (step 5): the answer's new end (``end`` when nothing cascades)."""
        if not self.cfg.cascade:
            return end
        eos = set(spec.eos_ids)
        q = next((q for q in range(P, end) if row[q] in eos and conf_at[q] >= self.cfg.eos_threshold), None)
        if q is not None and q + 1 < end:
            rec["kills"] = tree.cascade(q)
            row[q + 1:] = [spec.eos_id] * (len(row) - q - 1)
            return q + 1
        return end

    @staticmethod
    def _probs(logits, rows: list, cols: list, tokens: list, device) -> torch.Tensor:
        """(n,) float64 probability of ``tokens[k]`` under ``logits[rows[k], cols[k]]`` (device, no sync)."""
        if not tokens:
            return logits.new_zeros(0, dtype=torch.float64)
        pick = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        return rules.confidence_prob(pick[None], torch.tensor([tokens], device=device), torch.float64)[0]

    @staticmethod
    def _fetch(*parts: torch.Tensor) -> list:
        """The iteration's one device->host transfer: every part flattened into one float64 tensor, read
        with one ``tolist`` and split again; integer parts come back as ints (exact in float64)."""
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in parts]).tolist()
        out, i = [], 0
        for t in parts:
            seg = flat[i:i + t.numel()]
            out.append(seg if t.is_floating_point() else [int(v) for v in seg])
            i += t.numel()
        return out

    @torch.no_grad()
    def _generate_speculative(self, backbone, prompts, rng, delims) -> Generation:
        """Lanes that speculate on their left neighbours' drafts (``speculate``; docstring, "Speculative drafts")."""
        cfg, spec = self.cfg, backbone.spec
        M, dev = spec.mask_id, backbone.device
        dream = spec.family == "dream"
        first_only = cfg.first_after_refresh(spec.family)
        row, P, T, cache, written, conf_at, tree = self._start(backbone, prompts, lanes=cfg.max_lanes)
        end, it = T, 0
        drafts: dict = {}  # masked position -> the view's proposal there (the latest call's)
        trace = []

        while active := tree.active():
            B = len(active)
            gen = [l for l in active if l.kind == GEN]
            pred = sorted({p for l in active for p in l.working}
                          | {p for g in gen for p in range(g.e, min(g.e + cfg.lookahead, end))})
            lo, hi, kind = self._rows_span(cache, gen, pred, written, row, T, end, dream)
            at = {p: i for i, p in enumerate(pred)}
            checks = self._verify_plan(active, row, drafts, M)
            logits = self._rows_call(backbone, self._lane_rows(active, row, drafts), cache, (lo, hi), pred)
            if cache is not None:  # row 0's K/V (the buffer's own) are what the cache keeps
                written[lo:hi] = row[lo:hi]
            logits = rules.without_mask(logits, M)  # the drafts' probabilities too: under the same logits
            proposal = rules.gumbel_argmax(logits, cfg.temperature, rng)
            conf = rules.confidence_prob(logits, proposal, torch.float64)
            flat = [(i, p) for i, masked in enumerate(checks) for p in masked]
            prob = self._probs(logits, [i for i, _ in flat], [at[p] for _, p in flat], [drafts[p] for _, p in flat],
                               dev)
            proposal, conf, prob = self._fetch(proposal, conf, prob)
            n = len(pred)
            proposal = [proposal[i * n:(i + 1) * n] for i in range(B)]
            conf = [conf[i * n:(i + 1) * n] for i in range(B)]
            rec = {"iteration": it, "calls": 1 if cfg.lane_batching else B, "rows": B, "positions": hi - lo,
                   "refresh": kind, "lanes": [], "forks": [], "kills": [], "accepted": [], "drafts": 0}

            # ----- verify: a REF lane whose every mask holds a draft its own row (drafts of lanes left of
            # it filled, its own masked) predicts with >= refine_threshold takes its drafts; the first that
            # does not is the view, and so is the GEN lane when every REF lane before it passed
            f, k = len(checks), 0  # the first lane not checked is the view; B: every lane verified, no view
            for i, masked in enumerate(checks):
                probs, k = prob[k:k + len(masked)], k + len(masked)
                if not all(q >= cfg.refine_threshold for q in probs):
                    f = i
                    break
                l = active[i]
                for p, q in zip(masked, probs):
                    row[p], conf_at[p] = drafts[p], q
                l.steps += 1
                rec["accepted"] += masked
                rec["lanes"].append(self._entry(l, masked, accepted=True))
            # ----- the view's lanes step on row f (their drafts masked there), the fast_dllm rule per lane
            steps = []
            for l in active[f:]:
                region = list(l.working)
                masked = [row[p] == M for p in region]
                score = _restrict([conf[f][at[p]] for p in region], masked)
                commit = self._lane_commit(l, score, masked, l.kind == GEN and l.steps == 0 and first_only
                                           and kind == "full")
                steps.append((self._entry(l, [region[j] for j in commit]), region, score))
                l.steps += 1
            if not rec["accepted"] and not any(e["committed"] for e, _, _ in steps):
                # progress: nothing accepted, nothing confident: the leftmost lane with masks commits its best
                for entry, region, score in steps:
                    if any(s > _NEG_INF for s in score):
                        entry["committed"].append(region[_argmax(score)])
                        break
            for entry, _, _ in steps:
                for p in entry["committed"]:
                    row[p] = proposal[f][at[p]]
                    conf_at[p] = conf[f][at[p]]
                rec["lanes"].append(entry)
            end = self._cascade(row, conf_at, P, end, tree, spec, rec)
            # ----- drafts for the next call: the view's proposals at every mask it predicted
            view_lo = active[f].lo if f < B else end  # lanes are in position order
            drafts = {p: proposal[f][at[p]] for p in pred if view_lo <= p < end and row[p] == M}
            rec["drafts"] = len(drafts)
            # ----- retire, fork at every line that still holds masks, advance
            for l in tree.active():
                if l.kind == REF:
                    if M not in row[l.lo:l.e]:
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
                if g is l and M not in row[l.lo:l.e]:
                    tree.advance(l, end)
            tree.check()
            trace.append(rec)
            it += 1
        return self._finish(row, P, tree, trace, spec, dev)

    @staticmethod
    def _lane_rows(active, row, drafts) -> list:
        """The call's rows (S1), one per active lane in position order: lane i's is the buffer with the
        drafts of the lanes left of it filled in (row 0 is the buffer itself)."""
        rows, filled = [], list(row)
        for l in active:
            rows.append(list(filled))
            for p in l.working:
                if p in drafts:
                    filled[p] = drafts[p]
        return rows

    @staticmethod
    def _verify_plan(active, row, drafts, mask_id) -> list:
        """The lanes verify may reach (S2), left to right: the masked positions of each REF lane every
        mask of which holds a draft, up to the first lane that is not one (no later lane is checked)."""
        out = []
        for l in active:
            masked = [p for p in l.working if row[p] == mask_id]
            if l.kind != REF or not masked or any(p not in drafts for p in masked):
                break
            out.append(masked)
        return out

    def _rows_call(self, backbone, rows, cache, span, pred) -> torch.Tensor:
        """The iteration's model call over the lane rows: logits (B, len(pred), V).

        With a cache: one :meth:`Backbone.step` over the lane cache, every row covering ``span``, the
        cache keeping row 0's K/V; ``lane_batching=False``: one single-row step per row, row 0's
        writing and the others read-only (``write=False``), the same outputs since every row covers
        the same columns.  Without a cache: full forwards.
        """
        x = torch.tensor(rows, device=backbone.device)
        B = x.shape[0]
        if cache is None:
            predict = torch.tensor([pred], device=x.device).expand(B, -1)
            if self.cfg.lane_batching:
                return backbone.forward(x, predict=predict)
            return torch.cat([backbone.forward(x[i:i + 1], predict=predict[i:i + 1]) for i in range(B)])
        if self.cfg.lane_batching:
            return backbone.step(x, cache, span, predict=pred)
        return torch.cat([backbone.step(x[i:i + 1], cache, span, predict=pred, write=i == 0) for i in range(B)])

    def _rows_span(self, cache, gen, pred, written, row, T, end, dream):
        """Speculative calls: every row covers ``[lo, hi)``; (lo, hi, refresh kind).

        Rows differ (each fills different drafts); row 0, the leftmost lane's, is the buffer
        itself, and only its K/V stay in the lane cache (:meth:`Backbone.step`).  ``lo``: the first
        predicted position, or the first stale slot below it (compact refresh), or 0 (a full
        refresh: ``compact_refresh`` off, or ``refresh_every``); Dream rows start one earlier (a
        row's first position has no left neighbour).  ``hi``: the buffer's end, or the answer's
        end once the EOS tail is written (compact).
        """
        cfg = self.cfg
        if cache is None:
            return 0, T, None
        want_full = self._wants_full(gen)
        stale = [p for p in range(T) if written[p] != row[p]]
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

    def _seed(self, g, row, proposal, conf, at, seeded, conf_at, mask_id) -> list:
        """Draft reuse: commit a new block's masked positions predicted confidently in this call."""
        if not self.cfg.draft_reuse:
            return []
        out = []
        for p in g.working:
            if p in at and row[p] == mask_id and conf[at[p]] >= self.cfg.draft_threshold:
                row[p] = proposal[at[p]]
                conf_at[p] = conf[at[p]]
                seeded.add(p)
                out.append(p)
        return out

    @staticmethod
    def _call(backbone, row, cols, pred, cache, write, n_calls, dream):
        """One model call (repeated ``n_calls`` times without lane batching: same inputs, same logits):
        logits (1, len(pred), V) for the positions ``pred``.  Without a cache a full forward; with one
        a :meth:`Backbone.step` over ``cols`` (``(lo, hi)`` when contiguous), ``write=False`` read-only."""
        dev = backbone.device
        x = torch.tensor([row], device=dev)
        if cache is None:
            predict, blank = (None if pred == cols else torch.tensor([pred], device=dev)), []
        else:
            predict, blank = _step_predict(pred, cols, dream)
            span = (cols[0], cols[-1] + 1) if cols[-1] + 1 - cols[0] == len(cols) else cols
        for _ in range(n_calls):
            logits = (backbone.forward(x, predict=predict) if cache is None
                      else backbone.step(x, cache, span, predict=predict, write=write))
        if blank:  # Dream rows whose p - 1 is not in the call (_step_predict)
            logits = logits.index_fill(1, torch.tensor(blank, device=dev), float("nan"))
        return logits


def _restrict(conf: list, allowed: list) -> list:
    """Host :func:`rules.restrict_confidence` of one lane: its confidences where allowed, ``-inf`` elsewhere."""
    return [c if a else _NEG_INF for c, a in zip(conf, allowed)]


def _argmax(values: list) -> int:
    """The index of the first largest value (``torch.argmax``'s tie rule)."""
    return max(range(len(values)), key=values.__getitem__)


def _step_predict(pred: list, cols: list, dream: bool) -> tuple:
    """A one-row step's ``predict`` (None: every processed column, in order) and the rows to blank.

    Dream: a prediction whose ``p - 1`` is not in the call has no row: NaN, as a general forward
    gave it (never committed, never re-masked).  For a host-named prediction the step would add
    ``p - 1`` to the call instead, so such a row asks for a column that has its left neighbour and
    is blanked afterwards: the call keeps its columns, and the head its rows, while the sampler's
    own Dream compensations (``need``, ``lo - 1``) decide what the call holds.
    """
    if pred == cols:
        return None, []
    have = set(cols)
    blank = [i for i, p in enumerate(pred) if dream and p > 0 and p - 1 not in have]
    if not blank:
        return pred, []
    stand = next((c for c in cols if c == 0 or c - 1 in have), cols[0])
    gone = set(blank)
    return [stand if i in gone else p for i, p in enumerate(pred)], blank
