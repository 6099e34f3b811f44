"""Parity of the native backbone with transformers' Llama (LLaDA) and Qwen2 (Dream), fp32 on CPU.

The HF models and references come from :mod:`asynclane.testing.hf` (the same weights through the
official checkpoint names, made bidirectional with a 4-D additive mask).

Dream's raw HF logits at row i predict token i+1; the native backbone returns aligned logits
(the row for position p comes from the hidden state at p-1 in the same call, position 0 keeps its
own row, and a row whose p-1 is not in the call is NaN).  :func:`align` builds that reference
from raw HF logits with plain loops, independently of ``Backbone._shift``.

Every measured error is ``max|ours - ref| / max|ref|`` over finite entries (NaN patterns must
agree exactly).  ``CHECKS`` lists the measured comparisons; each test asserts one of them and
prints it (visible with ``pytest -s``), and ``scripts/parity_report.py`` prints them as a table.
"""
from __future__ import annotations

import functools

import pytest
import torch

from asynclane.checkpoint import official_names
from asynclane.testing import random_backbone
from asynclane.testing.hf import (CTX, FAMILIES, TOL, align, hf_from_native, hf_hidden, hf_oracle, hf_raw,
                                  left_pad, official_to_hf, pair, rand_ids, rel_err)

# ---------------------------------------------------------------- measured comparisons

def full_logits(family, impl="sdpa"):
    """Plain bidirectional forward; Dream: ours[:, 1:] vs hf[:, :-1], ours[:, 0] vs hf[:, 0]."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, 24, seed=1)
    ours = bb.forward(ids)
    raw = hf_raw(hf, ids, torch.arange(24).expand(2, 24))
    ref = torch.cat((raw[:, :1], raw[:, :-1]), dim=1) if family == "dream" else raw
    assert torch.equal(bb.logits(ids), ours)
    return rel_err(ours, ref)


def full_hidden(family, impl="sdpa"):
    """Final-norm hidden states of the native Transformer vs HF's base model (no head, no shift)."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, 24, seed=2)
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        ours = bb.model(ids, pos)
    return rel_err(ours, hf_hidden(hf, ids, pos))


def padded_batch(family, impl="sdpa"):
    """Left-padded batch: pad keys blocked, positions cumsum-1; real rows only."""
    bb, hf = pair(family, impl)
    T = 20
    valid, pos = left_pad([20, 13, 6], T)
    ids = rand_ids(bb, 3, T, seed=3)
    ours = bb.forward(ids, pos, key_mask=valid)
    allowed = valid[:, None, :].expand(3, T, T)
    ref = align(family, hf_raw(hf, ids, pos, allowed=allowed), pos, valid)
    return rel_err(ours[valid], ref[valid])


def padded_vs_single(family, impl="sdpa"):
    """Each real row of a left-padded batch equals the same prompt run alone, unpadded."""
    bb, _ = pair(family, impl)
    T, lengths = 20, [20, 13, 6]
    valid, pos = left_pad(lengths, T)
    ids = rand_ids(bb, 3, T, seed=4)
    ours = bb.forward(ids, pos, key_mask=valid)
    err = 0.0
    for b, n in enumerate(lengths):
        single = bb.forward(ids[b:b + 1, T - n:])
        err = max(err, rel_err(ours[b, T - n:], single[0]))
    return err


NONCONTIG = torch.tensor([[0, 1, 2, 7, 8, 20, 21, 22, 23, 100, 101, 150, 151, 152, 290, 291],
                          [41, 5, 40, 300, 6, 0, 77, 299, 13, 4, 12, 78, 200, 3, 202, 201]])


def noncontig_positions(family, impl="sdpa"):
    """Explicit, non-contiguous (row 1: unsorted) position ids; Dream rows without p-1 are NaN."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, NONCONTIG.shape[1], seed=5)
    ours = bb.forward(ids, NONCONTIG)
    return rel_err(ours, align(family, hf_raw(hf, ids, NONCONTIG), NONCONTIG))


# context set C and query set S of absolute positions, per row, non-contiguous (T = 32)
QRY = torch.tensor([[4, 12, 13, 14, 27, 28],
                    [16, 17, 5, 6, 1, 9]])


def cache_vs_hf_dynamic(family, impl="sdpa"):
    """Native KV cache (write C, then read with S) vs the HF DynamicCache oracle, both calls."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, 32, seed=6)
    cids, qids = ids.gather(1, CTX), ids.gather(1, QRY)
    cache = bb.new_cache(2, 32)
    ours_c = bb.forward(cids, CTX, cache=cache, write=True)
    ours_q = bb.forward(qids, QRY, cache=cache)
    ref_c, ref_q = hf_oracle(hf, cids, CTX, qids, QRY)
    return max(rel_err(ours_c, align(family, ref_c, CTX)), rel_err(ours_q, align(family, ref_q, QRY)))


def cache_vs_hf_blockmask(family, impl="sdpa"):
    """Same calls vs one HF full forward over C+S where context rows cannot see query columns."""
    bb, hf = pair(family, impl)
    ids = rand_ids(bb, 2, 32, seed=6)
    cids, qids = ids.gather(1, CTX), ids.gather(1, QRY)
    cache = bb.new_cache(2, 32)
    ours_c = bb.forward(cids, CTX, cache=cache, write=True)
    ours_q = bb.forward(qids, QRY, cache=cache)
    C, S = CTX.shape[1], QRY.shape[1]
    allowed = torch.ones(2, C + S, C + S, dtype=torch.bool)
    allowed[:, :C, C:] = False
    raw = hf_raw(hf, torch.cat((cids, qids), 1), torch.cat((CTX, QRY), 1), allowed=allowed)
    return max(rel_err(ours_c, align(family, raw[:, :C], CTX)), rel_err(ours_q, align(family, raw[:, C:], QRY)))


CHECKS = {
    "full forward logits (sdpa)": functools.partial(full_logits, impl="sdpa"),
    "full forward logits (eager)": functools.partial(full_logits, impl="eager"),
    "final hidden states vs HF base model": full_hidden,
    "left-padded batch, real rows (sdpa)": functools.partial(padded_batch, impl="sdpa"),
    "left-padded batch, real rows (eager)": functools.partial(padded_batch, impl="eager"),
    "left-padded rows vs unpadded single rows": padded_vs_single,
    "explicit non-contiguous positions": noncontig_positions,
    "KV cache C->S vs HF DynamicCache (sdpa)": functools.partial(cache_vs_hf_dynamic, impl="sdpa"),
    "KV cache C->S vs HF DynamicCache (eager)": functools.partial(cache_vs_hf_dynamic, impl="eager"),
    "KV cache C->S vs HF block-mask forward": cache_vs_hf_blockmask,
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("check", list(CHECKS))
def test_parity(check, family):
    err = CHECKS[check](family)
    print(f"\n[parity] {family:5s} {check:45s} max rel err {err:.3e}")
    assert err <= TOL, f"{family} {check}: {err:.3e} > {TOL:.0e}"


# ---------------------------------------------------------------- sanity of the harness itself

@pytest.mark.parametrize("family", FAMILIES)
def test_harness_is_sensitive(family):
    """Negative controls: the comparisons would catch a causal mask, a missing shift, bad weights."""
    bb, hf = pair(family)
    ids = rand_ids(bb, 1, 16, seed=7)
    pos = torch.arange(16)[None]
    ours = bb.forward(ids)
    causal = align(family, hf_raw(hf, ids, pos, allowed=torch.ones(16, 16, dtype=torch.bool).tril()[None]), pos)
    assert rel_err(ours, causal) > 1e-3
    raw = hf_raw(hf, ids, pos)
    if family == "dream":  # forgetting to undo the shift is caught
        assert rel_err(ours[:, 1:], raw[:, 1:]) > 1e-2
    other = hf_from_native(random_backbone(family, seed=1).model)
    assert rel_err(ours, align(family, hf_raw(other, ids, pos), pos)) > 1e-2


def test_official_to_hf_map_covers_every_parameter():
    for family in FAMILIES:
        bb, hf = pair(family)
        mapped = {official_to_hf(family, o) for o in official_names(bb.cfg).values()}
        assert mapped == set(hf.state_dict())
