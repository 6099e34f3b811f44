"""fast_dllm: reference transcriptions, degenerate equivalences, rules, early exit, validation.

Reference transcriptions (written fresh for this test, temperature 0 where ``add_gumbel_noise``
is the identity): NVlabs/Fast-dLLM ``llada/generate.py`` (``generate``,
``generate_with_prefix_cache``, ``generate_with_dual_cache``, ``get_transfer_index``,
``get_transfer_index_dynamic``) and the ``confidence_threshold`` branch of
``dream/model/generation_utils_block.py``.  Their model calls (``use_cache``, the per-layer
prefix slice of ``past_key_values``, ``replace_position``) go through :class:`~asynclane.testing.reference.ReferenceModel`, an
adapter onto the native backbone's cache primitives, which tests/asynclane/test_cache.py checks
against the transformers oracle; so these tests check the sampling loop (blocks, refresh-logit
reuse, which call sees which cache, commit rule, NFE), not the attention numerics.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asynclane.sampler import build_sampler, first_eos_cut
from asynclane.testing import LogitsHook, random_prompts, run_counted
from asynclane.testing.reference import ReferenceModel
from baselines.fast_dllm import FastDllmConfig
from baselines import fast_dllm  # noqa: E402  (its own rules, tested below)

CACHES = ["none", "prefix", "dual"]


def _run(bb, prompts, seed=0, **opts):
    return run_counted("fast_dllm", bb, prompts, seed, **opts)


# --- transcription of llada/generate.py (T = 0) -------------------------------------------------

def _ref_get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + mask_num // steps
    for i in range(mask_num.size(0)):
        out[i, : mask_num[i] % steps] += 1
    return out


def _ref_get_transfer_index(logits, mask_index, x, num_transfer_tokens, threshold=None):
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j]))
        transfer_index[j, select_index] = True
        if threshold is not None:
            for k in range(1, int(num_transfer_tokens[j])):
                if confidence[j, select_index[k]] < threshold:
                    transfer_index[j, select_index[k]] = False
    return x0, transfer_index


def _ref_get_transfer_index_dynamic(logits, mask_index, x, factor):
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        threshs = [1 - factor / (n + 1) for n in range(1, int(num_transfer_tokens[j]) + 1)]
        threshs[0] = -1
        sorted_conf = torch.sort(confidence[j][mask_index[j]], dim=-1, descending=True)[0]
        for top_i in range(len(threshs)):
            if sorted_conf[top_i] < threshs[top_i]:
                break
        if top_i == 0 or top_i == len(threshs) - 1:
            top_i += 1
        _, select_index = torch.topk(confidence[j], k=top_i)
        transfer_index[j, select_index] = True
    return x0, transfer_index


def _ref_select(logits, mask_index, x, quota, threshold, factor):
    if factor is None:
        return _ref_get_transfer_index(logits, mask_index, x, quota if threshold is None else None, threshold)
    return _ref_get_transfer_index_dynamic(logits, mask_index, x, factor)


def _ref_llada_generate(model, prompt, steps, gen_length, block_length, mask_id, threshold=None, factor=None,
                        cache="none"):
    """``generate`` / ``generate_with_prefix_cache`` / ``generate_with_dual_cache`` in one (the three
    functions differ only in the block's first call and the later calls' inputs)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        end = start + block_length
        quota = _ref_get_num_transfer_tokens(x[:, start:end] == mask_id, steps)
        if cache == "none":
            i = 0
            while True:
                mask_index = x == mask_id
                logits = model(x).logits
                mask_index[:, end:] = 0
                x0, transfer_index = _ref_select(logits, mask_index, x, quota[:, i], threshold, factor)
                x[transfer_index] = x0[transfer_index]
                i += 1
                if (x[:, start:end] == mask_id).sum() == 0:
                    break
            continue
        output = model(x, use_cache=True)
        past_key_values = output.past_key_values
        mask_index = x == mask_id
        mask_index[:, end:] = 0
        x0, transfer_index = _ref_select(output.logits, mask_index, x, quota[:, 0], threshold, factor)
        x[transfer_index] = x0[transfer_index]
        if cache == "prefix":
            past_key_values = past_key_values.sliced(start)
        replace_position = torch.zeros_like(x, dtype=torch.bool)
        replace_position[:, start:end] = 1
        i = 1
        while True:
            if (x[:, start:end] == mask_id).sum() == 0:
                break
            if cache == "prefix":
                mask_index = x[:, start:] == mask_id
                mask_index[:, block_length:] = 0
                logits = model(x[:, start:], past_key_values=past_key_values, use_cache=True).logits
                x0, transfer_index = _ref_select(logits, mask_index, x[:, start:], quota[:, i], threshold, factor)
                x[:, start:][transfer_index] = x0[transfer_index]
            else:
                mask_index = x[:, start:end] == mask_id
                logits = model(x[:, start:end], past_key_values=past_key_values, use_cache=True,
                               replace_position=replace_position).logits
                x0, transfer_index = _ref_select(logits, mask_index, x[:, start:end], quota[:, i], threshold, factor)
                x[:, start:end][transfer_index] = x0[transfer_index]
            i += 1
    return x


# --- transcription of dream/model/generation_utils_block.py, alg="confidence_threshold" (T = 0) ---

def _ref_dream_block(model, input_ids, gen_length, block_length, threshold, dual_cache, mask_token_id):
    x = F.pad(input_ids, (0, gen_length), value=mask_token_id)
    for num_block in range(gen_length // block_length):
        start = input_ids.shape[1] + num_block * block_length
        end = start + block_length
        out = model(x, use_cache=True)
        past_key_values = out.past_key_values
        logits = torch.cat([out.logits[:, :1], out.logits[:, :-1]], dim=1)
        x0 = torch.softmax(logits, dim=-1).max(dim=-1)[1]  # sample_tokens at T = 0
        x[:, start] = x0[:, start]
        if not dual_cache:
            past_key_values = past_key_values.sliced(start)
        else:
            replace_position = torch.zeros_like(x, dtype=torch.bool)
            replace_position[:, start:end] = 1
        while True:
            if dual_cache:
                mask_index = x[:, start:end] == mask_token_id
                out = model(x[:, start:end], past_key_values=past_key_values, use_cache=True,
                            replace_position=replace_position)
                region = x[:, start:end]
            else:
                mask_index = x[:, start:] == mask_token_id
                out = model(x[:, start:], past_key_values=past_key_values, use_cache=True)
                region = x[:, start:]
            logits = torch.cat([out.logits[:, :1], out.logits[:, :-1]], dim=1)
            confidence, x0 = torch.softmax(logits[mask_index], dim=-1).max(dim=-1)
            x_ = torch.zeros_like(region) + mask_token_id
            full_confidence = torch.full_like(region, -torch.inf, dtype=logits.dtype)
            x_[mask_index] = x0.clone()
            full_confidence[mask_index] = confidence
            full_confidence[:, block_length:] = -torch.inf
            current_transfer_tokens = int((x[:, start:end] == mask_token_id).sum())
            selected_confidence, select_index = torch.topk(full_confidence, current_transfer_tokens)
            transfer_index = torch.zeros_like(x_, dtype=torch.bool)
            transfer_index[0, select_index[0]] = True
            for k in range(1, current_transfer_tokens):
                if selected_confidence[0, k] < threshold:
                    transfer_index[0, select_index[0, k]] = False
            region[transfer_index] = x_[transfer_index]
            if (x[:, start:end] == mask_token_id).sum() == 0:
                break
    return x


# --- reference parity -------------------------------------------------------------------------

@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("gen_length,block_length,threshold", [(32, 8, 0.9), (32, 16, 0.5), (24, 8, 0.99)])
def test_llada_matches_reference(llada, cache, gen_length, block_length, threshold):
    prompts = random_prompts(llada, lengths=(7,), seed=3)
    out, counting = _run(llada, prompts, gen_length=gen_length, block_length=block_length, threshold=threshold,
                         cache=cache)
    ref = ReferenceModel(llada)
    want = _ref_llada_generate(ref, torch.tensor(prompts), gen_length, gen_length, block_length,
                               llada.spec.mask_id, threshold=threshold, cache=cache)
    assert torch.equal(out.sequences, want)
    assert counting.nfe == ref.nfe


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_llada_factor_rule_matches_reference_with_its_quirk(llada, cache, factor):
    prompts = random_prompts(llada, lengths=(6,), seed=5)
    out, counting = _run(llada, prompts, gen_length=32, block_length=8, factor=factor, cache=cache,
                         factor_last_rank_quirk=True)
    ref = ReferenceModel(llada)
    want = _ref_llada_generate(ref, torch.tensor(prompts), 32, 32, 8, llada.spec.mask_id, factor=factor, cache=cache)
    assert torch.equal(out.sequences, want)
    assert counting.nfe == ref.nfe


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("block_length,threshold", [(8, 0.9), (16, 0.5)])
def test_dream_cached_paths_match_reference(dream, cache, block_length, threshold):
    prompts = random_prompts(dream, lengths=(7,), seed=3)
    out, counting = _run(dream, prompts, gen_length=32, block_length=block_length, threshold=threshold, cache=cache)
    ref = ReferenceModel(dream)
    want = _ref_dream_block(ref, torch.tensor(prompts), 32, block_length, threshold, cache == "dual",
                            dream.spec.mask_id)
    assert torch.equal(out.sequences, want)
    assert counting.nfe == ref.nfe


# --- degenerate settings: equal to other samplers / to no cache --------------------------------

@pytest.mark.parametrize("gen_length,block_length", [(32, 32), (32, 8), (24, 8)])
def test_threshold_above_one_without_cache_is_blockwise_one_token_per_step(backbone, gen_length, block_length):
    prompts = random_prompts(backbone, lengths=(5, 8), seed=2)  # a left-padded batch
    out, counting = _run(backbone, prompts, gen_length=gen_length, block_length=block_length, threshold=1.01,
                         cache="none")
    blockwise = build_sampler("blockwise", gen_length=gen_length, block_length=block_length,
                              steps=gen_length).generate(backbone, prompts, torch.Generator())
    assert torch.equal(out.sequences, blockwise.sequences)
    assert counting.nfe == gen_length


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cache_refreshed_every_step_equals_no_cache(backbone, cache, first, temperature):
    prompts = random_prompts(backbone, lengths=(5, 8), seed=4)
    opts = dict(gen_length=32, block_length=8, threshold=0.7, temperature=temperature,
                commit_first_after_refresh=first)
    plain, c0 = _run(backbone, prompts, seed=1, cache="none", **opts)
    cached, c1 = _run(backbone, prompts, seed=1, cache=cache, refresh_every=1, **opts)
    assert torch.equal(cached.sequences, plain.sequences)
    assert c1.nfe == c0.nfe and c1.token_forwards == c0.token_forwards


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_steps_forward_the_suffix_or_the_block(backbone, cache):
    """threshold > 1: one token per step, so NFE = gen_length; only the calls' sizes differ."""
    prompts = random_prompts(backbone, lengths=(6,), seed=7)
    opts = dict(gen_length=32, block_length=8, threshold=1.01)
    _, c_none = _run(backbone, prompts, cache="none", **opts)
    _, c = _run(backbone, prompts, cache=cache, **opts)
    assert c_none.nfe == c.nfe == 32
    T = 6 + 32
    per_block = [T + sum((T - lo) if cache == "prefix" else 8 for _ in range(7)) for lo in range(6, 38, 8)]
    assert c.token_forwards == sum(per_block) < c_none.token_forwards == 32 * T


def test_refresh_every_k_costs_refreshes_not_forwards(llada):
    prompts = random_prompts(llada, lengths=(6,), seed=7)
    _, c2 = _run(llada, prompts, gen_length=16, block_length=8, threshold=1.01, cache="dual", refresh_every=2)
    assert c2.nfe == 16 and c2.token_forwards == 2 * (4 * 22 + 4 * 8)  # 4 full + 4 block calls per block


def test_dream_first_token_comes_from_the_refresh(dream):
    """Dream + cache: at every block start only the first position is committed, whatever its confidence."""
    seen = []

    class _Spy(LogitsHook):
        def adjust(self, logits, ids, positions, rows):
            seen.append(ids.clone())
            return logits

    prompts = random_prompts(dream, lengths=(6,), seed=3)
    out = build_sampler("fast_dllm", gen_length=32, block_length=8, threshold=0.0).generate(
        _Spy(dream), prompts, torch.Generator())
    # threshold 0 would commit the whole block at once; the refresh commits just its first token
    full_calls = [i for i, ids in enumerate(seen) if ids.shape[1] == 38]
    assert len(full_calls) == 4 and len(seen) == 8  # per block: refresh (1 token) + one step (7 tokens)
    for b, i in enumerate(full_calls):
        after = seen[i + 1] if i + 1 < len(seen) else None
        assert after is not None and after.shape[1] == 38 - 6 - 8 * b  # prefix mode: suffix call
        assert int((after[0, :8] == dream.spec.mask_id).sum()) == 7
    assert (out.tokens != dream.spec.mask_id).all()



@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_dream_without_the_first_token_rule_predicts_the_block_start(dream, cache):
    """Off the reference's Dream path, a cached step asks for the block's rows by range and the backbone
    adds the block's left neighbour (Backbone.step): every row is a real prediction, one column more."""
    calls = []

    class _Spy(LogitsHook):
        def adjust(self, logits, ids, positions, rows):
            calls.append((int(positions[0, 0]), ids.shape[1], bool(torch.isfinite(logits).all())))
            return logits

    prompts = random_prompts(dream, lengths=(6,), seed=3)
    out = build_sampler("fast_dllm", gen_length=32, block_length=8, threshold=0.9, cache=cache,
                        commit_first_after_refresh=False).generate(_Spy(dream), prompts, torch.Generator())
    assert (out.tokens != dream.spec.mask_id).all() and all(finite for _, _, finite in calls)
    cached = [(start, width) for start, width, _ in calls if width != 38]  # the refreshes span the buffer
    assert cached and all(start + 1 in (6, 14, 22, 30) for start, _ in cached)  # block start - 1
    assert all(width == (38 - start if cache == "prefix" else 9) for start, width in cached)


# --- commit rules -----------------------------------------------------------------------------

def test_factor_rule_replaces_the_threshold_rule(backbone):
    prompts = random_prompts(backbone, lengths=(5, 8), seed=2)
    opts = dict(gen_length=32, block_length=8, cache="none")
    # a tiny factor only ever passes rank 1: one token per step, whatever the threshold says
    one, c_one = _run(backbone, prompts, factor=1e-12, threshold=0.0, **opts)
    ref, _ = _run(backbone, prompts, threshold=1.01, **opts)
    assert torch.equal(one.sequences, ref.sequences) and c_one.nfe == 32
    # a huge factor passes every rank: each block in one forward, its tokens the refresh's argmax
    allin, c_all = _run(backbone, prompts, factor=1e9, threshold=2.0, **opts)
    thr0, _ = _run(backbone, prompts, threshold=0.0, **opts)
    assert torch.equal(allin.sequences, thr0.sequences) and c_all.nfe == 4
    # in between the rule decodes in fewer steps than one-per-step
    mid, c_mid = _run(backbone, prompts, factor=3.0, **opts)  # the random models' confidences are ~0.2-0.3
    assert 4 <= c_mid.nfe < 32 and (mid.tokens != backbone.spec.mask_id).all()


def test_threshold_trades_steps_for_parallelism(backbone):
    prompts = random_prompts(backbone, lengths=(6,), seed=5)
    nfes = [_run(backbone, prompts, gen_length=32, block_length=8, cache="none", threshold=t)[1].nfe
            for t in (1.01, 0.9, 0.5, 0.0)]
    assert nfes[0] == 32 and nfes[-1] == 4
    assert all(a >= b for a, b in zip(nfes, nfes[1:]))


# --- early exit -------------------------------------------------------------------------------

class _EosAt(LogitsHook):
    """Adds ``boost`` to the EOS-like logits of the rows predicting absolute position ``position``.

    The random models propose nearly the same token at every masked position; pinning EOS to one
    position puts an end of answer mid-budget (``boost < 0`` instead forbids EOS everywhere).
    """

    def __init__(self, bb, position, boost):
        self._bb, self.position, self.boost = bb, position, boost

    def adjust(self, logits, ids, positions, rows):
        pos = positions.gather(1, rows)
        hit = (pos == self.position) if self.boost > 0 else torch.ones_like(pos, dtype=torch.bool)
        eos = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        eos[list(self._bb.spec.eos_ids)] = self.boost
        return logits + hit[..., None] * eos


@pytest.mark.parametrize("cache", CACHES)
def test_early_exit_keeps_the_answer_and_saves_forwards(backbone, cache):
    bb = _EosAt(backbone, position=13, boost=30.0)  # generated index 8 / 5 / 7 of the three rows
    spec = backbone.spec
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=1)
    opts = dict(gen_length=32, block_length=8, threshold=0.9, cache=cache)
    full, c_full = _run(bb, prompts, **opts)
    early, c_early = _run(bb, prompts, early_exit=True, **opts)
    assert full.finished.all(), "the EOS-pinning backbone should end every answer mid-budget"
    assert first_eos_cut(early.tokens, spec.eos_ids) == first_eos_cut(full.tokens, spec.eos_ids)
    assert torch.equal(early.finished, full.finished)
    assert c_early.nfe < c_full.nfe
    assert (early.tokens[:, 16:] == spec.eos_id).all()  # blocks 3 and 4 were never decoded
    for row, fin in zip(early.tokens.tolist(), early.finished.tolist()):
        assert spec.mask_id not in row
        if fin:  # blocks after the first EOS-like token's block hold only the pad-style EOS fill
            cut = next(i for i, t in enumerate(row) if t in spec.eos_ids)
            assert all(t == spec.eos_id for t in row[(cut // 8 + 1) * 8:])
    # a batch with early exit equals its rows run singly
    for r, p in enumerate(prompts):
        single, _ = _run(bb, [p], early_exit=True, **opts)
        assert torch.equal(single.tokens, early.tokens[r:r + 1])


def test_early_exit_without_eos_changes_nothing(llada):
    prompts = random_prompts(llada, lengths=(6,), seed=3)
    bb = _EosAt(llada, position=None, boost=-50.0)  # EOS never proposed
    a, ca = _run(bb, prompts, gen_length=32, early_exit=True)
    b, cb = _run(bb, prompts, gen_length=32)
    assert torch.equal(a.sequences, b.sequences) and ca.nfe == cb.nfe and not a.finished.any()


# --- configuration ----------------------------------------------------------------------------

def test_defaults_are_the_papers_main_setting():
    cfg = FastDllmConfig(gen_length=256)
    assert (cfg.block_length, cfg.threshold, cfg.factor, cfg.cache) == (32, 0.9, None, "prefix")
    assert cfg.temperature == 0.0 and cfg.refresh_every is None and not cfg.early_exit
    assert cfg.first_after_refresh("dream") and not cfg.first_after_refresh("llada")
    assert not FastDllmConfig(gen_length=64, cache="none").first_after_refresh("dream")
    assert FastDllmConfig(gen_length=64, cache="none", commit_first_after_refresh=True).first_after_refresh("llada")


@pytest.mark.parametrize("opts,match", [
    (dict(gen_length=32, cache="full"), r"cache='full' is not one of none, prefix, dual"),
    (dict(gen_length=32, block_length=24), r"block_length=24 must divide gen_length=32.*\[1, 2, 4, 8, 16, 32\]"),
    (dict(gen_length=32, block_length=0), r"block_length=0"),
    (dict(gen_length=32, threshold=-0.1), r"threshold=-0.1"),
    (dict(gen_length=32, threshold=float("nan")), r"threshold=nan"),
    (dict(gen_length=32, factor=0.0), r"factor=0.0"),
    (dict(gen_length=32, refresh_every=0), r"refresh_every=0"),
    (dict(gen_length=0), r"gen_length"),
    (dict(gen_length=32, temperature=-1.0), r"temperature"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        FastDllmConfig(**opts)
    with pytest.raises(ValueError, match=match):
        build_sampler("fast_dllm", **opts)


# --- the rules only this sampler uses

INF = float("inf")


def test_commit_factor_longest_passing_prefix():
    # factor 1: rank n >= 2 needs c >= 1 - 1/(n+1): 0.667, 0.75, 0.8, ...
    score = torch.tensor([[0.5, 0.74, 0.7, 0.9, -INF]])
    # ranks: 0.9 keep, 0.74 >= .667 keep, 0.7 < .75 stop (0.5 is not looked at)
    assert fast_dllm.commit_factor(score, 1.0).tolist() == [[False, True, False, True, False]]
    # a low best is still committed; nothing eligible commits nothing
    assert fast_dllm.commit_factor(torch.tensor([[0.1, 0.05]]), 1.0).tolist() == [[True, False]]
    assert not fast_dllm.commit_factor(torch.full((1, 3), -INF), 1.0).any()


def test_commit_factor_equality_passes():
    # factor 1.5, rank 2: 1 - 1.5/3 = 0.5 exactly; (n+1)(1-c) = 1.5 <= factor
    assert fast_dllm.commit_factor(torch.tensor([[0.9, 0.5]]), 1.5).tolist() == [[True, True]]
    assert fast_dllm.commit_factor(torch.tensor([[0.9, 0.49]]), 1.5).tolist() == [[True, False]]


def test_commit_factor_last_rank_quirk():
    score = torch.tensor([[0.99, 0.9, 0.7, -INF]])  # rank 3 fails (0.7 < 0.75) and is the last eligible
    assert fast_dllm.commit_factor(score, 1.0).tolist() == [[True, True, False, False]]
    assert fast_dllm.commit_factor(score, 1.0, last_rank_quirk=True).tolist() == [[True, True, True, False]]
    # failing before the last rank: the quirk changes nothing; single eligible: committed
    early = torch.tensor([[0.99, 0.6, 0.55, -INF]])
    assert fast_dllm.commit_factor(early, 1.0, last_rank_quirk=True).tolist() == [[True, False, False, False]]
    assert fast_dllm.commit_factor(torch.tensor([[-INF, 0.2]]), 1.0, last_rank_quirk=True).tolist() == [[False, True]]


def test_finished_at_eos_needs_everything_before_decoded():
    M, E, T = 9, 7, 8  # mask, eos-like ids 7 and 8
    tokens = torch.tensor([[1, 2, E, M, M],   # decoded up to the EOS: final
                           [1, M, T, 3, M],   # a mask before the EoT: not yet
                           [1, 2, 3, 4, M],   # no EOS
                           [E, M, M, M, M],   # EOS first: final
                           [1, T, M, E, 2]])  # the first EOS-like id counts
    assert fast_dllm.finished_at_eos(tokens, M, (E, T)).tolist() == [True, False, False, True, True]
