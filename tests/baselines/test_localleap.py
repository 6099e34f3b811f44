"""localleap: the selection rule on hand-made confidences, the anchor neighbourhood end to end,
the degenerate settings equal to fast_dllm ``cache=none`` (random backbones of both families and the
embedded model), the rule replayed on the embedded model's real logits, early exit, validation.

No reference code could be read (docs/research/baselines_seeds.md §1, §8), so there is no
transcription to compare against: the rule is checked against its description in §1.2.
"""
import pytest
import torch

from asynclane import rules
from asynclane.sampler import build_sampler, first_eos_cut
from asynclane.testing import LogitsHook, random_prompts, run_counted
from baselines.localleap import LocalLeapConfig, commit_local_leap, near_anchors

INF = float("inf")
PAPER = dict(threshold=0.9, relaxed_threshold=0.75, radius=4)


def _run(bb, prompts, seed=0, **opts):
    return run_counted("localleap", bb, prompts, seed, **opts)


def _fast(bb, prompts, seed=0, **opts):
    return run_counted("fast_dllm", bb, prompts, seed, cache="none", **opts)


# --- the rule on hand-made confidences ---------------------------------------------------------

def test_near_anchors_is_a_clipped_hard_window():
    a = torch.tensor([[0, 0, 1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert near_anchors(a, 2).int().tolist() == [[1, 1, 1, 1, 1, 0, 0, 1, 1, 1]]
    assert torch.equal(near_anchors(a, 0), a)
    assert near_anchors(a, 50).all() and not near_anchors(torch.zeros(2, 5, dtype=torch.bool), 3).any()


def test_relaxed_threshold_applies_next_to_an_anchor_only():
    #                  0     1     2     3     4     5    6     7     8     9
    s = torch.tensor([[0.3, 0.8, 0.95, 0.8, 0.76, 0.8, 0.3, 0.8, 0.3, 0.3]])
    got = commit_local_leap(s, 0.9, 0.75, 2)
    # anchor 2; its window [0, 4]: 1, 3, 4 pass 0.75; 5 and 7 pass it too but lie outside
    assert got.int().tolist() == [[0, 1, 1, 1, 1, 0, 0, 0, 0, 0]]
    # the window edge: distance == radius is in, radius + 1 out
    assert commit_local_leap(s, 0.9, 0.75, 3)[0, 5] and not commit_local_leap(s, 0.9, 0.75, 2)[0, 5]
    # below the relaxed threshold is dropped even next to the anchor
    assert not commit_local_leap(s, 0.9, 0.81, 2)[0, 1]
    # equality passes both thresholds (the reference's `c >= thr`)
    eq = torch.tensor([[0.9, 0.75, 0.74]])
    assert commit_local_leap(eq, 0.9, 0.75, 2).tolist() == [[True, True, False]]


def test_no_anchor_means_the_strict_rule_and_at_least_the_best():
    s = torch.tensor([[0.3, 0.8, 0.85, 0.8]])  # nothing reaches 0.9: only the best is committed
    assert commit_local_leap(s, 0.9, 0.75, 4).tolist() == [[False, False, True, False]]
    assert not commit_local_leap(torch.full((1, 4), -INF), 0.9, 0.75, 4).any()


def test_decoded_positions_are_neither_candidates_nor_anchors():
    # column 1 is already decoded (-inf): it does not open a window around itself
    s = torch.tensor([[0.3, -INF, 0.8, 0.3, 0.3, 0.95, 0.3]])
    got = commit_local_leap(s, 0.9, 0.75, 1)
    assert got.tolist() == [[False, False, False, False, False, True, False]]
    # a window may span a decoded column: anchor 5, radius 3 reaches column 2
    assert commit_local_leap(s, 0.9, 0.75, 3)[0, 2]


def test_anchors_are_per_row_and_several_windows_unite():
    s = torch.tensor([[0.95, 0.8, 0.3, 0.3, 0.3, 0.8, 0.95],
                      [0.3, 0.8, 0.3, 0.3, 0.3, 0.8, 0.95]])
    got = commit_local_leap(s, 0.9, 0.75, 1)
    assert got.int().tolist() == [[1, 1, 0, 0, 0, 1, 1],
                                  [0, 0, 0, 0, 0, 1, 1]]  # row 1's 0.8 at column 1 has no anchor near


@pytest.mark.parametrize("seed", range(4))
def test_rule_degenerates_to_the_fast_dllm_threshold_rule(seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(3, 32, generator=g)
    score[torch.rand(3, 32, generator=g) < 0.3] = -INF
    score[2] = -INF
    strict = rules.commit_threshold(score, 0.6)
    assert torch.equal(commit_local_leap(score, 0.6, 0.6, 4), strict)  # relaxed == strict
    assert torch.equal(commit_local_leap(score, 0.6, 0.1, 0), strict)  # radius 0: only the anchors
    wide = commit_local_leap(score, 0.6, 0.3, 4)
    assert (wide | strict).equal(wide) and not (wide & (score < 0.3)).any()  # a superset, never below relaxed


# --- the neighbourhood end to end ----------------------------------------------------------------

class _FirstCallConfidences(LogitsHook):
    """Replaces the first call's logits for generated indices ``conf`` (index -> confidence): the
    proposal there is token ``base + index``, with that softmax probability (the rest spread evenly)."""

    def __init__(self, bb, P, conf, default=0.3, base=10):
        super().__init__(bb)
        self.P, self.conf, self.default, self.base = P, conf, default, base
        self.calls = []

    def adjust(self, logits, ids, positions, rows):
        self.calls.append(ids.clone())
        if len(self.calls) > 1:
            return logits
        V = logits.shape[-1]
        out = logits.clone()
        for k, col in enumerate(rows[0].tolist()):
            i = col - self.P
            c = self.conf.get(i, self.default)
            row = torch.full((V,), (1 - c) / (V - 1), dtype=torch.float64)
            row[self.base + i] = c
            out[:, k] = row.log().to(logits.dtype)
        return out


@pytest.mark.parametrize("family_fixture", ["llada", "dream"])
def test_a_moderate_neighbour_is_committed_next_to_an_anchor_and_not_elsewhere(request, family_fixture):
    bb = request.getfixturevalue(family_fixture)
    prompts = random_prompts(bb, lengths=(6,), seed=3)
    # generated index 5: anchor (0.95); 7 (distance 2 = radius) and 3 (distance 2) moderate; 8
    # (distance 3) and 12 moderate but outside the window; 4 is near but below the relaxed threshold
    conf = {5: 0.95, 7: 0.8, 3: 0.76, 8: 0.8, 12: 0.8, 4: 0.7}
    opts = dict(gen_length=16, block_length=16)
    committed = {}
    for name, extra in [("localleap", dict(threshold=0.9, relaxed_threshold=0.75, radius=2)),
                        ("fast_dllm", dict(threshold=0.9, cache="none"))]:
        hook = _FirstCallConfidences(bb, 6, conf)
        out = build_sampler(name, **opts, **extra).generate(hook, prompts, torch.Generator())
        second = hook.calls[1][0, 6:]
        committed[name] = {i: int(t) for i, t in enumerate(second.tolist()) if t != bb.spec.mask_id}
        assert (out.tokens != bb.spec.mask_id).all()
    assert committed["localleap"] == {3: 13, 5: 15, 7: 17}
    assert committed["fast_dllm"] == {5: 15}


# --- degenerate settings: fast_dllm with cache=none ----------------------------------------------

@pytest.mark.parametrize("gen_length,block_length,threshold", [(32, 8, 0.9), (32, 16, 0.5), (24, 8, 0.99), (32, 32, 0.3)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_relaxed_equal_to_strict_is_fast_dllm_without_cache(backbone, gen_length, block_length, threshold, temperature):
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=2)  # a left-padded batch
    opts = dict(gen_length=gen_length, block_length=block_length, threshold=threshold, temperature=temperature)
    ours, c_ours = _run(backbone, prompts, seed=1, relaxed_threshold=threshold, radius=4, **opts)
    ref, c_ref = _fast(backbone, prompts, seed=1, **opts)
    assert torch.equal(ours.sequences, ref.sequences)
    assert c_ours.nfe == c_ref.nfe and c_ours.token_forwards == c_ref.token_forwards
    # radius 0: only anchors may use the relaxed threshold, and they pass the strict one anyway
    zero, c_zero = _run(backbone, prompts, seed=1, relaxed_threshold=0.0, radius=0, **opts)
    assert torch.equal(zero.sequences, ref.sequences) and c_zero.nfe == c_ref.nfe


@pytest.mark.parametrize("task,idx", [("arith", (0, 1, 2)), ("listops", (0, 1, 2))])
def test_relaxed_equal_to_strict_is_fast_dllm_on_the_embedded_model(tiny, task, idx, tiny_prompts):
    prompts = tiny_prompts(task, idx)
    for gen_length in (64, 128):
        opts = dict(gen_length=gen_length, block_length=32, threshold=0.9)
        ours, c_ours = _run(tiny, prompts, relaxed_threshold=0.9, **opts)
        ref, c_ref = _fast(tiny, prompts, **opts)
        assert torch.equal(ours.sequences, ref.sequences) and c_ours.nfe == c_ref.nfe


# --- the rule replayed on the embedded model's real logits ---------------------------------------

class _Recorder(LogitsHook):
    def __init__(self, bb):
        super().__init__(bb)
        self.calls = []

    def adjust(self, logits, ids, positions, rows):
        self.calls.append((ids.clone(), logits.clone(), rows.clone()))
        return logits


def test_every_step_commits_exactly_the_rule_on_the_embedded_model(tiny, tiny_prompts):
    """Each step's commits equal ``commit_local_leap`` of that step's logits, and on real answers the
    relaxed window commits tokens the strict rule would have left (the rule is not vacuous here)."""
    prompts = tiny_prompts("arith", (0, 1))
    rec = _Recorder(tiny)
    out = build_sampler("localleap", gen_length=64, **PAPER).generate(rec, prompts, torch.Generator())
    mask = tiny.spec.mask_id
    states = [ids for ids, _, _ in rec.calls[1:]] + [out.sequences]
    extra = 0
    for (ids, logits, rows), after in zip(rec.calls, states):
        lo, hi = int(rows[0, 0]), int(rows[0, -1]) + 1
        masked = ids[:, lo:hi] == mask
        proposal = rules.propose(logits, mask, 0.0)
        score = rules.restrict_confidence(rules.confidence_prob(logits, proposal, torch.float64), masked)
        want = commit_local_leap(score, **PAPER)
        changed = after != ids
        assert torch.equal(changed[:, lo:hi], want) and not changed[:, :lo].any() and not changed[:, hi:].any()
        assert torch.equal(after[:, lo:hi][want], proposal[want])
        extra += int((want & ~rules.commit_threshold(score, PAPER["threshold"])).sum())
    assert extra > 0


# --- early exit ----------------------------------------------------------------------------------

class _EosAt(LogitsHook):
    """Raises the EOS-like logits of the rows predicting absolute position ``position``."""

    def __init__(self, bb, position, boost=30.0):
        super().__init__(bb)
        self.position, self.boost = position, boost

    def adjust(self, logits, ids, positions, rows):
        hit = positions.gather(1, rows) == self.position
        eos = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        eos[list(self._bb.spec.eos_ids)] = self.boost
        return logits + hit[..., None] * eos


def test_early_exit_keeps_the_answer_and_saves_forwards(backbone):
    bb, spec = _EosAt(backbone, position=13), backbone.spec
    prompts = random_prompts(backbone, lengths=(5, 8, 6), seed=1)
    opts = dict(gen_length=32, block_length=8, threshold=0.5, relaxed_threshold=0.2, radius=2)
    full, c_full = _run(bb, prompts, **opts)
    early, c_early = _run(bb, prompts, early_exit=True, **opts)
    assert full.finished.all()
    assert first_eos_cut(early.tokens, spec.eos_ids) == first_eos_cut(full.tokens, spec.eos_ids)
    assert torch.equal(early.finished, full.finished) and c_early.nfe < c_full.nfe
    assert (early.tokens != spec.mask_id).all() and (early.tokens[:, 16:] == spec.eos_id).all()
    for r, p in enumerate(prompts):
        single, _ = _run(bb, [p], early_exit=True, **opts)
        assert torch.equal(single.tokens, early.tokens[r:r + 1])


# --- configuration -------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    cfg = LocalLeapConfig(gen_length=256)
    assert (cfg.threshold, cfg.relaxed_threshold, cfg.radius, cfg.block_length) == (0.9, 0.75, 4, 32)
    assert cfg.temperature == 0.0 and not cfg.early_exit


@pytest.mark.parametrize("opts,match", [
    (dict(gen_length=32, block_length=24), r"block_length=24 must divide gen_length=32.*\[1, 2, 4, 8, 16, 32\]"),
    (dict(gen_length=32, threshold=-0.1), r"threshold=-0.1 must be >= 0"),
    (dict(gen_length=32, threshold=float("nan")), r"threshold=nan"),
    (dict(gen_length=32, relaxed_threshold=0.95), r"relaxed_threshold=0.95 must lie in \[0, threshold=0.9\]"),
    (dict(gen_length=32, relaxed_threshold=-0.5), r"relaxed_threshold=-0.5"),
    (dict(gen_length=32, relaxed_threshold=float("nan")), r"relaxed_threshold=nan"),
    (dict(gen_length=32, radius=-1), r"radius=-1 must be an integer >= 0"),
    (dict(gen_length=32, temperature=-1.0), r"temperature"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        LocalLeapConfig(**opts)
    with pytest.raises(ValueError, match=match):
        build_sampler("localleap", **opts)


def test_radius_must_be_an_integer():
    with pytest.raises(ValueError, match=r"radius=2.5 must be an integer"):
        LocalLeapConfig(gen_length=32, radius=2.5)
    with pytest.raises(ValueError, match=r"radius"):
        build_sampler("localleap", gen_length=32, radius=True)
