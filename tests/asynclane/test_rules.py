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


def test_rules_do_not_mutate_inputs():
    score = torch.tensor([[0.5, 0.74, 0.7, 0.9, -INF]])
    before = score.clone()
    rules.commit_threshold(score, 0.8)
    rules.commit_topk(score, 2)
    rules.restrict_confidence(score, score > 0.6, 0, 3)
    assert torch.equal(score, before)


# ----------------------------------------------------------------------------- Dream reference rules


# ----------------------------------------------------------------------------- d3LLM multi-block


def test_commit_above_has_no_progress_guarantee_and_commit_threshold_adds_the_best():
    score = torch.tensor([[0.3, float("-inf"), 0.6, 0.95]])
    assert rules.commit_above(score, 0.9).tolist() == [[False, False, False, True]]
    assert rules.commit_above(score, 0.99).tolist() == [[False, False, False, False]]
    assert rules.commit_threshold(score, 0.99).tolist() == [[False, False, False, True]]
    # ineligible (-inf) positions never pass, even at threshold -inf
    assert rules.commit_above(score, float("-inf")).tolist() == [[True, False, True, True]]
