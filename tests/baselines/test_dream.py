"""dream == a literal transcription of Dream's reference ``_sample``, token for token.

The transcription below (written fresh for this test) keeps the reference's *global* RNG calls
(``torch.rand``, ``torch.distributions.Categorical(...).sample()``, ``torch.multinomial``); it runs
inside ``torch.random.fork_rng`` after ``torch.manual_seed(seed)``, while the sampler gets
``torch.Generator().manual_seed(seed)``.  Equal outputs therefore also show that the injected
generator reproduces the reference's draws.  The reference model is the random backbone's raw
head output; the Dream shift is written out here (LLaDA logits are aligned already), and the mask
column is ``-inf`` (the sampler never proposes the mask: see Deviations in baselines/dream.py).
"""
import math

import pytest
import torch
import torch.distributions as dists
import torch.nn.functional as F

from asynclane.counting import CountingBackbone
from asynclane.sampler import build_sampler
from asynclane.testing import random_prompts
from baselines.dream import DreamConfig
from baselines import dream  # noqa: E402  (its own rules, tested below)



# --- literal transcription of Dream generation_utils.py (written fresh for this test) -------------

def _ref_top_p_logits(logits, top_p):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove_sorted = cumulative > top_p
    remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def _ref_top_k_logits(logits, top_k):
    top_k = min(top_k, logits.size(-1))
    remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def _ref_sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False,
                       neg_entropy=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _ref_top_p_logits(logits, top_p)
    if top_k is not None:
        logits = _ref_top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            x0 = dists.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:  # the reference's bare except
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def _ref_sample(model, input_ids, attention_mask, max_length, mask_token_id, steps, eps, alg, alg_temp,
                temperature, top_p, top_k, shift):
    x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
    if attention_mask is not None and torch.any(attention_mask == 0.0):
        attention_mask = F.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1.0)
        tok_idx = attention_mask.long().cumsum(-1) - 1
        tok_idx.masked_fill_(attention_mask == 0, 1)
        attention_mask = torch.logical_and(attention_mask.unsqueeze(1).unsqueeze(-2),
                                           attention_mask.unsqueeze(1).unsqueeze(-1))
    else:
        tok_idx = None
        attention_mask = "full"
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_token_id
        logits = model(x, attention_mask, tok_idx)
        if shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_token_id
            transfer_index_t_s = torch.rand(*x0.shape) < p_transfer
            _, x0[transfer_index_t_s] = _ref_sample_tokens(mask_logits[transfer_index_t_s], temperature=temperature,
                                                           top_p=top_p, top_k=top_k)
            x[mask_index] = x0.clone()
        else:
            if alg == "maskgit_plus":
                confidence, x0 = _ref_sample_tokens(mask_logits, temperature=temperature, top_p=top_p, top_k=top_k)
            elif alg == "topk_margin":
                confidence, x0 = _ref_sample_tokens(mask_logits, temperature=temperature, top_p=top_p, top_k=top_k,
                                                    margin_confidence=True)
            elif alg == "entropy":
                confidence, x0 = _ref_sample_tokens(mask_logits, temperature, top_p=top_p, top_k=top_k,
                                                    neg_entropy=True)
            else:
                raise RuntimeError(f"Unknown alg: {alg}")
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = F.softmax(full_confidence / alg_temp, dim=-1)
                    transfer_index = torch.multinomial(full_confidence, num_samples=number_transfer_tokens)
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_token_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x


class _RefModel:
    """``model(x, attention_mask, tok_idx).logits``: raw (unshifted) logits of the random backbone."""

    def __init__(self, bb):
        self.bb, self.inputs = bb, []

    def __call__(self, x, attention_mask, tok_idx):
        self.inputs.append(x.clone())
        positions = torch.arange(x.shape[1]).expand_as(x) if tok_idx is None else tok_idx
        key_mask = None if isinstance(attention_mask, str) else attention_mask[:, 0].any(-2)  # (B, N) visible keys
        with torch.no_grad():
            raw = self.bb.model.head(self.bb.model(x, positions, key_mask))
        return raw.index_fill(-1, torch.tensor([self.bb.spec.mask_id]), float("-inf"))


class _Recorder:
    def __init__(self, bb):
        self._bb, self.inputs = bb, []

    def forward(self, ids, *args, **kwargs):
        self.inputs.append(ids.clone())
        return self._bb.forward(ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._bb, name)


def _both(bb, prompts, seed=0, **opts):
    """(harness Generation, reference buffer, harness trajectory, reference trajectory)."""
    cfg = DreamConfig(**opts)
    rec = _Recorder(bb)
    got = build_sampler("dream", **opts).generate(rec, prompts, torch.Generator().manual_seed(seed))
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[bb.spec.pad_id] * (P - len(p)) + list(p) for p in prompts])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    ref_model = _RefModel(bb)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        want = _ref_sample(ref_model, ids, attn, P + cfg.gen_length, bb.spec.mask_id, cfg.num_steps, cfg.eps,
                           cfg.alg, cfg.alg_temp, cfg.temperature, cfg.top_p, cfg.top_k,
                           shift=bb.cfg.family == "dream")
    return got, want, rec.inputs, ref_model.inputs


def _assert_same(got, want, got_traj, want_traj):
    assert torch.equal(got.sequences, want)
    assert len(got_traj) == len(want_traj)
    assert all(torch.equal(a, b) for a, b in zip(got_traj, want_traj))


@pytest.mark.parametrize("steps", [16, 8])
def test_origin_matches_reference_at_t0(backbone, steps):
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    got, want, *traj = _both(backbone, prompts, seed=11, gen_length=16, steps=steps, alg="origin")
    _assert_same(got, want, *traj)
    assert (got.tokens != backbone.spec.mask_id).all()


@pytest.mark.parametrize("opts", [
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_k=8),
])
def test_origin_matches_reference_when_sampling(backbone, opts):
    prompts = random_prompts(backbone, lengths=(6, 6), seed=4)
    got, want, *traj = _both(backbone, prompts, seed=5, gen_length=16, steps=8, alg="origin", **opts)
    _assert_same(got, want, *traj)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("gen_length,steps", [(16, 16), (16, 8), (16, 5), (24, 6)])
def test_confidence_algs_match_reference_at_t0(backbone, alg, gen_length, steps):
    prompts = random_prompts(backbone, lengths=(7, 7), seed=3)
    got, want, *traj = _both(backbone, prompts, seed=0, gen_length=gen_length, steps=steps, alg=alg)
    _assert_same(got, want, *traj)
    assert (got.tokens != backbone.spec.mask_id).all()


@pytest.mark.parametrize("opts", [
    dict(alg="entropy", temperature=0.5, top_p=0.9),
    dict(alg="maskgit_plus", temperature=1.0, top_k=8, alg_temp=0.3),
    dict(alg="topk_margin", temperature=0.8, alg_temp=0.5),
    dict(alg="entropy", top_p=0.5),  # filters change the confidence even at T = 0
])
def test_confidence_algs_match_reference_when_sampling(backbone, opts):
    prompts = random_prompts(backbone, lengths=(6, 6), seed=8)
    got, want, *traj = _both(backbone, prompts, seed=2, gen_length=16, steps=8, **opts)
    _assert_same(got, want, *traj)


@pytest.mark.parametrize("alg", ["origin", "entropy"])
def test_left_padded_batch_matches_reference(backbone, alg):
    prompts = random_prompts(backbone, lengths=(4, 9), seed=6)
    got, want, *traj = _both(backbone, prompts, seed=7, gen_length=16, steps=8, alg=alg, temperature=0.6)
    _assert_same(got, want, *traj)
    assert got.prompt_length == 9


def test_nfe_is_steps_and_quota_follows_the_schedule(backbone):
    """steps == gen_length: the first step commits 0 tokens and the last 2 (float32 rounding)."""
    rec = _Recorder(backbone)
    counting = CountingBackbone(rec)
    prompts = random_prompts(backbone, lengths=(5,), seed=9)
    out = build_sampler("dream", gen_length=16).generate(counting, prompts, torch.Generator())
    assert counting.nfe == 16 and len(rec.inputs) == 16
    masks = [int((ids == backbone.spec.mask_id).sum()) for ids in rec.inputs + [out.sequences]]
    commits = [a - b for a, b in zip(masks, masks[1:])]
    assert commits == [0] + [1] * 14 + [2]


def test_mask_is_never_proposed(backbone):
    class _MaskLover(_Recorder):  # the mask id would win every argmax
        def forward(self, ids, *args, **kwargs):
            logits = super().forward(ids, *args, **kwargs)
            return logits.index_fill(-1, torch.tensor([self._bb.spec.mask_id]), 50.0)

    prompts = random_prompts(backbone, lengths=(5,), seed=1)
    for opts in (dict(), dict(alg="origin", temperature=1.0)):
        out = build_sampler("dream", gen_length=16, steps=4, **opts).generate(
            _MaskLover(backbone), prompts, torch.Generator().manual_seed(0))
        assert (out.tokens != backbone.spec.mask_id).all()


def test_defaults():
    cfg = DreamConfig(gen_length=64)
    assert cfg.steps is None and cfg.num_steps == 64 and cfg.alg == "entropy" and cfg.eps == 1e-3
    assert cfg.temperature == 0.0 and cfg.top_p is None and cfg.top_k is None and cfg.alg_temp is None


@pytest.mark.parametrize("opts,match", [
    (dict(alg="confidence"), r"alg='confidence'.*origin, maskgit_plus, topk_margin, entropy"),
    (dict(steps=0), r"steps=0"),
    (dict(alg_temp=-0.1), r"alg_temp=-0.1"),
    (dict(eps=0.0), r"eps=0.0"),
    (dict(eps=1.5), r"eps=1.5"),
    (dict(top_p=0.0), r"top_p=0.0"),
    (dict(top_p=1.2), r"top_p=1.2"),
    (dict(top_k=0), r"top_k=0"),
    (dict(temperature=-1.0), r"temperature"),
    (dict(gen_length=0), r"gen_length"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        DreamConfig(**opts)
    with pytest.raises(ValueError, match=match):
        build_sampler("dream", **opts)


def test_schedule_rules_match_the_reference_formula():
    ts = dream.dream_timesteps(8, 1e-3)
    assert ts.dtype == torch.float32 and ts.shape == (9,) and ts[0] == 1 and abs(float(ts[-1]) - 1e-3) < 1e-9
    is_masked = torch.ones(2, 24, dtype=torch.bool)
    left, counts = 24, []
    for i in range(8):
        is_masked[:, left:] = False
        counts.append(dream.dream_transfer_count(is_masked, ts[i], ts[i + 1], i == 7))
        left -= counts[-1]
    assert counts == [2, 3, 3, 3, 3, 3, 3, 4] and left == 0


# --- the rules only this sampler uses

def _logits_from_probs(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()[None]  # (1, L, V)


INF = float("inf")


def test_filter_top_p_keeps_the_smallest_nucleus_and_the_first_token():
    logits = _logits_from_probs([0.5, 0.3, 0.15, 0.05]).float()
    low = torch.finfo(torch.float32).min
    # mass before each token: 0, .5, .8, .95 -> with top_p .7 the third token (mass .8 before it) goes
    assert dream.filter_top_p(logits, 0.7)[0, 0].tolist()[2:] == [low, low]
    assert dream.filter_top_p(logits, 0.7)[0, 0, :2].tolist() == logits[0, 0, :2].tolist()
    assert dream.filter_top_p(logits, 0.01)[0, 0].tolist()[1:] == [low] * 3  # first token always kept
    unsorted = logits[..., [2, 0, 3, 1]]  # positions do not matter
    assert dream.filter_top_p(unsorted, 0.7)[0, 0].tolist() == [low, unsorted[0, 0, 1].item(), low,
                                                                unsorted[0, 0, 3].item()]


def test_filter_top_k_keeps_ties_at_the_cut():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    low = torch.finfo(torch.float32).min
    assert dream.filter_top_k(logits, 2).tolist() == [[low, 3.0, 2.0, 2.0, low]]
    assert torch.equal(dream.filter_top_k(logits, 99), logits)


def test_categorical_sample_equals_the_distribution_with_the_same_seed():
    probs = torch.softmax(torch.randn(6, 9, generator=torch.Generator().manual_seed(0)), -1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        want = torch.distributions.Categorical(probs=probs).sample()
    assert torch.equal(dream.categorical_sample(probs, torch.Generator().manual_seed(4)), want)


def test_dream_sample_tokens_measures_at_zero_temperature():
    logits = _logits_from_probs([0.6, 0.3, 0.1], [0.2, 0.2, 0.6])[0].float()
    conf, tok = dream.dream_sample_tokens(logits, 0.0, None, None, None)
    assert tok.tolist() == [0, 2] and conf.tolist() == pytest.approx([0.6, 0.6])
    conf, _ = dream.dream_sample_tokens(logits, 0.0, None, None, None, measure="margin")
    assert conf.tolist() == pytest.approx([0.3, 0.4])
    conf, _ = dream.dream_sample_tokens(logits, 0.0, None, None, None, measure="neg_entropy")
    ent = [sum(p * math.log(p + 1e-10) for p in row) for row in ([0.6, 0.3, 0.1], [0.2, 0.2, 0.6])]
    assert conf.tolist() == pytest.approx(ent, abs=1e-6)
    # top-k 1 makes the argmax certain: the filter changes the confidence even at T = 0
    conf, tok = dream.dream_sample_tokens(logits, 0.0, None, 1, None)
    assert tok.tolist() == [0, 2] and conf.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="measure='bogus'"):
        dream.dream_sample_tokens(logits, 0.0, None, None, None, measure="bogus")


def test_dream_sample_tokens_samples_with_the_generator_and_falls_back_on_nan():
    logits = torch.tensor([0.2, 0.8]).log().expand(3000, 2)
    conf, tok = dream.dream_sample_tokens(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    assert tok.float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert torch.allclose(conf, torch.where(tok == 1, 0.8, 0.2))
    nan = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    rng = torch.Generator().manual_seed(0)
    state = rng.get_state()
    _, tok = dream.dream_sample_tokens(nan, 1.0, None, None, rng)  # the reference's argmax fallback
    assert tok.shape == (2,) and torch.equal(rng.get_state(), state)


def test_dream_schedule_first_step_commits_zero_with_steps_equal_to_masks():
    ts = dream.dream_timesteps(256, 1e-3)
    left, counts = 256, []
    for i in range(256):
        is_masked = (torch.arange(256) < left)[None]
        counts.append(dream.dream_transfer_count(is_masked, ts[i], ts[i + 1], i == 255))
        left -= counts[-1]
    assert counts[0] == 0 and counts[-1] == 2 and set(counts[1:-1]) == {1} and left == 0
    # the batch-mean count: every row commits the same number
    two = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert dream.dream_transfer_count(two, torch.tensor(1.0), torch.tensor(0.5), False) == 1  # int(3 * .5)
    assert dream.dream_transfer_count(two, torch.tensor(1.0), torch.tensor(0.5), True) == 3
    with pytest.raises(ValueError, match="steps"):
        dream.dream_timesteps(0, 1e-3)


def test_dream_origin_fire_probability_and_last_step():
    fire = dream.dream_origin_fire(4000, torch.tensor(1.0), torch.tensor(0.75), False, torch.Generator().manual_seed(0))
    assert fire.dtype == torch.bool and fire.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert dream.dream_origin_fire(50, torch.tensor(1.0), torch.tensor(1.0), True, torch.Generator()).all()


def test_commit_sampled_draws_k_eligible_positions():
    score = torch.tensor([[0.0, 5.0, -INF, 1.0], [2.0, -INF, -INF, 0.0]])
    out = dream.commit_sampled(score, 2, 0.5, torch.Generator().manual_seed(0))
    assert out.sum(-1).tolist() == [2, 2] and not out[:, 2].any() and not out[1, 1]
    cold = dream.commit_sampled(score, 1, 1e-3, torch.Generator().manual_seed(1))  # ~ top-1
    assert cold.tolist() == [[False, True, False, False], [True, False, False, False]]
    assert not dream.commit_sampled(score, 0, 1.0, torch.Generator()).any()
