"""adablock: reference transcriptions, fixed blocks = fast_dllm, the delimiter rule, the embedded model, config.

Reference transcriptions (written fresh for this test, temperature 0): lgxi24/AdaBlock-dLLM at 491b205,
``llada/generate_adablock.py`` (``compute_block_length``, ``generate_adablock``,
``generate_adablock_prefix_cache``, ``generate_adablock_dual_cache``, ``get_transfer_index``) and
``dream/model/generation_utils_adablock.py`` (``_compute_block_length``, ``_sample_adablock``,
``_sample_adablock_cache``, alg="confidence_threshold").  The Dream file hard-codes 24 Qwen2 delimiter
ids; the transcription takes the ids as an argument (the random vocabulary has 96).  Model calls go
through ``asynclane.testing.reference.ReferenceModel`` (the reference's ``use_cache`` / ``past_key_values`` /
``replace_position`` API on the native backbone's cache primitives).  As in test_fast_dllm, the
reference's calls put every position through the LM head and ours only the rows used: token equality
there rests on a row's logits not depending on the call's other rows (true of these CPU kernels).  The
fast_dllm equivalence below is exact by construction (the same calls; see its comment).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from asynclane.sampler import build_sampler, delimiter_set, first_eos_cut
from asynclane.testing import LogitsHook, random_backbone, random_prompts, run_counted
from asynclane.testing.reference import ReferenceModel
from asynclane.tiny_tokenizer import chat_prompt_ids
from baselines.adablock import AdaBlockConfig, delimiter_block_length
from eval.tasks import synthetic


CACHES = ["none", "prefix", "dual"]


def _run(bb, prompts, seed=0, **opts):
    return run_counted("adablock", bb, prompts, seed, **opts)


def _fixed(gen_length, block_length):
    """The block lengths of fixed blocks: ``block_length`` each, the last capped by what remains."""
    return [min(block_length, gen_length - g) for g in range(0, gen_length, block_length)]


def _common_ids(bb, prompts, k, gen_length=48):
    """The ``k`` ids a fast_dllm run proposes most often: delimiters the random models really predict."""
    out = build_sampler("fast_dllm", gen_length=gen_length, block_length=16, cache="none").generate(
        bb, prompts, torch.Generator())
    ids, counts = out.tokens[0].unique(return_counts=True)
    return ids[counts.argsort(descending=True)[:k]].tolist()


# --- transcription of compute_block_length / _compute_block_length -----------------------------

def _ref_block_length(logits, predicted, start, gen_length, generated, default, delimiters, delimiter_threshold):
    remaining = gen_length - generated
    window = min(int(0.25 * gen_length), remaining)
    tokens = predicted[0, start:start + window]
    hit = torch.isin(tokens, torch.tensor(delimiters))
    if not hit.any():
        return min(default, remaining)
    pos = start + hit.nonzero().squeeze(-1)
    conf = torch.exp(logits[0, pos, predicted[0, pos]] - torch.logsumexp(logits[0, pos, :], dim=-1))
    best, i = conf.max(dim=0)
    return int(pos[i]) - start + 1 if best.item() >= delimiter_threshold else min(default, remaining)


# --- transcription of llada/generate_adablock.py (T = 0) ----------------------------------------

def _ref_transfer(logits, predicted, mask_index, x, threshold):
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = p.gather(-1, predicted[..., None]).squeeze(-1)
    x0 = torch.where(mask_index, predicted, x)
    confidence = torch.where(mask_index, x0_p, torch.tensor(torch.finfo(x0_p.dtype).min, dtype=x0_p.dtype))
    transfer = mask_index & (confidence >= threshold)
    force = torch.zeros_like(transfer).scatter_(1, confidence.argmax(dim=1, keepdim=True), True)
    return x0, (transfer | force) & mask_index


def _ref_llada_adablock(model, prompt, gen_length, init_block_length, mask_id, threshold, delimiters,
                        delimiter_threshold, cache):
    """The three ``generate_adablock*`` functions in one (they differ in the calls after the first)."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt
    generated, history = 0, []
    while generated < gen_length:
        out = model(x, use_cache=cache != "none")
        logits = out.logits
        predicted = logits.argmax(dim=-1)
        start = prompt.shape[1] + generated
        length = _ref_block_length(logits, predicted, start, gen_length, generated, init_block_length,
                                   delimiters, delimiter_threshold)
        history.append(length)
        end = start + length
        generated += length
        mask_index = x == mask_id
        mask_index[:, end:] = 0
        x0, transfer = _ref_transfer(logits, predicted, mask_index, x, threshold)
        x[transfer] = x0[transfer]
        if cache == "prefix":
            past = out.past_key_values.sliced(start)
        elif cache == "dual":
            past = out.past_key_values
            replace = torch.zeros_like(x, dtype=torch.bool)
            replace[:, start:end] = 1
        while (x[:, start:end] == mask_id).sum():
            if cache == "none":
                mask_index = x == mask_id
                mask_index[:, end:] = 0
                logits = model(x).logits
                x0, transfer = _ref_transfer(logits, logits.argmax(-1), mask_index, x, threshold)
                x[transfer] = x0[transfer]
            elif cache == "prefix":
                mask_index = x[:, start:] == mask_id
                mask_index[:, length:] = 0
                logits = model(x[:, start:], past_key_values=past, use_cache=True).logits
                x0, transfer = _ref_transfer(logits, logits.argmax(-1), mask_index, x[:, start:], threshold)
                x[:, start:][transfer] = x0[transfer]
            else:
                mask_index = x[:, start:end] == mask_id
                logits = model(x[:, start:end], past_key_values=past, use_cache=True, replace_position=replace).logits
                x0, transfer = _ref_transfer(logits, logits.argmax(-1), mask_index, x[:, start:end], threshold)
                x[:, start:end][transfer] = x0[transfer]
    return x, history


# --- transcription of dream/model/generation_utils_adablock.py (T = 0) ---------------------------

def _ref_dream_threshold(logits, mask_index, region, masks_left, mask_token_id, threshold):
    """``_confidence_threshold_sample``: ``region`` (x, or the block's view of it) is written in place."""
    confidence, x0 = torch.softmax(logits[mask_index], dim=-1).max(dim=-1)
    x_ = torch.full_like(region, mask_token_id)
    full_confidence = torch.full_like(region, -torch.inf, dtype=logits.dtype)
    x_[mask_index] = x0
    full_confidence[mask_index] = confidence
    selected, select_index = torch.topk(full_confidence, masks_left)
    transfer = torch.zeros_like(x_, dtype=torch.bool)
    transfer[0, select_index[0]] = True
    for k in range(1, masks_left):
        if selected[0, k] < threshold:
            transfer[0, select_index[0, k]] = False
    region[transfer] = x_[transfer]


def _ref_dream_adablock(model, input_ids, gen_length, block_length, mask_token_id, threshold, delimiters,
                        delimiter_threshold, dual_cache):
    """``_sample_adablock`` (no cache) and ``_sample_adablock_cache`` (dual cache)."""
    shift = lambda raw: torch.cat([raw[:, :1], raw[:, :-1]], dim=1)  # noqa: E731
    x = F.pad(input_ids, (0, gen_length), value=mask_token_id)
    prompt_length, generated, history = input_ids.shape[1], 0, []
    while generated < gen_length:
        start = prompt_length + generated
        out = model(x, use_cache=dual_cache)
        logits = shift(out.logits)
        length = _ref_block_length(logits, logits.argmax(-1), start, gen_length, generated, block_length,
                                   delimiters, delimiter_threshold)
        history.append(length)
        generated += length
        end = start + length
        if dual_cache:  # mandatory decode of the block's first token
            past = out.past_key_values
            x[:, start] = torch.softmax(logits, dim=-1).max(dim=-1)[1][:, start]
            replace = torch.zeros_like(x, dtype=torch.bool)
            replace[:, start:end] = 1
        else:
            mask_index = x == mask_token_id
            mask_index[:, end:] = False
            _ref_dream_threshold(logits, mask_index, x, int((x[:, start:end] == mask_token_id).sum()),
                                 mask_token_id, threshold)
        while (x[:, start:end] == mask_token_id).sum():
            left = int((x[:, start:end] == mask_token_id).sum())
            if dual_cache:
                mask_index = x[:, start:end] == mask_token_id
                out = model(x[:, start:end], past_key_values=past, use_cache=True, replace_position=replace)
                _ref_dream_threshold(shift(out.logits), mask_index, x[:, start:end], left, mask_token_id, threshold)
            else:
                mask_index = x == mask_token_id
                mask_index[:, end:] = False
                _ref_dream_threshold(shift(model(x).logits), mask_index, x, left, mask_token_id, threshold)
    return x, history


# --- reference parity, adaptive blocks active ---------------------------------------------------

@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("gen_length,block_length,delimiter_threshold,threshold",
                         [(48, 16, 0.2, 0.9), (48, 16, 0.1, 0.5), (32, 4, 0.1, 0.9)])
def test_llada_matches_reference(llada, cache, gen_length, block_length, delimiter_threshold, threshold):
    prompts = random_prompts(llada, lengths=(7,), seed=3)
    delimiters = _common_ids(llada, prompts, 1)
    out, counting = _run(llada, prompts, gen_length=gen_length, block_length=block_length, threshold=threshold,
                         delimiter_threshold=delimiter_threshold, delimiter_ids=delimiters, cache=cache)
    ref = ReferenceModel(llada)
    want, history = _ref_llada_adablock(ref, torch.tensor(prompts), gen_length, block_length, llada.spec.mask_id,
                                        threshold, delimiters, delimiter_threshold, cache)
    assert history != _fixed(gen_length, block_length), "the delimiter rule should change some block"
    assert out.info["block_lengths"] == history
    assert torch.equal(out.sequences, want)
    assert counting.nfe == ref.nfe


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("gen_length,block_length,delimiter_threshold,n_ids",
                         [(48, 16, 0.1, 3), (48, 16, 0.3, 1), (32, 4, 0.2, 3)])
def test_dream_matches_reference(dream, cache, gen_length, block_length, delimiter_threshold, n_ids):
    prompts = random_prompts(dream, lengths=(7,), seed=3)
    delimiters = _common_ids(dream, prompts, n_ids)
    out, counting = _run(dream, prompts, gen_length=gen_length, block_length=block_length, threshold=0.9,
                         delimiter_threshold=delimiter_threshold, delimiter_ids=delimiters, cache=cache)
    ref = ReferenceModel(dream)
    want, history = _ref_dream_adablock(ref, torch.tensor(prompts), gen_length, block_length, dream.spec.mask_id,
                                        0.9, delimiters, delimiter_threshold, cache == "dual")
    assert history != _fixed(gen_length, block_length), "the delimiter rule should change some block"
    assert out.info["block_lengths"] == history
    assert torch.equal(out.sequences, want)
    assert counting.nfe == ref.nfe


# --- no delimiter can qualify: fast_dllm with the same fixed block -------------------------------

# window = int(0.25 * gen_length) <= block_length in each case, so the refresh asks for exactly
# fast_dllm's rows (the same call, the same floats; docs/samplers/adablock.md, "Equivalence")
# (window = block, window < block; and sampling, where both draw the same Gumbel noise)
EQUIVALENT = [(32, 8, 0.0), (48, 16, 0.0), (32, 8, 0.8)]


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("gen_length,block_length,temperature", EQUIVALENT)
def test_delimiter_threshold_above_one_is_fast_dllm(backbone, cache, gen_length, block_length, temperature):
    prompts = random_prompts(backbone, lengths=(6,), seed=2)
    every = list(range(backbone.spec.vocab_size))  # every window position holds a delimiter candidate
    opts = dict(gen_length=gen_length, block_length=block_length, threshold=0.7, cache=cache, temperature=temperature)
    ours, c_ours = _run(backbone, prompts, seed=5, delimiter_threshold=1.5, delimiter_ids=every, **opts)
    fast, c_fast = run_counted("fast_dllm", backbone, prompts, 5, **opts)
    assert ours.info["block_lengths"] == _fixed(gen_length, block_length)
    assert torch.equal(ours.sequences, fast.sequences)
    assert (c_ours.nfe, c_ours.token_forwards) == (c_fast.nfe, c_fast.token_forwards)


@pytest.mark.parametrize("cache", CACHES)
def test_a_window_wider_than_the_block_falls_back_to_fixed_blocks(backbone, cache):
    """window 16 > block 8: the refresh returns more rows than fast_dllm's (a differently shaped head call),
    so only the block structure is asserted here, not bit-for-bit agreement with fast_dllm."""
    prompts = random_prompts(backbone, lengths=(6,), seed=2)
    out, _ = _run(backbone, prompts, gen_length=64, block_length=8, cache=cache, delimiter_threshold=1.5,
                  delimiter_ids=list(range(backbone.spec.vocab_size)))
    assert out.info["block_lengths"] == [8] * 8 and (out.tokens != backbone.spec.mask_id).all()


def _prompt(tiny, task, i):
    prob = synthetic.test_problems(task)[i]
    return prob, [chat_prompt_ids(tiny.tokenizer, prob.prompt)]


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("task,i", [("arith", 2), ("listops", 3)])
def test_embedded_model_fixed_blocks_are_fast_dllm(tiny, cache, task, i):
    _, prompts = _prompt(tiny, task, i)
    for gen_length in (64, 128):
        opts = dict(gen_length=gen_length, block_length=32, threshold=0.9, cache=cache)
        ours, c_ours = _run(tiny, prompts, delimiter_threshold=1.5, **opts)  # the tokenizer's delimiters
        fast, c_fast = run_counted("fast_dllm", tiny, prompts, 0, **opts)
        assert ours.info["block_lengths"] == _fixed(gen_length, 32)
        assert torch.equal(ours.sequences, fast.sequences), gen_length
        assert c_ours.nfe == c_fast.nfe


# --- the delimiter rule itself ------------------------------------------------------------------

DELIM = 7  # an ordinary id of the random vocabulary, named the delimiter (random backbones have no tokenizer)


class _DelimiterAt(LogitsHook):
    """Every row predicting absolute position p in ``probs`` becomes a distribution whose argmax is the
    delimiter, with probability ``probs[p]`` (the rest spread evenly over the vocabulary)."""

    def __init__(self, bb, probs):
        super().__init__(bb)
        self.probs = probs

    def adjust(self, logits, ids, positions, rows):
        target = positions.gather(1, rows)
        V = logits.shape[-1]
        for p, prob in self.probs.items():
            row = torch.full((V,), math.log((1 - prob) / (V - 1)), dtype=logits.dtype)
            row[DELIM] = math.log(prob)
            logits = torch.where((target == p)[..., None], row, logits)
        return logits


def _at(bb, P, probs):
    """The hook with generated indices (``probs`` keys) turned into absolute positions (prompt length P)."""
    return _DelimiterAt(bb, {P + i: p for i, p in probs.items()})


@pytest.mark.parametrize("cache", CACHES)
def test_a_confident_delimiter_ends_the_block_right_after_it(backbone, cache):
    P = 6
    prompts = random_prompts(backbone, lengths=(P,), seed=1)
    seen = []

    class _Spy(_DelimiterAt):
        def adjust(self, logits, ids, positions, rows):
            seen.append((int(positions[0, 0]), ids.shape[1]))
            return super().adjust(logits, ids, positions, rows)

    # gen 48, block 16: window 12; a delimiter at generated index 5 with probability 0.9
    out, _ = _run(_Spy(backbone, {P + 5: 0.9}), prompts, gen_length=48, block_length=16, cache=cache,
                  delimiter_threshold=0.5, delimiter_ids=[DELIM])
    assert out.info["block_lengths"] == [6, 16, 16, 10]
    assert int(out.tokens[0, 5]) == DELIM
    if cache == "dual":  # the block's steps run on the chosen block only: 6 columns (Dream: 6, by index)
        assert seen[1] == (P, 6)


@pytest.mark.parametrize("first,second,length", [(0.6, 0.95, 9), (0.95, 0.6, 4)])
def test_the_most_confident_delimiter_wins(backbone, first, second, length):
    P = 6
    prompts = random_prompts(backbone, lengths=(P,), seed=1)
    out, _ = _run(_at(backbone, P, {3: first, 8: second}), prompts, gen_length=48, block_length=16,
                  delimiter_threshold=0.5, delimiter_ids=[DELIM])
    assert out.info["block_lengths"][0] == length


def test_a_delimiter_below_the_threshold_does_not_end_the_block(backbone):
    P = 6
    prompts = random_prompts(backbone, lengths=(P,), seed=1)
    bb = _at(backbone, P, {5: 0.4})
    opts = dict(gen_length=48, block_length=16, delimiter_ids=[DELIM])
    assert _run(bb, prompts, delimiter_threshold=0.5, **opts)[0].info["block_lengths"] == [16, 16, 16]
    assert _run(bb, prompts, delimiter_threshold=0.3, **opts)[0].info["block_lengths"] == [6, 16, 16, 10]
    # null: the official scripts' threshold per family, 0.3 for LLaDA (0.4 qualifies), 0.5 for Dream (it does not)
    auto = _run(bb, prompts, **opts)[0].info["block_lengths"]
    assert auto == ([6, 16, 16, 10] if backbone.spec.family == "llada" else [16, 16, 16])


def test_a_delimiter_beyond_the_window_is_ignored(backbone):
    P = 6
    prompts = random_prompts(backbone, lengths=(P,), seed=1)
    bb = _at(backbone, P, {12: 0.99})  # gen 48: the window is generated indices 0..11
    opts = dict(gen_length=48, block_length=16, delimiter_threshold=0.5, delimiter_ids=[DELIM])
    assert _run(bb, prompts, **opts)[0].info["block_lengths"] == [16, 16, 16]
    assert _run(bb, prompts, window_fraction=0.5, **opts)[0].info["block_lengths"] == [13, 16, 16, 3]


@pytest.mark.parametrize("cache", CACHES)
def test_the_last_block_is_capped_by_what_remains(backbone, cache):
    P = 6
    prompts = random_prompts(backbone, lengths=(P,), seed=1)
    opts = dict(gen_length=40, block_length=16, cache=cache, delimiter_threshold=0.5, delimiter_ids=[DELIM])
    plain, _ = _run(backbone, prompts, **opts)  # block 16 need not divide the budget
    assert plain.info["block_lengths"] == [16, 16, 8]
    # a delimiter at index 1 shifts the grid: the last window and block hold only the 6 positions left
    shifted, _ = _run(_at(backbone, P, {1: 0.9}), prompts, **opts)
    assert shifted.info["block_lengths"] == [2, 16, 16, 6]
    for out in (plain, shifted):
        assert sum(out.info["block_lengths"]) == 40 and (out.tokens != backbone.spec.mask_id).all()


@pytest.mark.parametrize("cache", CACHES)
def test_block_sizing_costs_no_forward(backbone, cache):
    """threshold > 1 commits one token per step, so NFE = gen_length: the refresh that sizes the block
    is the block's first step, whatever the block lengths."""
    P = 6
    prompts = random_prompts(backbone, lengths=(P,), seed=1)
    out, counting = _run(_at(backbone, P, {2: 0.9, 10: 0.9}), prompts, gen_length=32, block_length=16,
                         threshold=1.01, cache=cache, delimiter_threshold=0.5, delimiter_ids=[DELIM])
    assert out.info["block_lengths"] == [3, 8, 16, 5]  # window 8: [0, 8) then [3, 11)
    assert counting.nfe == 32


def test_delimiter_block_length_rule():
    D = torch.tensor([3])
    probs = torch.tensor([[[.1, .6, .1, .1, .1],     # not a delimiter
                           [.1, .1, .1, .6, .1],     # delimiter, 0.6
                           [.05, .05, .05, .8, .05],  # delimiter, 0.8: the best
                           [.2, .2, .2, .2, .2]]])   # tie: argmax 0, not a delimiter
    logits = probs.log()
    proposal = logits.argmax(-1)
    assert delimiter_block_length(logits, proposal, D, 16, 0.7).tolist() == [3]
    assert delimiter_block_length(logits, proposal, D, 16, 0.81).tolist() == [16]
    assert delimiter_block_length(logits, proposal, torch.tensor([], dtype=torch.long), 16, 0.0).tolist() == [16]
    tie = torch.tensor([[[.1, .1, .1, .6, .1]] * 2]).log()
    assert delimiter_block_length(tie, tie.argmax(-1), D, 16, 0.5).tolist() == [1]  # ties: the lower position


# --- the embedded model: delimiters from its tokenizer -------------------------------------------

def test_delimiters_come_from_the_tokenizer(tiny):
    sampler = build_sampler("adablock")
    ids = sampler.delimiters(tiny)
    assert ids and ids == delimiter_set(tiny, None)
    assert all("\n" in tiny.tokenizer.decode([i]) for i in ids)
    assert build_sampler("adablock", delimiter_ids=[9, 4]).delimiters(tiny) == {4, 9}
    assert build_sampler("adablock").delimiters(random_backbone("llada")) == frozenset()  # no tokenizer


@pytest.mark.parametrize("task,i", [("arith", 2), ("listops", 3)])
def test_embedded_model_blocks_end_at_line_breaks(tiny, task, i):
    prob, prompts = _prompt(tiny, task, i)
    newline = build_sampler("adablock").delimiters(tiny)
    texts = set()
    for cache in CACHES:
        out, _ = _run(tiny, prompts, gen_length=128, cache=cache)
        lengths, row = out.info["block_lengths"], out.tokens[0].tolist()
        assert sum(lengths) == 128 and lengths != _fixed(128, 32)
        ends = [sum(lengths[:k + 1]) for k in range(len(lengths))]
        cut = first_eos_cut(out.tokens, tiny.spec.eos_ids)[0]
        # adapted blocks (shorter or longer than the fallback) inside the answer; past its end the
        # model's predicted line breaks may be replaced by EOS before they are committed
        adapted = [e for e, n, fb in zip(ends, lengths, [min(32, 128 - s) for s in [0] + ends[:-1]])
                   if n != fb and e <= len(cut)]
        assert len(adapted) >= 3 and all(row[e - 1] in newline for e in adapted)  # each closes a line
        text = tiny.tokenizer.decode([t for t in cut if t not in tiny.spec.eos_ids], skip_special_tokens=True)
        assert synthetic.score(prob, text), (cache, text)
        texts.add(text)
    assert len(texts) == 1


# --- configuration ----------------------------------------------------------------------------

def test_defaults_are_the_official_scripts():
    cfg = AdaBlockConfig(gen_length=512)
    assert (cfg.block_length, cfg.threshold, cfg.window_fraction, cfg.cache) == (32, 0.9, 0.25, "dual")
    assert cfg.delimiter_threshold is None and cfg.delimiter_ids is None and cfg.temperature == 0.0
    assert (cfg.delimiter_threshold_for("llada"), cfg.delimiter_threshold_for("dream")) == (0.3, 0.5)
    assert AdaBlockConfig(delimiter_threshold=0.7).delimiter_threshold_for("dream") == 0.7
    assert cfg.first_after_refresh("dream") and not cfg.first_after_refresh("llada")
    assert not AdaBlockConfig(cache="none").first_after_refresh("dream")


@pytest.mark.parametrize("opts,match", [
    (dict(cache="full"), r"cache='full' is not one of none, prefix, dual"),
    (dict(block_length=0), r"block_length=0 must be a positive integer"),
    (dict(block_length=True), r"block_length.*True"),
    (dict(threshold=-0.1), r"threshold=-0.1"),
    (dict(threshold=float("nan")), r"threshold=nan"),
    (dict(delimiter_threshold=-1.0), r"delimiter_threshold=-1.0 must be >= 0"),
    (dict(window_fraction=1.5), r"window_fraction=1.5 must lie in \[0, 1\]"),
    (dict(delimiter_ids=[3, -1]), r"delimiter_ids=\[3, -1\] must be a list of non-negative token ids"),
    (dict(delimiter_ids="198"), r"delimiter_ids='198'"),
    (dict(gen_length=0), r"gen_length"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        AdaBlockConfig(**opts)
    with pytest.raises(ValueError, match=match):
        build_sampler("adablock", **opts)
