"""Selection rules on hand-computed tensors (asynclane.rules)."""
import math

import pytest
import torch

from asynclane import rules

INF = float("inf")


def _logits_from_probs(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()[None]  # (1, L, V)


# ----------------------------------------------------------------------------- confidence

def test_confidence_prob_is_softmax_prob_of_the_given_token():
    logits = _logits_from_probs([0.25, 0.75], [0.6, 0.4])
    conf = rules.confidence_prob(logits, torch.tensor([[1, 1]]))
    torch.testing.assert_close(conf, torch.tensor([[0.75, 0.4]], dtype=torch.float64))


def test_confidence_prob_dtype_and_no_mutation():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    before = logits.clone()
    conf = rules.confidence_prob(logits, torch.tensor([[0]]), dtype=torch.float64)
    assert conf.dtype == torch.float64 and torch.equal(logits, before)
    assert conf.item() == pytest.approx(0.25)


def test_confidence_neg_entropy_uniform_and_one_hot():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [5.0, -INF, -INF, -INF]]])
    ne = rules.confidence_neg_entropy(logits)
    assert not torch.isnan(ne).any()
    torch.testing.assert_close(ne, torch.tensor([[-math.log(4.0), 0.0]]))


def test_random_confidence_uses_the_generator_only():
    a = rules.random_confidence((2, 3), torch.Generator().manual_seed(5))
    b = rules.random_confidence((2, 3), torch.Generator().manual_seed(5))
    assert a.shape == (2, 3) and a.dtype == torch.float32 and torch.equal(a, b)
    assert ((a >= 0) & (a < 1)).all()


# ----------------------------------------------------------------------------- gumbel argmax

def test_gumbel_argmax_at_zero_temperature_is_argmax_without_rng():
    logits = torch.tensor([[[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]]])
    rng = torch.Generator().manual_seed(0)
    state = rng.get_state()
    assert rules.gumbel_argmax(logits, 0.0, rng).tolist() == [[1, 0]]
    assert torch.equal(rng.get_state(), state)  # no draw at T = 0
    assert rules.gumbel_argmax(logits, 0.0, None).tolist() == [[1, 0]]


def test_gumbel_argmax_samples_the_softmax_at_temperature_one():
    logits = torch.tensor([0.2, 0.8]).log().expand(1, 4000, 2)
    draws = rules.gumbel_argmax(logits, 1.0, torch.Generator().manual_seed(0))
    assert draws.dtype == torch.long and draws.shape == (1, 4000)
    assert draws.float().mean().item() == pytest.approx(0.8, abs=0.03)


def test_gumbel_argmax_low_temperature_sharpens_and_is_seeded():
    logits = torch.tensor([0.4, 0.6]).log().expand(1, 2000, 2)
    cold = rules.gumbel_argmax(logits, 0.05, torch.Generator().manual_seed(1))
    assert cold.float().mean().item() > 0.99  # p(1) = 0.6^20 / (0.4^20 + 0.6^20) ~ 1
    again = rules.gumbel_argmax(logits, 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(cold, again)
    with pytest.raises(ValueError, match="Generator"):
        rules.gumbel_argmax(logits, 1.0, None)


# ----------------------------------------------------------------------------- schedule

def test_uniform_transfer_counts_remainder_goes_to_first_steps():
    is_masked = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    counts = rules.uniform_transfer_counts(is_masked, 3)
    assert counts.tolist() == [[2, 2, 1], [1, 1, 1], [1, 1, 0]]
    assert counts.dtype == torch.int64
    assert rules.uniform_transfer_counts(is_masked[2:], 4).tolist() == [[1, 1, 0, 0]]
    with pytest.raises(ValueError, match="steps"):
        rules.uniform_transfer_counts(is_masked, 0)


# ----------------------------------------------------------------------------- restriction

def test_restrict_confidence_to_mask_and_block():
    score = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=torch.float64)
    allowed = torch.tensor([[True, False, True, True, True]])
    out = rules.restrict_confidence(score, allowed, lo=1, hi=4)
    assert out.tolist() == [[-INF, -INF, 0.3, 0.4, -INF]]
    assert rules.restrict_confidence(score, allowed).tolist() == [[0.1, -INF, 0.3, 0.4, 0.5]]


# ----------------------------------------------------------------------------- commit policies

def test_commit_topk_per_row_k_and_eligibility():
    score = torch.tensor([[0.1, 0.9, -INF, 0.5], [0.3, -INF, 0.2, 0.7]])
    out = rules.commit_topk(score, torch.tensor([2, 1]))
    assert out.tolist() == [[False, True, False, True], [False, False, False, True]]
    assert rules.commit_topk(score, 10).tolist() == [[True, True, False, True], [True, False, True, True]]
    assert not rules.commit_topk(score, 0).any()


def test_commit_topk_ties_break_to_lower_index():
    score = torch.tensor([[0.5, 0.7, 0.5, 0.5]])
    assert rules.commit_topk(score, 2).tolist() == [[True, True, False, False]]


def test_commit_threshold_keeps_ties_and_at_least_one():
    score = torch.tensor([[0.95, 0.2, 0.9, -INF], [0.3, 0.5, 0.1, -INF], [-INF, -INF, -INF, -INF]])
    out = rules.commit_threshold(score, 0.9)
    assert out.tolist() == [[True, False, True, False],   # 0.9 == threshold passes
                            [False, True, False, False],  # none pass: the single best
                            [False, False, False, False]]  # nothing eligible


def test_commit_factor_longest_passing_prefix():
    # factor 1: rank n >= 2 needs c >= 1 - 1/(n+1): 0.667, 0.75, 0.8, ...
    score = torch.tensor([[0.5, 0.74, 0.7, 0.9, -INF]])
    # ranks: 0.9 keep, 0.74 >= .667 keep, 0.7 < .75 stop (0.5 is not looked at)
    assert rules.commit_factor(score, 1.0).tolist() == [[False, True, False, True, False]]
    # a low best is still committed; nothing eligible commits nothing
    assert rules.commit_factor(torch.tensor([[0.1, 0.05]]), 1.0).tolist() == [[True, False]]
    assert not rules.commit_factor(torch.full((1, 3), -INF), 1.0).any()


def test_commit_factor_equality_passes():
    # factor 1.5, rank 2: 1 - 1.5/3 = 0.5 exactly; (n+1)(1-c) = 1.5 <= factor
    assert rules.commit_factor(torch.tensor([[0.9, 0.5]]), 1.5).tolist() == [[True, True]]
    assert rules.commit_factor(torch.tensor([[0.9, 0.49]]), 1.5).tolist() == [[True, False]]


def test_commit_factor_last_rank_quirk():
    score = torch.tensor([[0.99, 0.9, 0.7, -INF]])  # rank 3 fails (0.7 < 0.75) and is the last eligible
    assert rules.commit_factor(score, 1.0).tolist() == [[True, True, False, False]]
    assert rules.commit_factor(score, 1.0, last_rank_quirk=True).tolist() == [[True, True, True, False]]
    # failing before the last rank: the quirk changes nothing; single eligible: committed
    early = torch.tensor([[0.99, 0.6, 0.55, -INF]])
    assert rules.commit_factor(early, 1.0, last_rank_quirk=True).tolist() == [[True, False, False, False]]
    assert rules.commit_factor(torch.tensor([[-INF, 0.2]]), 1.0, last_rank_quirk=True).tolist() == [[False, True]]


def test_rules_do_not_mutate_inputs():
    score = torch.tensor([[0.5, 0.74, 0.7, 0.9, -INF]])
    before = score.clone()
    rules.commit_factor(score, 1.0, last_rank_quirk=True)
    rules.commit_threshold(score, 0.8)
    rules.commit_topk(score, 2)
    rules.restrict_confidence(score, score > 0.6, 0, 3)
    assert torch.equal(score, before)


# ----------------------------------------------------------------------------- Dream reference rules

def test_filter_top_p_keeps_the_smallest_nucleus_and_the_first_token():
    logits = _logits_from_probs([0.5, 0.3, 0.15, 0.05]).float()
    low = torch.finfo(torch.float32).min
    # mass before each token: 0, .5, .8, .95 -> with top_p .7 the third token (mass .8 before it) goes
    assert rules.filter_top_p(logits, 0.7)[0, 0].tolist()[2:] == [low, low]
    assert rules.filter_top_p(logits, 0.7)[0, 0, :2].tolist() == logits[0, 0, :2].tolist()
    assert rules.filter_top_p(logits, 0.01)[0, 0].tolist()[1:] == [low] * 3  # first token always kept
    unsorted = logits[..., [2, 0, 3, 1]]  # positions do not matter
    assert rules.filter_top_p(unsorted, 0.7)[0, 0].tolist() == [low, unsorted[0, 0, 1].item(), low,
                                                                unsorted[0, 0, 3].item()]


def test_filter_top_k_keeps_ties_at_the_cut():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    low = torch.finfo(torch.float32).min
    assert rules.filter_top_k(logits, 2).tolist() == [[low, 3.0, 2.0, 2.0, low]]
    assert torch.equal(rules.filter_top_k(logits, 99), logits)


def test_categorical_sample_equals_the_distribution_with_the_same_seed():
    probs = torch.softmax(torch.randn(6, 9, generator=torch.Generator().manual_seed(0)), -1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        want = torch.distributions.Categorical(probs=probs).sample()
    assert torch.equal(rules.categorical_sample(probs, torch.Generator().manual_seed(4)), want)


def test_dream_sample_tokens_measures_at_zero_temperature():
    logits = _logits_from_probs([0.6, 0.3, 0.1], [0.2, 0.2, 0.6])[0].float()
    conf, tok = rules.dream_sample_tokens(logits, 0.0, None, None, None)
    assert tok.tolist() == [0, 2] and conf.tolist() == pytest.approx([0.6, 0.6])
    conf, _ = rules.dream_sample_tokens(logits, 0.0, None, None, None, measure="margin")
    assert conf.tolist() == pytest.approx([0.3, 0.4])
    conf, _ = rules.dream_sample_tokens(logits, 0.0, None, None, None, measure="neg_entropy")
    ent = [sum(p * math.log(p + 1e-10) for p in row) for row in ([0.6, 0.3, 0.1], [0.2, 0.2, 0.6])]
    assert conf.tolist() == pytest.approx(ent, abs=1e-6)
    # top-k 1 makes the argmax certain: the filter changes the confidence even at T = 0
    conf, tok = rules.dream_sample_tokens(logits, 0.0, None, 1, None)
    assert tok.tolist() == [0, 2] and conf.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="measure='bogus'"):
        rules.dream_sample_tokens(logits, 0.0, None, None, None, measure="bogus")


def test_dream_sample_tokens_samples_with_the_generator_and_falls_back_on_nan():
    logits = torch.tensor([0.2, 0.8]).log().expand(3000, 2)
    conf, tok = rules.dream_sample_tokens(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    assert tok.float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert torch.allclose(conf, torch.where(tok == 1, 0.8, 0.2))
    nan = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    rng = torch.Generator().manual_seed(0)
    state = rng.get_state()
    _, tok = rules.dream_sample_tokens(nan, 1.0, None, None, rng)  # the reference's argmax fallback
    assert tok.shape == (2,) and torch.equal(rng.get_state(), state)


def test_dream_schedule_first_step_commits_zero_with_steps_equal_to_masks():
    ts = rules.dream_timesteps(256, 1e-3)
    left, counts = 256, []
    for i in range(256):
        is_masked = (torch.arange(256) < left)[None]
        counts.append(rules.dream_transfer_count(is_masked, ts[i], ts[i + 1], i == 255))
        left -= counts[-1]
    assert counts[0] == 0 and counts[-1] == 2 and set(counts[1:-1]) == {1} and left == 0
    # the batch-mean count: every row commits the same number
    two = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert rules.dream_transfer_count(two, torch.tensor(1.0), torch.tensor(0.5), False) == 1  # int(3 * .5)
    assert rules.dream_transfer_count(two, torch.tensor(1.0), torch.tensor(0.5), True) == 3
    with pytest.raises(ValueError, match="steps"):
        rules.dream_timesteps(0, 1e-3)


def test_dream_origin_fire_probability_and_last_step():
    fire = rules.dream_origin_fire(4000, torch.tensor(1.0), torch.tensor(0.75), False, torch.Generator().manual_seed(0))
    assert fire.dtype == torch.bool and fire.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert rules.dream_origin_fire(50, torch.tensor(1.0), torch.tensor(1.0), True, torch.Generator()).all()


def test_commit_sampled_draws_k_eligible_positions():
    score = torch.tensor([[0.0, 5.0, -INF, 1.0], [2.0, -INF, -INF, 0.0]])
    out = rules.commit_sampled(score, 2, 0.5, torch.Generator().manual_seed(0))
    assert out.sum(-1).tolist() == [2, 2] and not out[:, 2].any() and not out[1, 1]
    cold = rules.commit_sampled(score, 1, 1e-3, torch.Generator().manual_seed(1))  # ~ top-1
    assert cold.tolist() == [[False, True, False, False], [True, False, False, False]]
    assert not rules.commit_sampled(score, 0, 1.0, torch.Generator()).any()


def test_finished_at_eos_needs_everything_before_decoded():
    M, E, T = 9, 7, 8  # mask, eos-like ids 7 and 8
    tokens = torch.tensor([[1, 2, E, M, M],   # decoded up to the EOS: final
                           [1, M, T, 3, M],   # a mask before the EoT: not yet
                           [1, 2, 3, 4, M],   # no EOS
                           [E, M, M, M, M],   # EOS first: final
                           [1, T, M, E, 2]])  # the first EOS-like id counts
    assert rules.finished_at_eos(tokens, M, (E, T)).tolist() == [True, False, False, True, True]


# ----------------------------------------------------------------------------- d3LLM multi-block

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
    out = rules.commit_best_in(commit, score, region)
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
    out, hit = rules.fill_after_first_eos(tokens, (E, T), F)
    assert out.tolist() == [[1, E, F, F, F], [1, M, 2, T, F], [1, 2, 3, 4, M], [1, 2, 3, 4, T]]
    assert hit.tolist() == [True, True, False, True] and torch.equal(tokens, before)


def test_commit_above_has_no_progress_guarantee_and_commit_threshold_adds_the_best():
    score = torch.tensor([[0.3, float("-inf"), 0.6, 0.95]])
    assert rules.commit_above(score, 0.9).tolist() == [[False, False, False, True]]
    assert rules.commit_above(score, 0.99).tolist() == [[False, False, False, False]]
    assert rules.commit_threshold(score, 0.99).tolist() == [[False, False, False, True]]
    # ineligible (-inf) positions never pass, even at threshold -inf
    assert rules.commit_above(score, float("-inf")).tolist() == [[True, False, True, True]]
