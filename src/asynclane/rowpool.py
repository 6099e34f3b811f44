"""Batch > 1 for samplers whose rules are per row: row pooling.

Some samplers decide per row what each model call covers: AsyncLane (one lane tree per row, a
different number of lanes and different query columns in every row), AdaBlock (each row's block
ends at its own delimiter), Window-Diffusion (per-row windows), FreeDave (per-row draft rows).
Their algorithms are written for one prompt.  :func:`pooled_generate` runs such a sampler on a
batch without changing its code: each row decodes in its own thread against a
:class:`RowBackbone`, which, instead of calling the model, hands the call to the pool and waits.
Once every unfinished row is waiting, the pool runs all their calls as *one* model call (per
kind: a general forward, a writing step, a read-only step), padded to the longest row, and hands
each row its own logits.  So

* every row runs exactly its single-prompt algorithm (same host rules, same calls, same order);
* one pooled call per round, whatever each row asks: a row with 3 lanes and 40 query columns
  sits next to one with 1 lane and 8 (ragged rows, padded; :meth:`Backbone.step_rows`);
* a row that finishes leaves the pool: later calls no longer carry it.

The caches: every row's ``new_cache`` in one round becomes one pooled :class:`KVCache` whose rows
are the rows' cache rows (a lane cache's ``R`` rows each), each row a :class:`RowCache` view of
its own rows and its own ``S_b`` slots.  Rows that allocate in different rounds get different
pooled caches, and their calls run apart (still correct, fewer shared calls).

Equality: at temperature 0 a pooled row computes what it computes alone except for padding
(masked keys, padded queries) and kernel shapes, so its tokens equal the single-prompt ones up to
ties between near-equal logits (the conformance suite checks batch == singles).  Sampling
(temperature > 0): each row draws from its own generator, seeded from the batch's, so a batch is
reproducible but its draws differ from the same prompts decoded one by one.

Threads only run the rows' host code; the model runs on the caller's thread.  Each row keeps
the single-prompt path's host-device syncs (the pooled call makes none of its own).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from asynclane.backbone import KVCache
from asynclane.sampler import Generation

__all__ = ["pooled_generate", "RowBackbone", "RowCache", "RowPool"]


class RowCache:
    """Row ``b``'s cache: ``lanes`` rows ``[first, first + lanes)`` and the first ``length`` slots of a
    pooled :class:`KVCache`, seen as the batch-1 cache (``lanes`` > 1: a lane cache) the row asked for.

    What a sampler asks of its cache (its length and lanes, which slots hold K/V of which tokens, and
    ``invalidate``); the step-side internals live in the pooled cache, which only the pool's calls touch."""

    batch = 1

    def __init__(self, pooled: KVCache, first: int, lanes: int, length: int, owner: int):
        self.pooled, self.first, self.lanes, self.length, self.owner = pooled, first, lanes, length, owner

    @property
    def filled(self) -> torch.Tensor:
        return self.pooled._filled[self.first:self.first + 1, :self.length]

    @property
    def tokens(self) -> torch.Tensor:
        return self.pooled._tokens[self.first:self.first + 1, :self.length]

    def stale(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens != x

    def invalidate(self, lo: int = 0, hi: Optional[int] = None, rows: Optional[Sequence[int]] = None):
        hi = self.length if hi is None else min(hi, self.length)
        own = range(self.lanes) if rows is None else rows
        self.pooled.invalidate(lo, hi, rows=[self.first + r for r in own])


@dataclass
class _Alloc:
    length: int
    key_mask: Optional[torch.Tensor]  # (1, length) or None
    lanes: int


@dataclass
class _Step:
    x: torch.Tensor  # (R, S_b): the row's buffer rows
    cache: RowCache
    cols: torch.Tensor  # (n,) the buffer columns processed (Dream's p - 1 included)
    predict: torch.Tensor  # (R, P): indices into cols
    write: bool


@dataclass
class _Forward:
    ids: torch.Tensor  # (R, T)
    positions: Optional[torch.Tensor]
    key_mask: Optional[torch.Tensor]
    predict: Optional[torch.Tensor]  # (R, P) indices into the T tokens


class _Aborted(Exception):
    """Another row failed: this row stops (the pool re-raises the first real error)."""


class RowBackbone:
    """What one row's sampler sees: the backbone, except that calls go to the pool.

    ``new_cache``, ``step``, ``forward`` (without a cache) and ``logits`` are pooled; ``plan`` and every
    attribute (``spec``, ``device``, ``tokenizer``, ``cfg``...) are the backbone's.
    """

    def __init__(self, pool: "RowPool", row: int):
        self._pool, self._row = pool, row

    def __getattr__(self, name):
        return getattr(self._pool.backbone, name)

    def new_cache(self, batch: int, length: int, key_mask: Optional[torch.Tensor] = None, lanes: int = 1):
        if batch != 1:
            raise ValueError(f"a pooled row holds one sequence: new_cache(batch=1), got batch={batch}")
        if length > self._pool.backbone.cfg.max_length:
            raise ValueError(f"a cache of {length} slots exceeds the model's max_length "
                             f"{self._pool.backbone.cfg.max_length}")
        return self._pool.submit(self._row, _Alloc(length, key_mask, max(1, lanes)))

    def step(self, x: torch.Tensor, cache, cols, *, predict=None, write: bool = True) -> torch.Tensor:
        if not isinstance(cache, RowCache) or cache.owner != self._row:
            raise TypeError("a pooled row steps on a cache it made with new_cache")
        R, S = x.shape
        if not 1 <= R <= cache.lanes:
            raise ValueError(f"a step of {R} rows needs a lane cache of >= {R} rows (got lanes {cache.lanes})")
        if S != cache.length:
            raise ValueError(f"the buffer has {S} columns, the cache {cache.length} slots")
        call, rows = self._pool.backbone.step_columns(cache, cols, predict)  # Dream's p - 1 added
        return self._pool.submit(self._row, _Step(x, cache, call, rows.expand(R, -1) if rows.dim() == 1 else rows,
                                                  write))

    def forward(self, ids: torch.Tensor, positions=None, key_mask=None, cache=None, write: bool = False,
                slot_mask=None, predict=None) -> torch.Tensor:
        if cache is not None or slot_mask is not None:
            raise NotImplementedError("row pooling runs the general forward without a cache only; a sampler "
                                      "with cached general calls decodes one prompt per call")
        return self._pool.submit(self._row, _Forward(ids, positions, key_mask, predict))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.forward(input_ids)


class RowPool:
    """Runs one sampler per row in threads and their model calls pooled (see the module docstring)."""

    def __init__(self, backbone):
        self.backbone = backbone
        self._cond = threading.Condition()
        self._pending: dict = {}
        self._results: dict = {}
        self._live: set = set()
        self._errors: dict = {}
        self._abort = False

    # ---- the rows' side ---------------------------------------------------------------------------
    def submit(self, row: int, request):
        with self._cond:
            if self._abort:
                raise _Aborted()
            self._pending[row] = request
            self._cond.notify_all()
            while row not in self._results and not self._abort:
                self._cond.wait()
            if row not in self._results:
                raise _Aborted()
            return self._results.pop(row)

    # ---- the caller's side ------------------------------------------------------------------------
    def run(self, generate_one: Callable, prompts: Sequence, rngs: Sequence) -> list:
        out: list = [None] * len(prompts)
        self._live = set(range(len(prompts)))

        def body(b: int):
            try:
                out[b] = generate_one(RowBackbone(self, b), [prompts[b]], rngs[b])
            except _Aborted:
                pass
            except BaseException as e:  # re-raised on the caller's thread
                with self._cond:
                    self._errors[b] = e
            finally:
                with self._cond:
                    self._live.discard(b)
                    self._cond.notify_all()

        threads = [threading.Thread(target=body, args=(b,), daemon=True, name=f"rowpool-{b}")
                   for b in range(len(prompts))]
        for t in threads:
            t.start()
        try:
            with self._cond:
                while True:
                    while self._live and len(self._pending) < len(self._live) and not self._errors:
                        self._cond.wait()
                    if self._errors or not self._live:
                        break
                    batch, self._pending = self._pending, {}
                    try:
                        self._results.update(self._execute(batch))
                    except BaseException as e:
                        self._errors[-1] = e
                        break
                    finally:
                        self._cond.notify_all()
        finally:
            with self._cond:
                if self._errors:
                    self._abort = True
                    self._cond.notify_all()
            for t in threads:
                t.join()
        if self._errors:
            raise self._errors[min(self._errors)]
        return out

    def _execute(self, batch: dict) -> dict:
        """One round: every waiting row's call, pooled per kind, in a fixed order."""
        results = {}
        allocs = {b: r for b, r in batch.items() if isinstance(r, _Alloc)}
        if allocs:
            results.update(self._allocate(allocs))
        forwards = {b: r for b, r in batch.items() if isinstance(r, _Forward)}
        if forwards:
            results.update(self._forward(forwards))
        groups: dict = {}
        for b, r in batch.items():
            if isinstance(r, _Step):
                groups.setdefault((id(r.cache.pooled), r.write), {})[b] = r
        for key in sorted(groups, key=lambda k: (min(groups[k]), k[1])):
            results.update(self._step(groups[key]))
        return results

    def _allocate(self, allocs: dict) -> dict:
        """One pooled cache for every row that allocates this round (row order, lanes rows each)."""
        S = max(a.length for a in allocs.values())
        dev = self.backbone.device
        valid, firsts, first = [], {}, 0
        for b in sorted(allocs):
            a = allocs[b]
            row = torch.zeros(S, dtype=torch.bool, device=dev)
            row[:a.length] = True if a.key_mask is None else a.key_mask.reshape(-1).to(device=dev, dtype=torch.bool)
            valid += [row] * a.lanes
            firsts[b], first = first, first + a.lanes
        pooled = self.backbone.new_cache(first, S, key_mask=torch.stack(valid))
        return {b: RowCache(pooled, firsts[b], a.lanes, a.length, b) for b, a in allocs.items()}

    def _forward(self, reqs: dict) -> dict:
        """The rows' general forwards (no cache) as one, right-padded to the longest."""
        order = sorted(reqs)
        T = max(reqs[b].ids.shape[1] for b in order)
        pad = self.backbone.spec.pad_id
        ids, pos, mask, pred, sizes = [], [], [], [], []
        for b in order:
            r = reqs[b]
            R, n = r.ids.shape
            dev = r.ids.device
            p = r.positions if r.positions is not None else torch.arange(n, device=dev).expand(R, n)
            k = r.key_mask if r.key_mask is not None else torch.ones(R, n, dtype=torch.bool, device=dev)
            q = r.predict if r.predict is not None else torch.arange(n, device=dev).expand(R, n)
            q = q.expand(R, -1) if q.dim() == 1 else q
            ids.append(torch.nn.functional.pad(r.ids, (0, T - n), value=pad))
            pos.append(torch.nn.functional.pad(p.expand(R, n), (0, T - n)))
            mask.append(torch.nn.functional.pad(k.expand(R, n), (0, T - n), value=False))
            pred.append(q)
            sizes.append((R, q.shape[1]))
        P = max(q.shape[1] for q in pred)
        pred = [torch.nn.functional.pad(q, (0, P - q.shape[1])) for q in pred]
        logits = self.backbone.forward(torch.cat(ids), positions=torch.cat(pos), key_mask=torch.cat(mask),
                                       predict=torch.cat(pred))
        return self._split(order, sizes, logits)

    def _step(self, reqs: dict) -> dict:
        """The rows' steps on one pooled cache (all writing or all read-only) as one ragged call."""
        order = sorted(reqs)
        cache = reqs[order[0]].cache.pooled
        S, T = cache.length, max(reqs[b].cols.numel() for b in order)
        P = max(reqs[b].predict.shape[1] for b in order)
        pad = self.backbone.spec.pad_id
        ids, slots, real, pred, rows, to, frm, sizes = [], [], [], [], [], [], [], []
        for b in order:
            r = reqs[b]
            R, n, cols = r.x.shape[0], r.cols.numel(), r.cols
            dev = r.x.device
            ids.append(torch.nn.functional.pad(r.x.index_select(1, cols), (0, T - n), value=pad))
            slots.append(torch.nn.functional.pad(cols, (0, T - n), value=S).expand(R, T))
            real.append((torch.arange(T, device=dev) < n).expand(R, T))
            pred.append(torch.nn.functional.pad(r.predict, (0, P - r.predict.shape[1])))
            base = len(rows)
            rows += [r.cache.first + j for j in range(R)]
            if r.write and r.cache.lanes > 1:  # a lane cache keeps the row's row 0 in every lane row
                to += [r.cache.first + j for j in range(1, r.cache.lanes)]
                frm += [base] * (r.cache.lanes - 1)
            sizes.append((R, r.predict.shape[1]))
        dev = ids[0].device
        logits = self.backbone.step_rows(torch.cat(ids), cache, rows, torch.cat(slots),
                                         torch.cat(real), torch.cat(pred), write=reqs[order[0]].write,
                                         spread=(torch.tensor(to, dtype=torch.long, device=dev),
                                                 torch.tensor(frm, dtype=torch.long, device=dev)))
        return self._split(order, sizes, logits)

    @staticmethod
    def _split(order, sizes, logits) -> dict:
        out, at = {}, 0
        for b, (R, P) in zip(order, sizes):
            out[b] = logits[at:at + R, :P]
            at += R
        return out


def pooled_generate(generate_one: Callable, backbone, prompts: Sequence[Sequence[int]],
                    rng: torch.Generator) -> Generation:
    """``generate_one(backbone, [prompt], rng)`` for every prompt, the model calls pooled; one
    :class:`Generation` (prompts left-padded to the longest, as every batched sampler returns them).

    ``trace``: the rows' traces (a list per row) when any row keeps one; ``info``: ``{"rows": [...]}``,
    each row's own info.
    """
    if len(prompts) == 1:
        return generate_one(backbone, prompts, rng)
    seeds = torch.randint(0, 2 ** 62, (len(prompts),), generator=rng, device=rng.device).tolist()
    rngs = [torch.Generator(device=rng.device).manual_seed(s) for s in seeds]
    gens = RowPool(backbone).run(generate_one, prompts, rngs)
    P = max(g.prompt_length for g in gens)
    pad = backbone.spec.pad_id
    sequences = torch.cat([torch.nn.functional.pad(g.sequences, (P - g.prompt_length, 0), value=pad) for g in gens])
    traces = [g.trace for g in gens]
    return Generation(sequences=sequences, prompt_length=P, finished=torch.cat([g.finished for g in gens]),
                      trace=traces if any(t is not None for t in traces) else None,
                      info={"rows": [g.info for g in gens]})
