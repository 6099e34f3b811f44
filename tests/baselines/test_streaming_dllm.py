"""streaming_dllm: reference transcriptions, Fast-dLLM equivalence with every component off, token-forward
savings, original position ids on the pruned sequence, the decaying threshold, early exit, batches,
named presets, validation.

Reference transcriptions (written fresh for this test, temperature 0): xiaoshideta/Streaming-dLLM
``LLaDA-1.5/generate.py`` (``generate_with_prefix_cache``, ``get_transfer_index`` with
``context_aware_threshold``), ``LLaDA-1.5/sampler.py`` (``deterministic_window_tail_sampler``) and the
``confidence_threshold`` branch of ``Dream/model/generation_utils_block.py`` (``_sample``, no dual
cache).  Their model calls (a pruned sequence with ``position_ids``, the per-layer prefix slice of
``past_key_values``) go through :class:`_RefModel`, an adapter onto the backbone's *general* forward
(explicit positions, slot == absolute position), a different path from the sampler's ``Backbone.step``
on buffer columns; so these tests check the loop (which columns, which positions, which cache, the
threshold, the exit), not the attention numerics.  The one intended difference: the references exit on
one EOS id, the sampler on every EOS-like id; the transcriptions take the id set.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from asynclane import rules
from asynclane.sampler import build_sampler, first_eos_cut
from asynclane.testing import LogitsHook, random_prompts, run_counted
from baselines.streaming_dllm import StreamingDllmConfig, call_columns, decayed_threshold, kept_suffix

OFF = dict(prune=False, decay=False, early_exit=False)


def _run(bb, prompts, seed=0, **opts):
    return run_counted("streaming_dllm", bb, prompts, seed, **opts)


def _fast(bb, prompts, seed=0, **opts):
    return run_counted("fast_dllm", bb, prompts, seed, cache="prefix", **opts)


class _EosAt(LogitsHook):
    """Adds ``boost`` to the EOS-like logits of the rows predicting absolute position ``position``."""

    def __init__(self, bb, position, boost):
        super().__init__(bb)
        self.position, self.boost = position, boost

    def adjust(self, logits, ids, positions, rows):
        return logits + _eos_boost(self._bb.spec, positions.gather(1, rows), self.position, self.boost)


def _eos_boost(spec, predicted_positions, position, boost):
    """(B, P, V) logits offset: ``boost`` on the EOS-like columns of rows predicting ``position``."""
    eos = torch.zeros(spec.vocab_size)
    eos[list(spec.eos_ids)] = boost
    return (predicted_positions == position)[..., None] * eos


class _Calls:
    """A delegating backbone that records every step: (buffer, columns, predict, logits)."""

    def __init__(self, bb):
        self._bb, self.calls = bb, []

    def step(self, x, cache, cols, predict=None, **kwargs):
        logits = self._bb.step(x, cache, cols, predict=predict, **kwargs)
        self.calls.append((x.clone(), cols, predict, logits.clone()))
        return logits

    def __getattr__(self, name):
        return getattr(self._bb, name)


# --- the reference's model API on the native backbone ------------------------------------------

class _Past:
    def __init__(self, cache, keep):
        self.cache, self.keep = cache, keep


class _RefModel:
    """``model(x, position_ids=..., use_cache=True, past_key_values=None | prefix)`` -> raw .logits.

    Without ``past_key_values``: the pruned sequence ``x`` at ``position_ids`` (its original positions),
    every K/V written at slot == position.  With it: ``x`` is the tail of the pruned sequence after the
    kept prefix; its queries take the last ``T`` position ids (the reference rotates the concatenated
    keys with the full vector) and attend to the prefix slots only plus themselves.  ``eos``: optional
    ``(position, boost)`` EOS pin, applied to the raw row that predicts ``position`` (Dream: the row
    before it, which the transcription then shifts onto it).
    """

    def __init__(self, bb, length, eos=None):
        self.bb, self.length, self.eos, self.nfe = bb, length, eos, 0

    def __call__(self, x, position_ids, past_key_values=None, use_cache=True):
        self.nfe += 1
        bb, (B, T) = self.bb, x.shape
        pos = position_ids[:, -T:].expand(B, T)
        if past_key_values is None:
            past = _Past(bb.new_cache(B, self.length), None)
            hidden = bb.model(x, pos, None, past.cache, write=True)
        else:
            past = past_key_values
            hidden = bb.model(x, pos, None, past.cache, write=False, slot_mask=past.cache.window(0, past.keep))
        logits = bb.model.head(hidden)
        if self.eos is not None:
            predicted = pos + (1 if bb.cfg.family == "dream" else 0)
            logits = logits + _eos_boost(bb.spec, predicted, *self.eos)
        return SimpleNamespace(logits=logits, past_key_values=past)


def _ref_window_tail(tokens, window, tail_keep):
    n = len(tokens)
    if n == 0:
        return tokens[:0]
    head = tokens[:min(window, n)]
    if n <= window:
        return head
    tail_keep = min(tail_keep, max(n - len(head), 0))
    return torch.cat([head, tokens[-tail_keep:] if tail_keep > 0 else tokens[:0]])


def _ref_threshold(threshold, mask_ratio, alpha):
    return threshold * (1.0 - alpha * (1 - mask_ratio))


def _ref_transfer(logits, mask_index, x, threshold, mask_ratio, alpha):
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, torch.tensor(torch.finfo(torch.float64).min, dtype=torch.float64))
    transfer = mask_index & (confidence >= _ref_threshold(threshold, mask_ratio, alpha))
    force = torch.zeros_like(transfer).scatter_(1, torch.argmax(confidence, dim=1, keepdim=True), True)
    return x0, (transfer | force) & mask_index


def _ref_llada(model, prompt, gen_length, block_length, mask_id, eos_ids, threshold, window, alpha, tail_keep=1):
    """``generate_with_prefix_cache`` (threshold path, T = 0)."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    for nb in range(gen_length // block_length):
        start = prompt.shape[1] + nb * block_length
        end = start + block_length
        suffix = _ref_window_tail(torch.arange(end, x.shape[1]), window, tail_keep)
        tok_idx = torch.cat([torch.arange(end), suffix])[None]
        x_prun = x[:, :tok_idx.shape[1]]  # a view: every position after `end` is a mask anyway
        out = model(x_prun, position_ids=tok_idx)
        mask_index = x_prun == mask_id
        mask_index[:, end:] = 0
        x0, transfer = _ref_transfer(out.logits, mask_index, x_prun, threshold, 1.0, 0.0)
        x_prun[transfer] = x0[transfer]
        past = _Past(out.past_key_values.cache, start)
        while True:
            if (x_prun[:, start:end] == mask_id).sum() == 0:
                if torch.isin(x[:, start:end], torch.tensor(eos_ids)).any():
                    x[:, end:] = eos_ids[0]
                    return x
                break
            mask_index = x_prun[:, start:] == mask_id
            ratio = mask_index.sum().item() / x_prun[:, start:].shape[1]
            mask_index[:, block_length:] = 0
            logits = model(x_prun[:, start:], position_ids=tok_idx, past_key_values=past).logits
            x0, transfer = _ref_transfer(logits, mask_index, x_prun[:, start:], threshold, ratio, alpha)
            x_prun[:, start:][transfer] = x0[transfer]
    return x


def _ref_dream(model, prompt, gen_length, block_length, mask_id, eos_ids, threshold, window, alpha, tail_keep=1):
    """``_sample`` with ``alg="confidence_threshold"``, no dual cache (T = 0, no top-p / top-k)."""
    x = F.pad(prompt, (0, gen_length), value=mask_id)
    for nb in range(gen_length // block_length):
        start = prompt.shape[1] + nb * block_length
        end = start + block_length
        suffix = _ref_window_tail(torch.arange(end, x.shape[1]), window, tail_keep)
        tok_idx = torch.cat([torch.arange(end), suffix])[None]
        x_prun = x[:, :tok_idx.shape[1]]
        out = model(x_prun, position_ids=tok_idx)
        logits = torch.cat([out.logits[:, :1], out.logits[:, :-1]], dim=1)
        x_prun[:, start] = torch.softmax(logits, dim=-1).max(dim=-1)[1][:, start]
        past = _Past(out.past_key_values.cache, start)
        while True:
            mask_index = x_prun[:, start:] == mask_id
            out = model(x_prun[:, start:], position_ids=tok_idx, past_key_values=past)
            logits = torch.cat([out.logits[:, :1], out.logits[:, :-1]], dim=1)
            confidence, x0 = torch.softmax(logits[mask_index], dim=-1).max(dim=-1)
            x_ = torch.full_like(x_prun[:, start:], mask_id)
            full_confidence = torch.full_like(x_prun[:, start:], -torch.inf, dtype=logits.dtype)
            x_[mask_index] = x0.clone()
            full_confidence[mask_index] = confidence
            full_confidence[:, block_length:] = -torch.inf
            n = int((x_prun[:, start:end] == mask_id).sum())
            selected, select_index = torch.topk(full_confidence, n)
            transfer = torch.zeros_like(x_, dtype=torch.bool)
            transfer[0, select_index[0]] = True
            ratio = mask_index.sum().item() / x_prun[:, start:].shape[1]
            for k in range(1, n):
                if selected[0, k] < _ref_threshold(threshold, ratio, alpha):
                    transfer[0, select_index[0, k]] = False
            x_prun[:, start:][transfer] = x_[transfer]
            if (x_prun[:, start:end] == mask_id).sum() == 0:
                if torch.isin(x[:, start:end], torch.tensor(eos_ids)).any():
                    x[:, end:] = eos_ids[0]
                    return x
                break
    return x


# --- reference parity -------------------------------------------------------------------------

# a threshold inside the random models' confidences (~0.15-0.6), where the decay changes the NFE by a third
MID = {"llada": 0.2, "dream": 0.3}
# (gen_length, block_length, window, alpha, keep_last)
PARITY = [
    (64, 8, 8, 0.6, True),    # pruned: window + last position
    (64, 16, 16, 0.3, True),
    (48, 8, 0, 0.6, True),    # window 0: the last position only
    (64, 8, 8, 0.6, False),   # the Table 6 ablation: no trailing position
    (32, 8, 64, 0.0, True),   # nothing pruned, no decay: Fast-dLLM's prefix cache
]


@pytest.mark.parametrize("gen_length,block_length,window,alpha,keep_last", PARITY)
@pytest.mark.parametrize("eos_at", [None, 21])
def test_matches_reference(backbone, gen_length, block_length, window, alpha, keep_last, eos_at):
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    spec = backbone.spec
    threshold = MID[spec.family]
    bb = backbone if eos_at is None else _EosAt(backbone, eos_at, 30.0)
    out, counting = _run(bb, prompts, gen_length=gen_length, block_length=block_length, threshold=threshold,
                         window=window, alpha=alpha, keep_last=keep_last)
    ref = _RefModel(backbone, 7 + gen_length, None if eos_at is None else (eos_at, 30.0))
    transcription = _ref_dream if spec.family == "dream" else _ref_llada
    want = transcription(ref, torch.tensor(prompts), gen_length, block_length, spec.mask_id, spec.eos_ids,
                         threshold, window, alpha, tail_keep=int(keep_last))
    assert torch.equal(out.sequences, want)
    assert counting.nfe == ref.nfe
    if eos_at is not None:  # the pinned EOS (answer index 14) ends the answer: the blocks after it are the fill
        assert out.finished.all() and (out.tokens[:, (14 // block_length + 1) * block_length:] == spec.eos_id).all()


def test_matches_reference_on_the_embedded_model(tiny, tiny_prompts):
    spec = tiny.spec
    for task in ("arith", "listops"):
        prompt = tiny_prompts(task, (0,))
        for gen_length, window, alpha in ((64, 32, 0.3), (128, 32, 0.6)):
            out, counting = _run(tiny, prompt, gen_length=gen_length, window=window, alpha=alpha)
            ref = _RefModel(tiny, len(prompt[0]) + gen_length)
            want = _ref_llada(ref, torch.tensor(prompt), gen_length, 32, spec.mask_id, spec.eos_ids, 0.9, window, alpha)
            assert torch.equal(out.sequences, want) and counting.nfe == ref.nfe


# --- every component off: Fast-dLLM with the prefix cache ------------------------------------------

@pytest.mark.parametrize("gen_length,block_length,threshold", [(32, 8, 0.9), (64, 8, 0.3), (48, 16, 0.5)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_all_off_is_fast_dllm_prefix(backbone, gen_length, block_length, threshold, temperature):
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=2)  # a left-padded batch
    opts = dict(gen_length=gen_length, block_length=block_length, threshold=threshold, temperature=temperature)
    ours, c_ours = _run(backbone, prompts, seed=1, **OFF, **opts)
    ref, c_ref = _fast(backbone, prompts, seed=1, **opts)
    assert torch.equal(ours.sequences, ref.sequences)
    assert c_ours.nfe == c_ref.nfe and c_ours.token_forwards == c_ref.token_forwards


@pytest.mark.parametrize("task,idx", [("arith", (0, 1, 2)), ("listops", (0, 1, 2))])
def test_all_off_is_fast_dllm_prefix_on_the_embedded_model(tiny, task, idx, tiny_prompts):
    prompts = tiny_prompts(task, idx)
    for gen_length in (64, 128):
        opts = dict(gen_length=gen_length, block_length=32, threshold=0.9)
        ours, c_ours = _run(tiny, prompts, **OFF, **opts)
        ref, c_ref = _fast(tiny, prompts, **opts)
        assert torch.equal(ours.sequences, ref.sequences) and c_ours.nfe == c_ref.nfe


# --- token-forwards ---------------------------------------------------------------------------

def test_pruned_calls_forward_the_window_and_the_last_position(backbone):
    """threshold > 1: one token per step, so NFE = gen_length and only the calls' sizes differ."""
    prompts = random_prompts(backbone, lengths=(6,), seed=7)
    opts = dict(gen_length=64, block_length=8, threshold=1.01, decay=False, early_exit=False)
    _, c = _run(backbone, prompts, window=8, **opts)
    _, c_fast = _fast(backbone, prompts, gen_length=64, block_length=8, threshold=1.01)
    S = 6 + 64
    kept = [S - hi if S - hi <= 8 else 9 for hi in range(14, S + 1, 8)]  # window + last position, or all
    want = sum(hi + k + 7 * (8 + k) for hi, k in zip(range(14, S + 1, 8), kept))
    assert c.nfe == c_fast.nfe == 64
    assert c.token_forwards == want < c_fast.token_forwards


def test_fewer_token_forwards_than_fast_dllm_prefix(backbone):
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=2)
    for gen_length, block_length, threshold in ((64, 8, 0.9), (128, 32, 0.3)):
        opts = dict(gen_length=gen_length, block_length=block_length, threshold=threshold)
        _, c_ours = _run(backbone, prompts, window=block_length, **opts)
        _, c_fast = _fast(backbone, prompts, **opts)
        assert c_ours.token_forwards < c_fast.token_forwards


@pytest.mark.parametrize("task", ["arith", "listops"])
def test_fewer_token_forwards_on_the_embedded_model(tiny, task, tiny_prompts):
    prompts = tiny_prompts(task, (0, 1, 2))
    # at gen 64 the default window (32) keeps the whole suffix of block 1: a smaller one prunes there
    for gen_length, window in ((64, 16), (128, 32)):
        for p in prompts:  # batch 1, as the paper runs
            ours, c_ours = _run(tiny, [p], gen_length=gen_length, window=window)
            ref, c_fast = _fast(tiny, [p], gen_length=gen_length)
            assert c_ours.token_forwards < c_fast.token_forwards and c_ours.nfe <= c_fast.nfe
            assert (ours.tokens != tiny.spec.mask_id).all()


# --- the pruned sequence keeps original position ids --------------------------------------------

def test_kept_suffix_is_the_window_and_the_last_position():
    assert kept_suffix(10, 40, 4, True) == [10, 11, 12, 13, 39]
    assert kept_suffix(10, 40, 4, False) == [10, 11, 12, 13]
    assert kept_suffix(10, 40, 0, True) == [39]
    assert kept_suffix(10, 15, 5, True) == [10, 11, 12, 13, 14]  # short suffix: all of it
    assert kept_suffix(10, 16, 5, True) == [10, 11, 12, 13, 14, 15]  # window + last == all
    assert kept_suffix(10, 40, None, True) == list(range(10, 40)) and kept_suffix(40, 40, 4, True) == []
    assert call_columns(3, 10, [10, 11, 39]) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 39]
    assert call_columns(3, 10, [10, 11, 12]) == (3, 13) and call_columns(0, 40, []) == (0, 40)


@pytest.mark.parametrize("keep_last", [True, False])
def test_pruned_call_is_a_forward_of_the_pruned_sequence_at_original_positions(backbone, keep_last):
    """A block's first (cache-building) call equals a plain forward of the kept columns at their own
    positions (the far suffix removed), and differs from the same tokens renumbered 0..n-1 or the full buffer."""
    prompts = random_prompts(backbone, lengths=(6,), seed=3)
    rec = _Calls(backbone)
    build_sampler("streaming_dllm", gen_length=64, block_length=8, window=8, threshold=0.5,
                  keep_last=keep_last).generate(rec, prompts, torch.Generator())
    S = 70
    firsts = [call for call in rec.calls if call[1][0] == 0]
    assert len(firsts) == 8
    for x, cols, (a, b), logits in firsts:
        cols = list(range(*cols)) if isinstance(cols, tuple) else cols
        if S - b > 8:  # a suffix longer than the window: the window of 8 (and the last position)
            assert cols == list(range(b + 8)) + ([S - 1] if keep_last else [])
        else:
            assert cols == list(range(S))
        idx = torch.tensor(cols)
        rows = torch.tensor([cols.index(p) for p in range(a, b)])[None]
        kept = backbone.forward(x[:, idx], positions=idx[None], predict=rows)
        assert (kept - logits).abs().max() < 1e-4
        if keep_last and len(cols) < S:
            renumbered = backbone.forward(x[:, idx], positions=torch.arange(len(cols))[None], predict=rows)
            full = backbone.forward(x, predict=torch.arange(a, b)[None])
            assert (renumbered - logits).abs().max() > 3e-4 and (full - logits).abs().max() > 3e-4


def test_later_steps_query_the_block_and_the_kept_suffix_at_original_positions(backbone):
    """Every call's columns are the block (and for the first call the prefix) plus the kept suffix; the
    backbone reads each column's position from the cache's table, i.e. its own index here."""
    calls = []

    class _Spy(LogitsHook):
        def adjust(self, logits, ids, positions, rows):
            calls.append(positions[0].tolist())
            return logits

    prompts = random_prompts(backbone, lengths=(6,), seed=3)
    build_sampler("streaming_dllm", gen_length=64, block_length=8, window=8, threshold=0.5).generate(
        _Spy(backbone), prompts, torch.Generator())
    S = 70
    later = [pos for pos in calls if pos[0] != 0]
    assert later
    for pos in later:
        hi = pos[0] + 8
        assert pos == list(range(pos[0], min(S, hi + 8))) + ([S - 1] if S - hi > 8 else [])


# --- the decaying threshold -----------------------------------------------------------------------

def test_decayed_threshold_formula():
    # docs/research/baselines_seeds.md §4.2: B = 32, w = 96, 16 decoded: r = 113/129, tau ~ 0.867
    assert decayed_threshold(0.9, 0.3, 113 / 129) == pytest.approx(0.9 * (1 - 0.3 * 16 / 129))
    assert decayed_threshold(0.9, 0.3, 113 / 129) == pytest.approx(0.8665, abs=1e-4)
    assert decayed_threshold(0.9, 0.3, 1.0) == 0.9 and decayed_threshold(0.9, 0.0, 0.2) == 0.9
    assert decayed_threshold(0.9, 0.6, 0.0) == pytest.approx(0.36)
    r = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    assert torch.allclose(decayed_threshold(0.9, 0.4, r), torch.tensor([[0.9], [0.72]], dtype=torch.float64))


def test_every_step_commits_at_the_decayed_threshold_on_the_embedded_model(tiny, tiny_prompts):
    """Replay: each later step commits exactly the threshold rule at tau = t0 (1 - a (1 - r)), r = masks in
    block + kept suffix over their size, before the step; the block's first call uses t0; and the decay
    commits tokens that t0 alone would have left."""
    prompts = tiny_prompts("arith", (0, 1, 2, 3))
    mask, t0, alpha, w = tiny.spec.mask_id, 0.9, 0.6, 32
    below = 0
    for p in prompts:
        rec = _Calls(tiny)
        out = build_sampler("streaming_dllm", gen_length=128, threshold=t0, alpha=alpha, window=w,
                            early_exit=False).generate(rec, [p], torch.Generator())
        states = [x for x, _, _, _ in rec.calls[1:]] + [out.sequences]
        for (x, cols, (a, b), logits), after in zip(rec.calls, states):
            first = cols[0] == 0
            lo, hi, S = a, b, x.shape[1]
            suffix = kept_suffix(hi, S, w, True)
            r = (int((x[0, lo:hi] == mask).sum()) + int((x[0, suffix] == mask).sum())) / (hi - lo + len(suffix))
            tau = t0 if first else t0 * (1 - alpha * (1 - r))
            masked = x[:, lo:hi] == mask
            proposal = rules.propose(logits, mask, 0.0)
            score = rules.restrict_confidence(rules.confidence_prob(logits, proposal, torch.float64), masked)
            assert torch.equal(after[:, lo:hi] != x[:, lo:hi], rules.commit_threshold(score, tau))
            below += int(((score >= tau) & (score < t0) & (rules.ranks(score) > 0)).sum())
    assert below > 0, "the decay never mattered: the test would pass without it"


def test_decay_commits_more_per_step(backbone):
    prompts = random_prompts(backbone, lengths=(6,), seed=5)
    opts = dict(gen_length=64, block_length=16, threshold=MID[backbone.spec.family], early_exit=False)
    _, c_flat = _run(backbone, prompts, decay=False, alpha=0.6, **opts)
    _, c_zero = _run(backbone, prompts, alpha=0.0, **opts)
    _, c_decay = _run(backbone, prompts, alpha=0.6, **opts)
    _, c_more = _run(backbone, prompts, alpha=1.0, **opts)
    assert c_zero.nfe == c_flat.nfe > c_decay.nfe >= c_more.nfe


# --- early exit -------------------------------------------------------------------------------

def test_early_exit_keeps_the_answer_and_stops_after_the_eos_block(backbone):
    spec = backbone.spec
    bb = _EosAt(backbone, position=13, boost=30.0)  # generated index 8 / 5 / 7 of the three rows
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=1)
    opts = dict(gen_length=64, block_length=8, threshold=1.01, window=8)  # one token per step
    full, c_full = _run(bb, prompts, early_exit=False, **opts)
    early, c_early = _run(bb, prompts, **opts)
    assert full.finished.all(), "the EOS-pinning backbone should end every answer mid-budget"
    assert first_eos_cut(early.tokens, spec.eos_ids) == first_eos_cut(full.tokens, spec.eos_ids)
    assert torch.equal(early.finished, full.finished) and c_early.nfe < c_full.nfe
    assert (early.tokens[:, 16:] == spec.eos_id).all()  # blocks 3 to 8 were never decoded
    for r, p in enumerate(prompts):  # a row alone: its EOS block is decoded to its end, then it stops
        single, c = _run(bb, [p], **opts)
        assert torch.equal(single.tokens, early.tokens[r:r + 1])
        eos_block = (len(first_eos_cut(full.tokens[r:r + 1], spec.eos_ids)[0]) - 1) // 8  # the first EOS's block
        assert c.nfe == 8 * (eos_block + 1)
        assert torch.equal(single.tokens[:, :8 * (eos_block + 1)], full.tokens[r:r + 1, :8 * (eos_block + 1)])


def test_early_exit_without_eos_changes_nothing(llada):
    prompts = random_prompts(llada, lengths=(6,), seed=3)
    never = type("_NoEos", (LogitsHook,), {"adjust": lambda self, lg, *a: lg.index_fill(
        -1, torch.tensor(llada.spec.eos_ids), -50.0)})(llada)
    for hook in (llada, never):
        a, ca = _run(hook, prompts, gen_length=64, block_length=8, window=8)
        b, cb = _run(hook, prompts, gen_length=64, block_length=8, window=8, early_exit=False)
        assert torch.equal(a.sequences, b.sequences) and ca.nfe == cb.nfe
    assert not _run(never, prompts, gen_length=64, block_length=8)[0].finished.any()


# --- batches ------------------------------------------------------------------------------------

def test_a_padded_batch_equals_its_rows_with_every_component_on(backbone):
    """Pruned column lists with left padding: the batch decodes each row as alone (per-row threshold)."""
    bb = _EosAt(backbone, position=20, boost=30.0)
    prompts = random_prompts(backbone, lengths=(5, 9, 6), seed=4)
    opts = dict(gen_length=64, block_length=8, window=8, threshold=0.3, alpha=0.6)
    batch, _ = _run(bb, prompts, **opts)
    for r, p in enumerate(prompts):
        single, _ = _run(bb, [p], **opts)
        assert torch.equal(single.tokens, batch.tokens[r:r + 1])
        assert torch.equal(single.finished, batch.finished[r:r + 1])


# --- named presets (paper Table 11, LLaDA-8B-Instruct at gen 256) ----------------------------------

def _composed(*overrides):
    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("preset,window,alpha", [("gsm8k", 96, 0.3), ("humaneval", 192, 0.3), ("mbpp", 32, 0.3),
                                                 ("math500", 128, 0.3)])
def test_named_presets_compose_to_table_11(preset, window, alpha):
    options = _composed(f"sampler=streaming_dllm_{preset}", "gen_length=256")["sampler"]
    assert options.pop("name") == "streaming_dllm"
    assert StreamingDllmConfig(**options) == StreamingDllmConfig(gen_length=256, window=window, alpha=alpha)
    assert build_sampler("streaming_dllm", **options).cfg.window == window
    # an override on the command line still wins over the preset
    assert _composed(f"sampler=streaming_dllm_{preset}", "sampler.window=7")["sampler"]["window"] == 7


# --- configuration ----------------------------------------------------------------------------

def test_defaults_are_the_references():
    cfg = StreamingDllmConfig(gen_length=256)
    assert (cfg.block_length, cfg.threshold, cfg.window, cfg.alpha) == (32, 0.9, 32, 0.3)
    assert cfg.prune and cfg.decay and cfg.early_exit and cfg.keep_last and cfg.temperature == 0.0


@pytest.mark.parametrize("opts,match", [
    (dict(gen_length=32, block_length=24), r"block_length=24 must divide gen_length=32.*\[1, 2, 4, 8, 16, 32\]"),
    (dict(gen_length=32, threshold=-0.1), r"threshold=-0.1"),
    (dict(gen_length=32, threshold=float("nan")), r"threshold=nan"),
    (dict(gen_length=32, window=-1), r"window=-1 must be an integer >= 0"),
    (dict(gen_length=32, alpha=1.5), r"alpha=1.5 must lie in \[0, 1\]"),
    (dict(gen_length=32, alpha=-0.1), r"alpha=-0.1"),
    (dict(gen_length=0), r"gen_length"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        StreamingDllmConfig(**opts)
    with pytest.raises(ValueError, match=match):
        build_sampler("streaming_dllm", **opts)
