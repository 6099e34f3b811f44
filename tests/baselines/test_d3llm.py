"""d3llm: reference transcription (no cache), degenerate equivalences, cache structure, early stop.

Reference transcription (written fresh for this test, temperature 0, batch 1): the multi-block
loop of hao-ai-lab/d3LLM ``d3llm_llada_generate_util.py`` (``generate_multi_block`` with
``handle_early_stop`` and ``get_transfer_index_entropy``; read in a third-party copy), kept in its
own shape (a dict of block states with decremented mask counts) so that it checks the sampler's
derived, vectorised bookkeeping.  Two harness choices are applied to it too: every EOS-like id
triggers the early stop (the reference tests one id) and NFE counts model calls (the reference
also counts the iteration that only discovers it is done).

The cached path has no transcription (its mechanics are a documented reconstruction); it is
checked by degenerate settings (refresh every step, a cache that never settles) and by the widths
of its model calls.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from asynclane.sampler import build_sampler, first_eos_cut
from asynclane.testing import LogitsHook, random_prompts, run_counted
from baselines.d3llm import D3llmConfig
from baselines import d3llm  # noqa: E402  (its own rules, tested below)

# the random backbones' entropies start near 3.0 (LLaDA) / 2.54 (Dream) nats: one, some or all pass
THRESHOLDS = {"llada": [0.5, 3.0008, 1e9], "dream": [0.5, 2.45, 1e9]}


def _run(bb, prompts, seed=0, name="d3llm", **opts):
    return run_counted(name, bb, prompts, seed, **opts)


class _EosAt(LogitsHook):
    """Pins the first EOS-like id at absolute position ``q`` (one-hot row: entropy 0) and forbids
    EOS-like ids everywhere else.  ``hide_after``: the model never sees the tokens after ``q`` (they
    reach it as masks) and its rows there are uniform (maximal entropy), so nothing after ``q`` can
    influence, or be committed before, the answer up to ``q``.
    """

    def __init__(self, bb, q, hide_after=False):
        self._bb, self.q, self.hide_after = bb, q, hide_after

    def edit_ids(self, ids, positions):
        return ids.masked_fill(positions > self.q, self._bb.spec.mask_id) if self.hide_after else ids

    def adjust(self, logits, ids, positions, rows):
        spec = self._bb.spec
        logits = logits.clone()
        pos = positions.gather(1, rows)
        logits[..., list(spec.eos_ids)] = -torch.inf
        at = pos == self.q
        logits[at] = -torch.inf
        logits[..., spec.eos_id][at] = 0.0
        if self.hide_after:
            logits[pos > self.q] = 0.0
        return logits


class _NoEos(_EosAt):
    def __init__(self, bb):
        super().__init__(bb, q=-10)


# --- transcription of generate_multi_block (T = 0, batch 1) ------------------------------------

def _ref_transfer_index_entropy(logits, mask_index, x, entropy_threshold):
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    entropy = -torch.sum(p * torch.log(p + 1e-12), dim=-1)
    x0 = torch.where(mask_index, x0, x)
    entropy_for_selection = torch.where(mask_index, entropy, torch.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    n = int(mask_index.sum())
    _, select_index = torch.topk(entropy_for_selection[0], k=n, largest=False)
    transfer_index[0, select_index] = True
    for k in range(1, n):
        if entropy[0, select_index[k]] > entropy_threshold:
            transfer_index[0, select_index[k]] = False
    return x0, transfer_index


def _ref_handle_early_stop(x, states, eos_ids, prompt_length, mask_id):
    gen = x[:, prompt_length:]
    eos = torch.isin(gen, torch.tensor(eos_ids))
    if not eos.any():
        return False, None
    first = prompt_length + int(eos[0].nonzero()[0, 0])
    x[:, first + 1:] = eos_ids[0]
    for bid in sorted(states):
        if bid > 0:
            s, e = states[bid]["start"], states[bid]["end"]
            if s > first:
                states[bid]["mask_count"] = 0
                states[bid]["is_complete"] = True
            elif s <= first < e:
                states[bid]["mask_count"] = int((x[:, s:first + 1] == mask_id).sum())
                if states[bid]["mask_count"] == 0:
                    states[bid]["is_complete"] = True
    return True, first


def _ref_multi_block(forward, prompt, max_new_tokens, block_size, mask_id, threshold, block_add_threshold,
                     decoded_token_threshold, eos_ids, early_stop):
    """Returns (x, number of model calls)."""
    Lp = prompt.shape[1]
    x = torch.full((1, Lp + max_new_tokens), mask_id, dtype=torch.long)
    x[:, :Lp] = prompt.clone()
    num_blocks = max_new_tokens // block_size
    states = {0: dict(start=0, end=Lp, mask_count=0, total_masks=Lp, is_complete=True),
              1: dict(start=Lp, end=Lp + block_size, mask_count=block_size, total_masks=block_size,
                      is_complete=1.0 >= decoded_token_threshold)}
    next_block_id, calls, has_eos = 2, 0, False

    def progress(bid):
        return 1 - states[bid]["mask_count"] / states[bid]["total_masks"]

    while True:
        if (x[:, Lp:] == mask_id).sum() == 0 and next_block_id > num_blocks:
            break
        if early_stop:
            has_eos, first = _ref_handle_early_stop(x, states, eos_ids, Lp, mask_id)
            if has_eos:
                while next_block_id <= num_blocks:
                    s = Lp + (next_block_id - 1) * block_size
                    if s <= first:
                        break
                    states[next_block_id] = dict(start=s, end=s + block_size, mask_count=0,
                                                 total_masks=block_size, is_complete=True)
                    next_block_id += 1
                if (x[:, Lp:] == mask_id).sum() == 0:
                    break
        for bid in sorted(states):
            if bid > 0 and not states[bid]["is_complete"] and progress(bid - 1) >= decoded_token_threshold:
                states[bid]["is_complete"] = True
        if next_block_id <= num_blocks and not has_eos:
            last = max(states)
            if progress(last) >= block_add_threshold or states[last]["mask_count"] == 0:
                s = Lp + (next_block_id - 1) * block_size
                states[next_block_id] = dict(start=s, end=s + block_size,
                                             mask_count=int((x[:, s:s + block_size] == mask_id).sum()),
                                             total_masks=block_size,
                                             is_complete=progress(next_block_id - 1) >= decoded_token_threshold)
                next_block_id += 1
        rightmost = max(b for b in states if states[b]["is_complete"] or states[b]["mask_count"] > 0)
        active_end = states[rightmost]["end"]
        calls += 1
        logits = forward(x)
        mask_index = x == mask_id
        mask_index[:, active_end:] = 0
        x0, transfer_index = _ref_transfer_index_entropy(logits, mask_index, x, threshold)
        forced = next((b for b in sorted(states)
                       if b > 0 and states[b]["is_complete"] and states[b]["mask_count"] > 0), None)
        if forced is not None:
            s, e = states[forced]["start"], states[forced]["end"]
            if not transfer_index[:, s:e].any():
                p = F.softmax(logits[:, s:e].to(torch.float64), dim=-1)
                entropy = -torch.sum(p * torch.log(p + 1e-12), dim=-1)
                entropy = torch.where(mask_index[:, s:e], entropy, torch.inf)
                best = int(entropy[0].argmin())
                transfer_index[0, s + best] = True
                x0[0, s + best] = torch.argmax(logits[0, s + best], dim=-1)
        x[transfer_index] = x0[transfer_index]
        for bid in sorted(states):
            if bid > 0 and states[bid]["mask_count"] > 0:
                s, e = states[bid]["start"], states[bid]["end"]
                states[bid]["mask_count"] -= int(transfer_index[:, s:e].sum())
    return x, calls


@pytest.mark.parametrize("block_add_threshold,decoded_token_threshold", [
    (0.1, 0.95), (0.5, 0.5), (0.0, 0.0), (0.25, 0.25), (0.0, 0.125), (1.01, 0.95), (0.25, 1.5)])
@pytest.mark.parametrize("t", range(3))
@pytest.mark.parametrize("early_stop", [False, True])
def test_no_cache_matches_the_reference_loop(backbone, block_add_threshold, decoded_token_threshold, t, early_stop):
    threshold = THRESHOLDS[backbone.spec.family][t]
    bb = _EosAt(backbone, q=19) if early_stop else backbone  # an EOS mid-answer, decoded early (entropy 0)
    prompts = random_prompts(backbone, lengths=(6,), seed=3)
    opts = dict(gen_length=32, block_length=8, threshold=threshold, block_add_threshold=block_add_threshold,
                decoded_token_threshold=decoded_token_threshold)
    out, counting = _run(bb, prompts, cache="none", early_stop=early_stop, **opts)
    want, calls = _ref_multi_block(bb.forward, torch.tensor(prompts), 32, 8, backbone.spec.mask_id, threshold,
                                   block_add_threshold, decoded_token_threshold, list(backbone.spec.eos_ids),
                                   early_stop)
    assert torch.equal(out.sequences, want)
    assert counting.nfe == calls
    if early_stop:
        assert (out.tokens[0, 19 - 6:] == backbone.spec.eos_id).all()


# --- degenerate settings ------------------------------------------------------------------------

@pytest.mark.parametrize("gen_length,block_length", [(32, 8), (32, 32), (24, 8)])
@pytest.mark.parametrize("t", range(3))
@pytest.mark.parametrize("block_add_threshold", [1.0, 1.01])  # 1.0: "fully decoded", one of the scripts' values
def test_one_block_in_flight_without_cache_is_dparallel(backbone, gen_length, block_length, t, block_add_threshold):
    threshold = THRESHOLDS[backbone.spec.family][t]
    prompts = random_prompts(backbone, lengths=(5, 8), seed=2)  # a left-padded batch
    opts = dict(gen_length=gen_length, block_length=block_length, threshold=threshold)
    out, c = _run(backbone, prompts, cache="none", block_add_threshold=block_add_threshold, early_stop=False, **opts)
    ref, c_ref = _run(backbone, prompts, name="dparallel", **opts)
    assert torch.equal(out.sequences, ref.sequences)
    assert c.nfe == c_ref.nfe and c.token_forwards == c_ref.token_forwards


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("block_add_threshold", [0.1, 1.01])
def test_cache_refreshed_every_step_equals_no_cache(backbone, temperature, block_add_threshold):
    prompts = random_prompts(backbone, lengths=(5, 8), seed=4)
    opts = dict(gen_length=32, block_length=8, threshold=THRESHOLDS[backbone.spec.family][1],
                block_add_threshold=block_add_threshold, temperature=temperature)
    plain, c0 = _run(backbone, prompts, seed=1, cache="none", **opts)
    cached, c1 = _run(backbone, prompts, seed=1, cache="delayed", refresh_every=1, **opts)
    assert torch.equal(cached.sequences, plain.sequences)
    assert c1.nfe == c0.nfe and c1.token_forwards == c0.token_forwards


def test_a_cache_that_never_settles_equals_no_cache(backbone):
    prompts = random_prompts(backbone, lengths=(5, 8), seed=4)
    opts = dict(gen_length=32, block_length=8, threshold=THRESHOLDS[backbone.spec.family][1])
    plain, c0 = _run(backbone, prompts, cache="none", **opts)
    cached, c1 = _run(backbone, prompts, cache=True, cache_delay=10**6, refresh_every=None, **opts)
    assert torch.equal(cached.sequences, plain.sequences)
    assert c1.nfe == c0.nfe and c1.token_forwards == c0.token_forwards


@pytest.mark.parametrize("cache_delay", [1, 2])
def test_cached_steps_start_at_the_settled_boundary(backbone, cache_delay):
    """One token per step (threshold 0), one block in flight: block k (8 tokens) is done after step
    8k + 7, settles ``cache_delay`` steps later, and from then on the calls start past it."""
    widths = []

    class _Spy(LogitsHook):
        def adjust(self, logits, ids, positions, rows):
            widths.append(ids.shape[1])
            return logits

    prompts = random_prompts(backbone, lengths=(6,), seed=7)
    out, _ = _run(_Spy(backbone), prompts, gen_length=32, block_length=8, threshold=0.0, block_add_threshold=1.01,
                  early_stop=False, cache="delayed", cache_delay=cache_delay, refresh_every=None)
    lead = 1 if backbone.spec.family == "dream" else 0  # Dream recomputes the last settled position
    settled = [0] * cache_delay + [1] * 8 + [2] * 8 + [3] * 8 + [4] * (8 - cache_delay)  # prompt + blocks
    want = [38] + [38 - 6 - 8 * (n - 1) + lead if n else 38 for n in settled[1:]]
    assert widths == want and (out.tokens != backbone.spec.mask_id).all()


def test_refresh_every_k_costs_refreshes_not_forwards(llada):
    prompts = random_prompts(llada, lengths=(6,), seed=7)
    opts = dict(gen_length=16, block_length=8, threshold=0.0, block_add_threshold=1.01, early_stop=False)
    _, c_none = _run(llada, prompts, refresh_every=None, **opts)
    _, c3 = _run(llada, prompts, refresh_every=3, **opts)
    assert c_none.nfe == c3.nfe == 16
    # widths without refreshes: 22, then 16 x 8 (prompt settled), then 8 x 7 (block 1 settled at step 9)
    assert c_none.token_forwards == 22 + 16 * 8 + 8 * 7
    # steps 3, 6, 9, 12, 15 become full forwards (22 tokens) instead of 16, 16, 8, 8, 8
    assert c3.token_forwards == c_none.token_forwards + 5 * 22 - (16 + 16 + 8 + 8 + 8)


class _Recorder(LogitsHook):
    """Records, per call and row, the logits of every predicted still-masked position, by absolute position."""

    def __init__(self, bb):
        super().__init__(bb)
        self.calls = []

    def adjust(self, logits, ids, positions, rows):
        pos, tok = positions.gather(1, rows), ids.gather(1, rows)
        self.calls.append([{int(p): row for p, t, row in zip(pos[r], tok[r], logits[r]) if t == self._bb.spec.mask_id}
                           for r in range(ids.shape[0])])
        return logits


def test_batch_rows_see_the_logits_of_their_single_runs(backbone):
    """Rows settle blocks at different steps, so a cached call serves several boundaries at once;
    each row must still get the logits of its own single run (cached columns read from the cache)."""
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=1)
    opts = dict(gen_length=32, block_length=8, threshold=THRESHOLDS[backbone.spec.family][1],
                refresh_every=None, early_stop=False)
    batch = _Recorder(backbone)
    _run(batch, prompts, **opts)
    for r, p in enumerate(prompts):
        single = _Recorder(backbone)
        _run(single, [p], **opts)
        assert len(single.calls) <= len(batch.calls)
        for step, (mine, theirs) in enumerate(zip(single.calls, batch.calls)):
            assert mine[0].keys() <= theirs[r].keys(), f"row {r}, step {step}"  # the batch may predict more
            for q in mine[0]:
                torch.testing.assert_close(theirs[r][q], mine[0][q], rtol=0, atol=1e-5)


# --- several blocks in flight -------------------------------------------------------------------

def test_more_blocks_in_flight_take_fewer_forwards(backbone):
    prompts = random_prompts(backbone, lengths=(6,), seed=5)
    opts = dict(gen_length=32, block_length=8, threshold=0.0, cache="none", early_stop=False)
    # threshold 0: only the lowest-entropy token, plus the forced one of the first fully activated block
    _, one = _run(backbone, prompts, block_add_threshold=1.01, **opts)
    out, many = _run(backbone, prompts, block_add_threshold=0.0, decoded_token_threshold=0.0, **opts)
    _, unforced = _run(backbone, prompts, block_add_threshold=0.0, decoded_token_threshold=1.5, **opts)
    assert one.nfe == unforced.nfe == 32  # no forced progress: exactly one token per step
    assert many.nfe < 32 and (out.tokens != backbone.spec.mask_id).all()


# --- early stop -------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["none", "delayed"])
@pytest.mark.parametrize("block_add_threshold", [0.1, 1.01])
def test_early_stop_keeps_the_answer_and_saves_forwards(backbone, cache, block_add_threshold):
    spec = backbone.spec
    bb = _EosAt(backbone, q=17, hide_after=True)  # generated index 12 / 9 / 11 of the three rows
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=1)
    opts = dict(gen_length=32, block_length=8, threshold=THRESHOLDS[spec.family][1],
                block_add_threshold=block_add_threshold, cache=cache, refresh_every=3)
    full, c_full = _run(bb, prompts, early_stop=False, **opts)
    early, c_early = _run(bb, prompts, early_stop=True, **opts)
    assert full.finished.all() and early.finished.all()
    assert first_eos_cut(early.tokens, spec.eos_ids) == first_eos_cut(full.tokens, spec.eos_ids)
    assert c_early.nfe < c_full.nfe
    for r, p in enumerate(prompts):
        cut = 17 - len(p)
        assert early.tokens[r, cut] == spec.eos_id and (early.tokens[r, cut:] == spec.eos_id).all()
        single, _ = _run(bb, [p], early_stop=True, **opts)  # a batch equals its rows run singly
        assert torch.equal(single.tokens, early.tokens[r:r + 1])


@pytest.mark.parametrize("cache", ["none", "delayed"])
def test_early_stop_without_eos_changes_nothing(llada, cache):
    prompts = random_prompts(llada, lengths=(6,), seed=3)
    bb = _NoEos(llada)
    a, ca = _run(bb, prompts, gen_length=32, block_length=8, cache=cache, early_stop=True)
    b, cb = _run(bb, prompts, gen_length=32, block_length=8, cache=cache, early_stop=False)
    assert torch.equal(a.sequences, b.sequences) and ca.nfe == cb.nfe and not a.finished.any()


# --- configuration ----------------------------------------------------------------------------

def test_defaults_are_the_d3llm_scripts_setting():
    cfg = D3llmConfig(gen_length=256)
    assert (cfg.block_length, cfg.threshold, cfg.block_add_threshold, cfg.decoded_token_threshold) == \
        (32, 0.5, 0.1, 0.95)
    assert (cfg.cache, cfg.cache_delay, cfg.refresh_every, cfg.early_stop, cfg.temperature) == \
        ("delayed", 1, 4, True, 0.0)
    assert D3llmConfig(cache=True).cache == "delayed" and D3llmConfig(cache=False).cache == "none"


@pytest.mark.parametrize("opts,match", [
    (dict(gen_length=32, cache="dual"), r"cache='dual' is not one of none, delayed \(or true / false\)"),
    (dict(gen_length=32, block_length=24), r"block_length=24 must divide gen_length=32.*\[1, 2, 4, 8, 16, 32\]"),
    (dict(gen_length=32, threshold=-0.1), r"threshold=-0.1 must be an entropy >= 0"),
    (dict(gen_length=32, threshold=math.nan), r"threshold=nan"),
    (dict(gen_length=32, block_add_threshold=-1.0), r"block_add_threshold=-1.0 must be a decoded fraction"),
    (dict(gen_length=32, decoded_token_threshold=math.nan), r"decoded_token_threshold=nan"),
    (dict(gen_length=32, cache_delay=0), r"cache_delay=0 must be an integer >= 1"),
    (dict(gen_length=32, refresh_every=0), r"refresh_every=0 must be a positive integer, or null"),
    (dict(gen_length=0), r"gen_length"),
    (dict(gen_length=32, temperature=-1.0), r"temperature"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        D3llmConfig(**opts)
    with pytest.raises(ValueError, match=match):
        build_sampler("d3llm", **opts)


# --- the rules only this sampler uses

INF = float("inf")


def test_commit_best_in_adds_the_regions_best_only_when_it_got_nothing():
    score = torch.tensor([[0.9, -INF, 0.2, 0.5, 0.1],    # region {2, 3} got nothing: add 3 (0.5)
                          [0.9, 0.3, 0.2, -INF, 0.1],    # region {2, 3} already has a commit
                          [0.9, -INF, -INF, -INF, 0.1],  # region has no eligible position
                          [-INF, 0.4, 0.4, 0.4, -INF]])  # tie: the lower index
    region = torch.tensor([[False, False, True, True, False]] * 3 + [[False, False, True, True, True]])
    commit = torch.tensor([[True, False, False, False, False],
                           [True, False, True, False, False],
                           [True, False, False, False, False],
                           [False, True, False, False, False]])
    before = commit.clone()
    out = d3llm.commit_best_in(commit, score, region)
    assert out.tolist() == [[True, False, False, True, False],
                            [True, False, True, False, False],
                            [True, False, False, False, False],
                            [False, True, True, False, False]]
    assert torch.equal(commit, before)


def test_fill_after_first_eos():
    M, E, T, F = 9, 7, 8, 7  # mask; eos-like ids 7 and 8; fill with 7
    tokens = torch.tensor([[1, E, M, 3, M],   # fill after the EOS, masks included
                           [1, M, 2, T, 4],   # the EoT counts; masks before it stay
                           [1, 2, 3, 4, M],   # no EOS: unchanged
                           [1, 2, 3, 4, T]])  # EOS last: nothing after it
    before = tokens.clone()
    out, hit = d3llm.fill_after_first_eos(tokens, (E, T), F)
    assert out.tolist() == [[1, E, F, F, F], [1, M, 2, T, F], [1, 2, 3, 4, M], [1, 2, 3, 4, T]]
    assert hit.tolist() == [True, True, False, True] and torch.equal(tokens, before)
