"""dico (DiCo-style, reconstructed): the pure Divide / Conquer / Finalize rules on hand-made inputs,
clusters against a brute-force grow-and-merge, the factor rule per cluster against ``commit_factor``,
every step replayed on the embedded model's real logits, termination on random backbones of both
families and on the embedded model, Finalize end to end, degenerate settings, validation.

No code of the authors exists (docs/research/baselines_seeds.md §3, §8): there is no transcription
to compare against, so the rules are checked against the reconstruction's text in §3.4.
"""
import math

import pytest
import torch

from asynclane import rules
from asynclane.sampler import build_sampler
from asynclane.testing import LogitsHook, random_prompts, run_counted
from baselines.dico import (DiCoConfig, conquer, divide_and_conquer, divide_score, final_size, finalize_commit,
                            grow_clusters, proposal_margin, select_seeds, soft_nms, stability_weight,
                            trajectory_weight)
from baselines.fast_dllm import commit_factor

INF = float("inf")


def _run(bb, prompts, seed=0, **opts):
    return run_counted("dico", bb, prompts, seed, **opts)


def _runs(labels_row):
    """{label: (first, last)} of one row's labels, asserting each label is one contiguous run."""
    out = {}
    for i, k in enumerate(labels_row):
        if k < 0:
            continue
        if k in out:
            assert out[k][1] == i - 1, f"cluster {k} is not contiguous at column {i}"
            out[k] = (out[k][0], i)
        else:
            out[k] = (i, i)
    return out


def _brute_clusters(seeds_row, growable_row):
    """Host reference: grow each seed left/right over growable columns, then merge intervals that
    overlap or touch; a sorted list of (first, last)."""
    n, spans = len(seeds_row), []
    for s, is_seed in enumerate(seeds_row):
        if not is_seed:
            continue
        a = b = s
        while a - 1 >= 0 and growable_row[a - 1]:
            a -= 1
        while b + 1 < n and growable_row[b + 1]:
            b += 1
        spans.append([a, b])
    merged = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [tuple(m) for m in merged]


def _check_clusters(labels, seeds, growable):
    """Clusters are disjoint contiguous runs labelled 0.. from the left, each holding a seed, made of
    seeds and growable columns, maximal (no member or growable column next to one), and equal to the
    brute-force grow-and-merge."""
    for lab, sd, gr in zip(labels.tolist(), seeds.tolist(), growable.tolist()):
        runs = _runs(lab)
        spans = [runs[k] for k in sorted(runs)]
        assert sorted(runs) == list(range(len(runs)))
        assert spans == sorted(spans)
        for (a, b), (c, d) in zip(spans, spans[1:]):
            assert b + 1 < c, "clusters overlap or touch"
        for a, b in spans:
            assert any(sd[a:b + 1]) and all(sd[i] or gr[i] for i in range(a, b + 1))
            assert (a == 0 or not gr[a - 1]) and (b == len(lab) - 1 or not gr[b + 1])
        assert all(lab[i] >= 0 for i in range(len(lab)) if sd[i])
        assert spans == _brute_clusters(sd, gr)


# --- Divide: trajectory weight, stability, Soft-NMS, seeds ------------------------------------------

def test_trajectory_weight_decays_from_the_leftmost_mask():
    masked = torch.tensor([[0, 0, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    w = trajectory_weight(masked, 2.0)
    assert w.dtype == torch.float64
    for i in range(8):  # frontier 2 (row 0) and 0 (row 1); region length 8
        assert w[0, i].item() == pytest.approx(math.exp(-2.0 * max(0, i - 2) / 8))
        assert w[1, i].item() == pytest.approx(math.exp(-2.0 * i / 8))
    assert (w[0, :3] == 1).all()  # at and left of the frontier: max(0, i - f) = 0
    assert (trajectory_weight(masked, 0.0) == 1).all()  # decay 0: no trajectory guidance


def test_stability_weight_needs_the_last_k_argmaxes_equal():
    run = torch.tensor([[1, 2, 3, 1]])
    assert stability_weight(run, 2, 0.5).tolist() == [[0.5, 1.0, 1.0, 0.5]]
    assert stability_weight(run, 3, 0.25).tolist() == [[0.25, 0.25, 1.0, 0.25]]
    assert (stability_weight(run, 1, 0.5) == 1).all()  # k = 1: every argmax counts as stable


def test_divide_score_is_the_product_and_keeps_non_candidates_out():
    conf = torch.tensor([[0.8, -INF, 0.6]], dtype=torch.float64)
    got = divide_score(conf, torch.tensor([[1.0, 1.0, 0.5]]), torch.tensor([[1.0, 0.5, 0.25]]))
    assert got.tolist() == [[0.8, -INF, 0.6 * 0.5 * 0.25]]
    assert divide_score(conf, torch.zeros(1, 3), torch.ones(1, 3))[0, 1] == -INF  # never nan


def _soft_nms_by_hand(scores, n_seeds, sigma):
    """The greedy Soft-NMS of §3.4 on a host list (None = not pickable)."""
    s, picks = list(scores), []
    for _ in range(n_seeds):
        live = [(v, -i) for i, v in enumerate(s) if v is not None]
        if not live:
            break
        j = -max(live)[1]
        picks.append(j)
        s = [None if (i == j or v is None) else v * (1 - math.exp(-(i - j) ** 2 / (2 * sigma ** 2)))
             for i, v in enumerate(s)]
    return picks


def test_soft_nms_suppresses_near_a_seed_and_spreads_the_seeds():
    score = [0.0] * 20
    score[5], score[6], score[15] = 1.0, 0.9, 0.5
    t = torch.tensor([score])
    # sigma 4: column 6 drops to 0.9 * (1 - e^{-1/32}) = 0.028 < column 15's 0.5 * (1 - e^{-100/32}) = 0.478
    assert torch.nonzero(soft_nms(t, 2, 4.0)[0]).flatten().tolist() == [5, 15]
    # a narrow sigma hardly suppresses column 6: 0.9 * (1 - e^{-2}) = 0.78 wins
    assert torch.nonzero(soft_nms(t, 2, 0.5)[0]).flatten().tolist() == [5, 6]
    # "soft": a suppressed candidate is still picked once the others fall below it
    assert soft_nms(t, 3, 4.0)[0, 6]
    assert _soft_nms_by_hand(score, 3, 4.0)[:2] == [5, 15]


@pytest.mark.parametrize("seed", range(6))
def test_soft_nms_matches_the_greedy_rule_by_hand(seed):
    g = torch.Generator().manual_seed(seed)
    n = 24
    score = torch.rand(2, n, generator=g, dtype=torch.float64)
    score[torch.rand(2, n, generator=g) < 0.4] = -INF
    for n_seeds, sigma in [(1, 4.0), (4, 4.0), (6, 1.5), (30, 8.0)]:
        got = soft_nms(score, n_seeds, sigma)
        for r in range(2):
            row = [None if v == -INF else v for v in score[r].tolist()]
            assert sorted(_soft_nms_by_hand(row, n_seeds, sigma)) == torch.nonzero(got[r]).flatten().tolist()
        assert not (got & (score == -INF)).any()
        assert (got.sum(-1) == torch.clamp((score > -INF).sum(-1), max=n_seeds)).all()  # stops when none left


def test_soft_nms_ties_go_to_the_lower_column_and_empty_rows_pick_nothing():
    t = torch.tensor([[0.5, 0.9, 0.2, 0.9], [-INF, -INF, -INF, -INF]])
    got = soft_nms(t, 1, 4.0)
    assert got.tolist() == [[False, True, False, False], [False] * 4]


def test_trajectory_weighting_orders_the_seeds_near_the_frontier_first():
    n = 64
    masked = torch.ones(1, n, dtype=torch.bool)
    conf = torch.full((1, n), 0.1, dtype=torch.float64)
    conf[0, 10], conf[0, 30], conf[0, 50] = 0.8, 0.8, 0.9
    stable = torch.ones(1, n, dtype=torch.float64)
    # lambda 2: 0.8 e^{-20/64} = 0.585 > 0.8 e^{-60/64} = 0.313 > 0.9 e^{-100/64} = 0.189
    score = divide_score(conf, stable, trajectory_weight(masked, 2.0))
    assert torch.nonzero(select_seeds(score, conf, 0.5, 1, 4.0)[0]).flatten().tolist() == [10]
    assert _soft_nms_by_hand([v if c >= 0.5 else None for v, c in zip(score[0].tolist(), conf[0].tolist())],
                             3, 4.0) == [10, 30, 50]
    # without trajectory guidance the most confident wins, wherever it is
    flat = divide_score(conf, stable, trajectory_weight(masked, 0.0))
    assert torch.nonzero(select_seeds(flat, conf, 0.5, 1, 4.0)[0]).flatten().tolist() == [50]
    # an unstable argmax halves the score: column 10 loses to column 30 (0.29 < 0.31)
    shaky = stable.clone()
    shaky[0, 10] = 0.5
    score = divide_score(conf, shaky, trajectory_weight(masked, 2.0))
    assert torch.nonzero(select_seeds(score, conf, 0.5, 1, 4.0)[0]).flatten().tolist() == [30]


def test_seeds_need_the_seed_confidence_else_the_best_scored_candidate():
    conf = torch.tensor([[0.4, 0.6, -INF, 0.3], [0.4, 0.45, 0.3, -INF], [-INF] * 4], dtype=torch.float64)
    score = conf.clone()
    score[1, 0] = 0.9  # row 1: no conf >= 0.5; the best *score* (not conf) is the fallback seed
    got = select_seeds(score, conf, 0.5, 3, 4.0)
    assert got.tolist() == [[False, True, False, False], [True, False, False, False], [False] * 4]


# --- clusters ------------------------------------------------------------------------------------

def test_clusters_grow_over_growable_masks_and_merge_when_they_meet():
    #              0  1  2  3  4  5  6  7  8  9 10 11 12
    seeds = [[0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0]]
    grow = [[0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 1, 0]]
    labels = grow_clusters(torch.tensor(seeds, dtype=torch.bool), torch.tensor(grow, dtype=torch.bool))
    # seed 3 grows to [1, 5] and meets seed 6 (touching: merged); seed 10 grows right to 11
    assert labels.tolist() == [[-1, 0, 0, 0, 0, 0, 0, -1, -1, -1, 1, 1, -1]]
    # a lone seed with no growable neighbour is a cluster of one
    one = grow_clusters(torch.tensor([[0, 1, 0]], dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool))
    assert one.tolist() == [[-1, 0, -1]]
    # growable columns not reached from any seed stay out
    none = grow_clusters(torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool))
    assert (none == -1).all()


@pytest.mark.parametrize("seed", range(10))
def test_clusters_never_overlap_and_equal_brute_force_grow_and_merge(seed):
    g = torch.Generator().manual_seed(seed)
    B, n = 4, 40
    growable = torch.rand(B, n, generator=g) < [0.3, 0.6, 0.9, 1.0][seed % 4]
    seeds = torch.rand(B, n, generator=g) < 0.12
    seeds[0] = False  # a row without seeds: no cluster
    _check_clusters(grow_clusters(seeds, growable), seeds, growable)


# --- Conquer: the factor rule per cluster --------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("factor", [1.0, 0.5, 2.0])
def test_conquer_is_commit_factor_on_each_cluster_alone(seed, factor):
    g = torch.Generator().manual_seed(seed)
    B, n, K = 3, 32, 6
    conf = 1 - torch.rand(B, n, generator=g, dtype=torch.float64) ** 3  # many high confidences
    conf[torch.rand(B, n, generator=g) < 0.2] = -INF
    seeds = select_seeds(conf, conf, 0.5, K, 3.0)
    labels = grow_clusters(seeds, conf >= 0.7)
    got = conquer(conf, labels, K, factor)
    for r in range(B):
        want = torch.zeros(n, dtype=torch.bool)
        for k in set(labels[r].tolist()) - {-1}:
            alone = torch.where(labels[r] == k, conf[r], -INF)[None]
            want |= commit_factor(alone, factor)[0]
        assert torch.equal(got[r], want)
        # at least one commit per cluster, nothing outside the clusters
        assert not (got[r] & (labels[r] < 0)).any()
        assert all(got[r][labels[r] == k].any() for k in set(labels[r].tolist()) - {-1})


def test_conquer_counts_by_the_factor_rule_inside_a_cluster():
    # one cluster over columns 1..5; ranks 0.99 0.9 0.76 0.7 0.6: (n + 1)(1 - c) <= 1 holds for n = 1..3
    conf = torch.tensor([[0.2, 0.9, 0.99, 0.76, 0.7, 0.6, 0.95]], dtype=torch.float64)
    labels = torch.tensor([[-1, 0, 0, 0, 0, 0, -1]])
    assert conquer(conf, labels, 2, 1.0).tolist() == [[False, True, True, True, False, False, False]]


def test_divide_and_conquer_commits_the_seeds_with_the_factor_rule():
    cfg = DiCoConfig(gen_length=16)
    masked = torch.ones(1, 16, dtype=torch.bool)
    conf = torch.full((1, 16), 0.3, dtype=torch.float64)
    conf[0, 4], conf[0, 5], conf[0, 6] = 0.55, 0.95, 0.8  # seed 4 (score 0.55 * W) vs 5 (0.95 * W) ...
    run = torch.full((1, 16), 2)
    run[0, 5] = 1  # 5 unstable: 0.95 * 0.5 < 0.55 * W(4); so 4 is the first seed
    commit, seeds, labels = divide_and_conquer(conf, run, masked, cfg)
    assert seeds[0, 4] and labels[0, 4:7].tolist() == [0, 0, 0] and labels[0, 3] == -1 and labels[0, 7] == -1
    # the factor rule on the cluster commits 0.95 and 0.8 (3 * 0.2 <= 1), not 0.55 (4 * 0.45 > 1); the seed joins
    want = commit_factor(torch.where(labels == 0, conf, -INF), 1.0) | seeds
    assert torch.equal(commit, want) and commit[0, 4:7].all()
    plain, _, _ = divide_and_conquer(conf, run, masked, DiCoConfig(gen_length=16, always_commit_seeds=False))
    assert plain[0, 5:7].all() and not plain[0, 4]


# --- Finalize --------------------------------------------------------------------------------------

def test_finalize_takes_the_best_compound_score_and_the_wide_margins():
    conf = torch.tensor([[0.6, 0.5, -INF, 0.4]], dtype=torch.float64)
    margin = torch.tensor([[0.1, 2.0, 9.0, 5.0]])
    # compound: 0.6 + s(0.1) = 1.125; 0.5 + s(2) = 1.381; 0.4 + s(5) = 1.393 -> column 3
    assert finalize_commit(conf, margin, 1.0, None).tolist() == [[False, False, False, True]]
    assert finalize_commit(conf, margin, 1.0, 3.0).tolist() == [[False, False, False, True]]
    assert finalize_commit(conf, margin, 1.0, 1.5).tolist() == [[False, True, False, True]]  # column 2 is decoded
    assert finalize_commit(conf, margin, 0.0, None).tolist() == [[True, False, False, False]]  # beta 0: confidence
    assert finalize_commit(conf, margin, 1.0, 5.0)[0, 3]  # margin == M: not > M, but still the best
    assert not finalize_commit(torch.full((1, 4), -INF), margin, 1.0, 0.0).any()


def test_proposal_margin_is_top1_minus_top2_and_excludes_the_mask():
    logits = torch.tensor([[[2.0, 5.0, 1.0, 9.0]]])  # id 3 is the mask
    free = rules.without_mask(logits, 3)
    assert proposal_margin(free, free.argmax(-1)).tolist() == [[3.0]]
    assert proposal_margin(free, torch.tensor([[0]])).tolist() == [[-3.0]]  # a sampled non-argmax: negative


class _Confidences(LogitsHook):
    """Every call: generated index i proposes token ``base + i`` with probability ``conf[i]`` and token
    ``base + 40 + i`` with ``second[i]`` (the rest spread evenly), so the margin is log(conf / second)."""

    def __init__(self, bb, P, conf, second, base=10):
        super().__init__(bb)
        self.P, self.conf, self.second, self.base = P, conf, second, base
        self.calls = []

    def adjust(self, logits, ids, positions, rows):
        self.calls.append(ids.clone())
        V = logits.shape[-1]
        out = logits.clone()
        for k, col in enumerate(rows[0].tolist()):
            i = col - self.P
            rest = (1 - self.conf[i] - self.second[i]) / (V - 2)
            row = torch.full((V,), rest, dtype=torch.float64)
            row[self.base + i], row[self.base + 40 + i] = self.conf[i], self.second[i]
            out[:, k] = row.log().to(logits.dtype)
        return out


@pytest.mark.parametrize("family_fixture", ["llada", "dream"])
def test_finalize_decodes_the_last_masks_one_by_one_plus_the_wide_margins(request, family_fixture):
    bb = request.getfixturevalue(family_fixture)
    prompts = random_prompts(bb, lengths=(6,), seed=4)
    conf = [0.40, 0.45, 0.50, 0.55, 0.60, 0.30, 0.35, 0.42]
    second = [0.30, 0.40, 0.45, 0.002, 0.30, 0.28, 0.001, 0.41]  # margins > 3 at 3 and 6 only
    hook = _Confidences(bb, 6, conf, second)
    # all 8 masks <= R_final = 8: every step is a Finalize step
    out = build_sampler("dico", gen_length=8, final_tokens=8, final_margin=3.0).generate(hook, prompts, torch.Generator())
    order = []
    for before, after in zip(hook.calls, hook.calls[1:] + [out.sequences]):
        order.append(sorted(i for i in range(8) if before[0, 6 + i] == bb.spec.mask_id != after[0, 6 + i]))
    # compound c + sigmoid(log(c / second)) = c + c / (c + second): 3 (0.55 + 0.996) and 6 (0.35 + 0.997)
    # go first (column 3 is the best, 6 by its margin), then one per step by compound score
    compound = {i: conf[i] + conf[i] / (conf[i] + second[i]) for i in range(8)}
    rest = sorted(set(range(8)) - {3, 6}, key=lambda i: -compound[i])
    assert order == [[3, 6]] + [[i] for i in rest]
    assert out.tokens[0].tolist() == [10 + i for i in range(8)]
    assert out.info == {"divide_steps": 0, "finalize_steps": 7}
    # without the margin rule: one token per step, 8 forwards
    hook = _Confidences(bb, 6, conf, second)
    out = build_sampler("dico", gen_length=8, final_tokens=8, final_margin=None).generate(hook, prompts, torch.Generator())
    assert len(hook.calls) == 8 and (out.tokens != bb.spec.mask_id).all()


def test_final_size_is_the_larger_of_the_count_and_the_fraction():
    assert final_size(DiCoConfig(gen_length=256), 256) == pytest.approx(25.6)
    assert final_size(DiCoConfig(gen_length=64), 64) == 8
    assert final_size(DiCoConfig(gen_length=64, final_tokens=0, final_fraction=0.0), 64) == 0


# --- end to end: termination, progress, degenerate settings ---------------------------------------

class _Recorder(LogitsHook):
    def __init__(self, bb):
        super().__init__(bb)
        self.calls = []

    def adjust(self, logits, ids, positions, rows):
        self.calls.append((ids.clone(), logits.clone(), rows.clone()))
        return logits


@pytest.mark.parametrize("gen_length,opts", [
    (16, {}), (24, dict(block_length=8)), (32, dict(n_seeds=1, grow_confidence=1.0)),
    (48, dict(block_length=16, final_tokens=0, final_fraction=0.0)), (40, dict(seed_confidence=0.0, nms_sigma=1.0)),
])
@pytest.mark.parametrize("seed", range(2))
def test_every_mask_is_decoded_and_every_step_makes_progress(backbone, gen_length, opts, seed):
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=seed)
    rec = _Recorder(backbone)
    out = build_sampler("dico", gen_length=gen_length, **opts).generate(rec, prompts, torch.Generator())
    mask = backbone.spec.mask_id
    assert not (out.tokens == mask).any()
    P = out.prompt_length
    states = [ids for ids, _, _ in rec.calls] + [out.sequences]
    for (before, _, rows), after in zip(rec.calls, states[1:]):
        left_before = (before[:, P:] == mask).sum(-1)
        left_after = (after[:, P:] == mask).sum(-1)
        lo = int(rows[0, 0])  # the active block's first column
        active = (before[:, lo:lo + (opts.get("block_length") or gen_length)] == mask).any(-1)
        assert (left_after[active] < left_before[active]).all()  # every row with masks in the block commits
        assert torch.equal(after[:, :P], before[:, :P])
    assert len(rec.calls) <= gen_length


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_all_finalize_without_margin_is_one_token_per_step_fast_dllm(backbone, temperature):
    """margin_weight 0, no margin rule, Finalize from the start: the best confidence, one token per step,
    i.e. fast_dllm with no cache and a threshold above 1 (token for token, same forwards)."""
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=2)
    for gen_length, block in [(16, None), (24, 8)]:
        opts = dict(gen_length=gen_length, temperature=temperature)
        ours, c_ours = _run(backbone, prompts, seed=1, block_length=block, final_tokens=gen_length,
                            margin_weight=0.0, final_margin=None, **opts)
        ref, c_ref = run_counted("fast_dllm", backbone, prompts, 1, cache="none", threshold=1.5,
                                 block_length=block or gen_length, **opts)
        assert torch.equal(ours.sequences, ref.sequences)
        assert c_ours.nfe == c_ref.nfe == gen_length and c_ours.token_forwards == c_ref.token_forwards


@pytest.mark.parametrize("task", ["arith", "listops"])
def test_every_mask_is_decoded_on_the_embedded_model(tiny, task, tiny_prompts):
    prompts = tiny_prompts(task, (0, 1, 2))
    for gen_length, block in [(64, None), (128, None), (128, 32)]:
        out, counter = _run(tiny, prompts, gen_length=gen_length, block_length=block)
        assert not (out.tokens == tiny.spec.mask_id).any() and 1 <= counter.nfe <= gen_length
        assert out.finished.all()
        singles = [_run(tiny, [p], gen_length=gen_length, block_length=block)[0].tokens for p in prompts]
        assert torch.equal(torch.cat(singles), out.tokens)


def _replay(bb, out, calls, cfg):
    """Recompute every step from the recorded logits with the pure rules; assert the sampler committed
    exactly that, and return (divide steps, finalize steps, clusters seen, multi-token Conquer steps)."""
    mask = bb.spec.mask_id
    states = [ids for ids, _, _ in calls[1:]] + [out.sequences]
    run = last = None
    seen = {"divide": 0, "finalize": 0, "clusters": 0, "parallel": 0}
    block = None
    for (ids, logits, rows), after in zip(calls, states):
        lo, hi = int(rows[0, 0]), int(rows[0, -1]) + 1
        if block != (lo, hi):  # a new block: the argmax history restarts
            block, run, last = (lo, hi), torch.zeros(ids.shape[0], hi - lo, dtype=torch.long), None
        masked = ids[:, lo:hi] == mask
        free = rules.without_mask(logits, mask)
        argmax = free.argmax(-1)
        conf = rules.restrict_confidence(rules.confidence_prob(logits, argmax, torch.float64), masked)
        run = torch.ones_like(run) if last is None else torch.where(argmax == last, run + 1, 1)
        last = argmax
        dc, seeds, labels = divide_and_conquer(conf, run, masked, cfg)
        _check_clusters(labels, seeds, conf >= cfg.grow_confidence)
        fin = finalize_commit(conf, proposal_margin(free, argmax), cfg.margin_weight, cfg.final_margin)
        left = masked.sum(-1)
        in_final = (left <= final_size(cfg, hi - lo))[:, None]
        want = torch.where(in_final, fin, dc)
        changed = after != ids
        assert torch.equal(changed[:, lo:hi], want) and not changed[:, :lo].any() and not changed[:, hi:].any()
        assert torch.equal(after[:, lo:hi][want], argmax[want])
        seen["divide"] += int((~in_final[:, 0] & (left > 0)).sum())
        seen["finalize"] += int((in_final[:, 0] & (left > 0)).sum())
        seen["clusters"] += int((labels.amax(-1) + 1)[~in_final[:, 0]].sum())
        seen["parallel"] += int(((dc.sum(-1) > seeds.sum(-1)) & ~in_final[:, 0]).sum())
    return seen


@pytest.mark.parametrize("task,gen_length,block", [("arith", 64, None), ("listops", 128, None), ("arith", 128, 64)])
def test_every_step_commits_exactly_the_rules_on_the_embedded_model(tiny, task, gen_length, block, tiny_prompts):
    """Each step's commits equal the pure rules on that step's logits (phase chosen per row by its mask
    count); both phases occur, and Conquer commits more than its seeds (the rules are not vacuous)."""
    prompts = tiny_prompts(task, (0, 1, 3))
    cfg = DiCoConfig(gen_length=gen_length, block_length=block)
    rec = _Recorder(tiny)
    out = build_sampler("dico", gen_length=gen_length, block_length=block).generate(rec, prompts, torch.Generator())
    seen = _replay(tiny, out, rec.calls, cfg)
    assert seen["divide"] > 0 and seen["finalize"] > 0 and seen["parallel"] > 0 and seen["clusters"] > 0


@pytest.mark.parametrize("opts", [dict(), dict(n_seeds=2, nms_sigma=1.0, grow_confidence=0.9, final_margin=None),
                                  dict(block_length=16, final_tokens=4, trajectory_decay=0.0, always_commit_seeds=False)])
def test_every_step_commits_exactly_the_rules_on_random_backbones(backbone, opts):
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=5)
    cfg = DiCoConfig(gen_length=32, **opts)
    rec = _Recorder(backbone)
    out = build_sampler("dico", gen_length=32, **opts).generate(rec, prompts, torch.Generator())
    seen = _replay(backbone, out, rec.calls, cfg)
    assert seen["divide"] > 0 and seen["finalize"] > 0


# --- configuration -------------------------------------------------------------------------------

def test_defaults_are_the_specs():
    cfg = DiCoConfig(gen_length=256)
    assert cfg.block_length is None and cfg.n_seeds == 5
    assert (cfg.seed_confidence, cfg.grow_confidence, cfg.nms_sigma) == (0.5, 0.7, 4.0)
    assert (cfg.stable_steps, cfg.unstable_weight, cfg.factor, cfg.always_commit_seeds) == (2, 0.5, 1.0, True)
    assert (cfg.final_tokens, cfg.final_fraction, cfg.margin_weight) == (8, 0.1, 1.0)
    assert (cfg.trajectory_decay, cfg.final_margin) == (2.0, 3.0)  # [ours]
    assert cfg.temperature == 0.0


@pytest.mark.parametrize("opts,match", [
    (dict(gen_length=32, block_length=24), r"block_length=24 must divide gen_length=32.*\[1, 2, 4, 8, 16, 32\]"),
    (dict(gen_length=32, n_seeds=0), r"n_seeds=0 must be an integer >= 1"),
    (dict(gen_length=32, seed_confidence=1.5), r"seed_confidence=1.5 must lie in \[0, 1\]"),
    (dict(gen_length=32, seed_confidence=float("nan")), r"seed_confidence=nan"),
    (dict(gen_length=32, grow_confidence=-0.1), r"grow_confidence=-0.1 must lie in \[0, 1\]"),
    (dict(gen_length=32, nms_sigma=0.0), r"nms_sigma=0.0 must be a finite number > 0"),
    (dict(gen_length=32, nms_sigma=float("inf")), r"nms_sigma=inf"),
    (dict(gen_length=32, trajectory_decay=-1.0), r"trajectory_decay=-1.0 must be a finite number >= 0"),
    (dict(gen_length=32, stable_steps=0), r"stable_steps=0 must be an integer >= 1"),
    (dict(gen_length=32, unstable_weight=2.0), r"unstable_weight=2.0 must lie in \[0, 1\]"),
    (dict(gen_length=32, factor=0.0), r"factor=0.0 must be a finite number > 0"),
    (dict(gen_length=32, final_tokens=-1), r"final_tokens=-1 must be an integer >= 0"),
    (dict(gen_length=32, final_fraction=1.2), r"final_fraction=1.2 must lie in \[0, 1\]"),
    (dict(gen_length=32, margin_weight=-1.0), r"margin_weight=-1.0 must be a finite number >= 0"),
    (dict(gen_length=32, final_margin=-0.5), r"final_margin=-0.5 must be >= 0, or null"),
    (dict(gen_length=32, final_margin=float("nan")), r"final_margin=nan"),
    (dict(gen_length=32, temperature=-1.0), r"temperature"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        DiCoConfig(**opts)
    with pytest.raises(ValueError, match=match):
        build_sampler("dico", **opts)


def test_integer_options_refuse_other_types():
    with pytest.raises(ValueError, match=r"n_seeds=2.5 must be an integer"):
        DiCoConfig(gen_length=32, n_seeds=2.5)
    with pytest.raises(ValueError, match=r"stable_steps=True must be an integer"):
        DiCoConfig(gen_length=32, stable_steps=True)
    with pytest.raises(ValueError, match=r"n_seeds"):
        build_sampler("dico", gen_length=32, n_seeds=True)
