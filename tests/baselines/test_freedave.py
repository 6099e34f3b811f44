"""freedave / freedave_pp: lossless against their reference samplers, in fewer model calls.

freedave's reference is one greedy token per step in semi-AR blocks: ``blockwise`` with
``steps = gen_length`` (LLaDA's low-confidence remasking; full forwards, so also on Dream), and,
with a cache, ``fast_dllm`` with ``threshold > 1`` (one token per step over the same cache).
freedave_pp's is Fast-dLLM's threshold step (``fast_dllm`` with the same threshold and cache): with
``match_rule="exact"`` it is lossless; the reference's ``subset`` rule is not (shown below).
Every equality is on token ids; calls are counted by CountingBackbone.
"""
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from asynclane.counting import CountingBackbone
from asynclane.sampler import build_sampler, first_eos_cut
from asynclane.testing import LogitsHook, random_prompts, run_counted
from asynclane.tiny_tokenizer import chat_prompt_ids
from baselines.freedave import (DRAFT_STEPS, FreeDaveConfig, FreeDavePPConfig, accepted_chain, agreement,
                                build_drafts)
from eval.tasks import synthetic

CACHES = ["none", "prefix", "dual"]
TAU = {"llada": 0.2, "dream": 0.3}  # thresholds at which the random models commit several tokens a step
INF = float("inf")


def _blockwise(bb, prompts, gen_length=128, block_length=32):
    return run_counted("blockwise", bb, prompts, block_length=block_length, steps=gen_length, gen_length=gen_length)


def _prompts(bb, seed):
    return random_prompts(bb, lengths=(7,), seed=seed)


def _composed(*overrides):
    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        conf = OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)
    options = dict(conf["sampler"])
    return build_sampler(options.pop("name"), **options)


def _run_built(sampler, bb, prompts):
    counting = CountingBackbone(bb)
    return sampler.generate(counting, prompts, torch.Generator().manual_seed(0)), counting.nfe


CONTRACT = (("sampler=freedave", "sampler.block_length=32", "gen_length=128"),
            ("sampler=blockwise", "sampler.block_length=32", "sampler.steps=128", "gen_length=128"))


# --- test doubles --------------------------------------------------------------------------------

class _Scripted(LogitsHook):
    """Replaces every call's logits: at position p the model proposes one ordinary token with a
    confidence that grows with p (no ties).  ``context=True``: the token also depends on how many
    masks the call's row holds, so a draft's extra tokens (proposed from an earlier state, with more
    masks) never match what the model proposes once the draft before it is in: every draft beyond
    the first is rejected.  ``context=False``: proposals never change, so every draft is accepted."""

    def __init__(self, bb, context):
        super().__init__(bb)
        self.context = context

    def adjust(self, logits, ids, positions, rows):
        V = self._bb.spec.vocab_size
        pos = positions.gather(1, rows)  # (B, P) the position each row predicts
        m = (ids == self._bb.spec.mask_id).sum(-1, keepdim=True) if self.context else 0
        tok = (3 * pos + 7 * m) % (V - 8)  # ordinary ids: the random specs' special ids are the top four
        out = torch.zeros_like(logits)
        return out.scatter(-1, tok[..., None], (4.0 + 0.01 * pos.to(logits.dtype))[..., None])


class _EosFrom(LogitsHook):
    """EOS-like logits raised by 40 at positions >= ``position``: blocks from there are all EOS."""

    def __init__(self, bb, position):
        super().__init__(bb)
        self.position = position

    def adjust(self, logits, ids, positions, rows):
        hit = (positions.gather(1, rows) >= self.position).to(logits.dtype)[..., None]
        eos = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        eos[list(self._bb.spec.eos_ids)] = 40.0
        return logits + hit * eos


def _calls_when_all_accepted(block_length, d, blocks):
    """Calls of a block when every draft is accepted: its first forward, then one per verification
    (each takes min(d, masks) tokens; a last single mask is committed from the logits in hand)."""
    calls, m = 1, block_length
    while m >= 2:
        m -= min(d, m)
        calls += 1
    return calls * blocks


# --- lossless against the one-token-per-step sampler --------------------------------------------

@pytest.mark.parametrize("gen_length,block_length,draft_steps,seed",
                         [(128, 32, None, 0), (64, 8, 3, 1), (48, 16, 6, 2)])
def test_freedave_equals_blockwise_one_token_per_step_in_fewer_calls(backbone, seed, gen_length, block_length,
                                                                    draft_steps):
    prompts = _prompts(backbone, seed)
    ref, c_ref = _blockwise(backbone, prompts, gen_length, block_length)
    out, c = run_counted("freedave", backbone, prompts, gen_length=gen_length, block_length=block_length,
                         draft_steps=draft_steps)
    assert torch.equal(out.sequences, ref.sequences)
    assert c_ref.nfe == gen_length and c.nfe < c_ref.nfe


def test_one_draft_is_the_reference_call_for_call(backbone):
    prompts = _prompts(backbone, 2)
    ref, c_ref = _blockwise(backbone, prompts, 64, 16)
    out, c = run_counted("freedave", backbone, prompts, gen_length=64, block_length=16, draft_steps=1)
    assert torch.equal(out.sequences, ref.sequences) and c.nfe == c_ref.nfe == 64
    assert c.token_forwards == c_ref.token_forwards  # one row per call, the whole buffer


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_freedave_with_a_cache_equals_fast_dllm_one_token_per_step(backbone, cache):
    """The scripts' setting: the same approximate cache as fast_dllm (Dream: the refresh commits the
    block's first token), one verification row per lane of a lane cache."""
    prompts = _prompts(backbone, 0)
    ref, c_ref = run_counted("fast_dllm", backbone, prompts, gen_length=128, block_length=32, cache=cache,
                             threshold=2.0)
    out, c = run_counted("freedave", backbone, prompts, gen_length=128, block_length=32, cache=cache)
    assert torch.equal(out.sequences, ref.sequences)
    assert c_ref.nfe == 128 and c.nfe < c_ref.nfe


def test_the_harness_contract_on_random_backbones(backbone):
    """``sampler=freedave sampler.block_length=32`` == ``sampler=blockwise sampler.block_length=32
    sampler.steps=128`` at gen_length 128, from the composed harness configs."""
    fd, bw = _composed(*CONTRACT[0]), _composed(*CONTRACT[1])
    prompts = _prompts(backbone, 3)
    out, nfe = _run_built(fd, backbone, prompts)
    ref, nfe_ref = _run_built(bw, backbone, prompts)
    assert torch.equal(out.sequences, ref.sequences) and nfe < nfe_ref == 128


# --- drafts are verified ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["freedave", "freedave_pp"])
def test_rejected_drafts_are_never_committed(backbone, name):
    """Every draft beyond the first is wrong (the scripted model changes its mind when a token goes in):
    the output is still the reference's, one token per call, as many calls as the reference."""
    bb = _Scripted(backbone, context=True)
    prompts = _prompts(backbone, 0)
    ref, c_ref = _blockwise(bb, prompts, 64, 16)
    out, c = run_counted(name, bb, prompts, gen_length=64, block_length=16)
    assert torch.equal(out.sequences, ref.sequences) and c.nfe == c_ref.nfe
    verify = [r for r in out.trace if r["call"] == "verify"]  # several drafts each, only the first taken
    assert len(verify) == c.nfe - 4 and all(r["rows"] > 1 and r["committed"] == 1 for r in verify)


def test_accepted_drafts_save_exactly_the_verified_steps(backbone):
    """A model that never changes its mind: every draft is accepted, min(d, masks) tokens per call."""
    bb = _Scripted(backbone, context=False)
    prompts = _prompts(backbone, 0)
    ref, _ = _blockwise(bb, prompts, 64, 32)
    for d in (3, 4, 8):
        out, c = run_counted("freedave", bb, prompts, gen_length=64, block_length=32, draft_steps=d)
        assert torch.equal(out.sequences, ref.sequences)
        assert c.nfe == _calls_when_all_accepted(32, d, 2)  # d=4: 9 calls a block instead of 32


# --- FreeDave++ -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", CACHES)
def test_freedave_pp_exact_rule_equals_threshold_decoding(backbone, cache):
    tau = TAU[backbone.spec.family]
    prompts = _prompts(backbone, 1)
    ref, c_ref = run_counted("fast_dllm", backbone, prompts, gen_length=128, block_length=32, cache=cache,
                             threshold=tau)
    out, c = run_counted("freedave_pp", backbone, prompts, gen_length=128, block_length=32, cache=cache,
                         threshold=tau, match_rule="exact")
    assert torch.equal(out.sequences, ref.sequences)
    assert c.nfe < c_ref.nfe < 128


def test_freedave_pp_reference_subset_rule_is_not_lossless(dream):
    """The reference's subset rule accepts a draft that is only part of the next threshold step; the
    trajectory then leaves threshold decoding's (docs/samplers/freedave.md, Deviations)."""
    differ = 0
    for seed in (0, 1):
        prompts = _prompts(dream, seed)
        ref, _ = run_counted("fast_dllm", dream, prompts, gen_length=128, block_length=32, cache="dual", threshold=0.1)
        exact, _ = run_counted("freedave_pp", dream, prompts, gen_length=128, block_length=32, cache="dual",
                               threshold=0.1, match_rule="exact")
        subset, _ = run_counted("freedave_pp", dream, prompts, gen_length=128, block_length=32, cache="dual",
                                threshold=0.1)
        assert torch.equal(exact.sequences, ref.sequences)
        differ += int(not torch.equal(subset.sequences, ref.sequences))
    assert differ == 2


@pytest.mark.parametrize("rule", ["subset", "exact"])
def test_freedave_pp_above_one_is_freedave(backbone, rule):
    prompts = _prompts(backbone, 1)
    a, ca = run_counted("freedave", backbone, prompts, gen_length=64, block_length=16)
    b, cb = run_counted("freedave_pp", backbone, prompts, gen_length=64, block_length=16, threshold=1.5,
                        match_rule=rule)
    assert torch.equal(a.sequences, b.sequences) and ca.nfe == cb.nfe


# --- early exit ----------------------------------------------------------------------------------

def test_early_exit_keeps_the_answer_and_saves_calls(backbone):
    prompts = _prompts(backbone, 0)
    P = len(prompts[0])
    bb = _EosFrom(backbone, P + 20)  # block 2 of 4 is all EOS
    full, c_full = run_counted("freedave", bb, prompts, gen_length=64, block_length=16)
    early, c_early = run_counted("freedave", bb, prompts, gen_length=64, block_length=16, early_exit=True)
    spec = backbone.spec
    assert first_eos_cut(early.tokens, spec.eos_ids) == first_eos_cut(full.tokens, spec.eos_ids)
    assert early.finished.all() and c_early.nfe < c_full.nfe
    assert (early.tokens[0, 48:] == spec.eos_id).all() and spec.mask_id not in early.tokens[0].tolist()


# --- the embedded model ---------------------------------------------------------------------------

def _tiny_runs(tiny, problems):
    """(task, index) -> (freedave, blockwise, their NFEs) from the composed contract configs."""
    fd, bw = _composed(*CONTRACT[0]), _composed(*CONTRACT[1])
    out = {}
    for task, i in problems:
        prompts = [chat_prompt_ids(tiny.tokenizer, synthetic.test_problems(task)[i].prompt)]
        a, na = _run_built(fd, tiny, prompts)
        b, nb = _run_built(bw, tiny, prompts)
        out[task, i] = (a, b, na, nb, prompts)
    return out


@pytest.fixture(scope="module")
def tiny_runs(tiny):
    return _tiny_runs(tiny, [("arith", 0), ("listops", 0)])


def test_the_harness_contract_on_the_embedded_model(tiny_runs):
    for (task, i), (a, b, na, nb, _) in tiny_runs.items():
        assert torch.equal(a.sequences, b.sequences), (task, i)
        assert nb == 128 and na <= 48, (task, i, na)  # the trained model accepts most drafts: 36 is the floor


def test_freedave_pp_on_the_embedded_model(tiny, tiny_runs):
    for (task, i), (*_, prompts) in tiny_runs.items():
        ref, c_ref = run_counted("fast_dllm", tiny, prompts, gen_length=128, block_length=32, cache="none",
                                 threshold=0.95)
        exact, c = run_counted("freedave_pp", tiny, prompts, gen_length=128, block_length=32, match_rule="exact")
        assert torch.equal(exact.sequences, ref.sequences) and c.nfe <= c_ref.nfe, (task, i)


@pytest.mark.slow
def test_the_harness_contract_on_more_embedded_problems(tiny):
    runs = _tiny_runs(tiny, [(t, i) for t in ("arith", "listops") for i in range(1, 12)])
    for key, (a, b, na, nb, _) in runs.items():
        assert torch.equal(a.sequences, b.sequences) and na < nb, key


# --- rules and configuration ---------------------------------------------------------------------

def test_build_drafts_nests_the_best_positions():
    blk = torch.tensor([9, 0, 0, 0, 0])  # mask id 0; position 0 decoded
    proposal = torch.tensor([5, 11, 12, 13, 14])
    score = torch.tensor([-INF, 0.2, 0.7, 0.7, 0.1])  # a tie: the lower position first
    drafts = build_drafts(blk, proposal, score, 4, 1)
    assert drafts.tolist() == [[9, 0, 12, 0, 0], [9, 0, 12, 13, 0], [9, 11, 12, 13, 0], [9, 11, 12, 13, 14]]
    stale = build_drafts(blk, proposal, score, 2, 0)  # draft 0 is the state itself
    assert stale.tolist() == [[9, 0, 0, 0, 0], [9, 0, 12, 0, 0]]
    beyond = build_drafts(blk, proposal, score, 2, torch.tensor(4))  # counts past the masks: all of them
    assert beyond.tolist() == [[9, 11, 12, 13, 14]] * 2


def test_agreement_and_the_accepted_chain():
    drafts = torch.tensor([[1, 0, 0], [1, 2, 0], [1, 2, 3]])
    targets = torch.tensor([[1, 2, 0], [1, 2, 4], [1, 2, 3]])
    subset = agreement(drafts, targets, 0, "subset")
    assert subset.tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    assert agreement(drafts, targets, 0, "exact").tolist() == [[False, True, False], [False, False, False],
                                                                [False, False, True]]
    assert accepted_chain(subset.tolist()) == 1  # draft 2 disagrees with draft 1's target
    assert accepted_chain([[1, 1, 1], [0, 0, 0], [0, 0, 0]]) == 2  # the largest agreeing draft
    assert accepted_chain([[1, 0, 0], [0, 1, 1], [0, 0, 1]]) == 0


def test_defaults_are_the_scripts_setting_except_cache_and_early_exit():
    cfg = FreeDaveConfig()
    assert (cfg.block_length, cfg.draft_steps, cfg.cache) == (32, None, "none")
    assert not cfg.early_exit and cfg.temperature == 0.0
    assert DRAFT_STEPS == {"llada": 4, "dream": 8}
    assert cfg.drafts_for("llada") == 4 and cfg.drafts_for("dream") == 8
    assert FreeDaveConfig(draft_steps=2).drafts_for("dream") == 2
    pp = FreeDavePPConfig()
    assert (pp.threshold, pp.match_rule, pp.block_length) == (0.95, "subset", 32)


@pytest.mark.parametrize("name,opts,match", [
    ("freedave", dict(gen_length=32, block_length=24), r"block_length=24 must divide gen_length=32"),
    ("freedave", dict(gen_length=32, draft_steps=0), r"draft_steps=0 must be a positive integer"),
    ("freedave", dict(gen_length=32, cache="tree"), r"cache='tree' is not one of none, prefix, dual"),
    ("freedave_pp", dict(gen_length=32, threshold=-0.5), r"threshold=-0.5 must be >= 0"),
    ("freedave_pp", dict(gen_length=32, threshold=float("nan")), r"threshold=nan"),
    ("freedave_pp", dict(gen_length=32, match_rule="prefix"), r"match_rule='prefix' is not one of subset, exact"),
])
def test_config_validation(name, opts, match):
    with pytest.raises(ValueError, match=match):
        build_sampler(name, **opts)
