"""Conformance suite: every registered sampler x both backbone families, on tiny random backbones.

Generic on purpose: only :class:`SamplerConfig` fields are set (``gen_length``, ``temperature``), so
a new sampler gets this suite by being registered.  ``gen_length`` is 32 so that block-wise
defaults (block 32) divide it.
"""
from dataclasses import dataclass

import pytest
import torch

from asynclane.counting import SYNC_OPS, CountingBackbone, OpCounter
from asynclane.sampler import REGISTRY, Generation, build_sampler, first_eos_cut, left_pad
from asynclane.testing import LogitsHook, random_backbone, random_prompts

import baselines  # noqa: E402,F401  (registers every competing sampler)
NAMES = sorted(REGISTRY)
FAMILIES = ["llada", "dream"]
GEN = 32
LENGTHS = (5, 8)  # two prompts of different lengths: the batch is left-padded


_BACKBONES = {}


def _backbone(family):
    if family not in _BACKBONES:
        _BACKBONES[family] = random_backbone(family)
    return _BACKBONES[family]


class _EosHeavy(LogitsHook):
    """Delegating backbone that raises the EOS-like logits, so outputs contain EOS mid-answer."""

    def __init__(self, bb, boost):
        super().__init__(bb)
        self.boost = boost

    def adjust(self, logits, ids, positions, rows):
        eos = torch.tensor(self._bb.spec.eos_ids, device=logits.device)
        # a ramp over the call's columns: later positions lean to EOS, earlier ones do not
        ramp = self.boost * torch.linspace(0.5, 1.5, logits.shape[1], device=logits.device, dtype=logits.dtype)
        return logits.index_add(-1, eos, ramp[None, :, None].expand(logits.shape[0], -1, len(eos)))


def _run(name, bb, prompts, seed=0, **opts) -> Generation:
    return build_sampler(name, gen_length=GEN, **opts).generate(bb, prompts, torch.Generator().manual_seed(seed))


@dataclass
class Case:
    name: str
    bb: object
    prompts: list
    out: Generation


@pytest.fixture(scope="module", params=[(n, f) for n in NAMES for f in FAMILIES], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    """One default-config run per (sampler, family), shared by the cheap checks."""
    name, family = request.param
    bb = _backbone(family)
    prompts = random_prompts(bb, lengths=LENGTHS if REGISTRY[name].can_batch else LENGTHS[1:], seed=1)
    return Case(name, bb, prompts, _run(name, bb, prompts))


def test_output_shape(case):
    P = max(len(p) for p in case.prompts)
    assert case.out.prompt_length == P
    assert case.out.sequences.shape == (len(case.prompts), P + GEN)
    assert case.out.sequences.dtype == torch.long
    assert case.out.tokens.shape == (len(case.prompts), GEN)
    assert case.out.finished.shape == (len(case.prompts),) and case.out.finished.dtype == torch.bool


def test_prompt_untouched(case):
    spec = case.bb.spec
    x, _, P = left_pad(case.prompts, GEN, spec.pad_id, spec.mask_id)
    assert torch.equal(case.out.sequences[:, :P].cpu(), x[:, :P])


def test_no_mask_left(case):
    assert not (case.out.tokens == case.bb.spec.mask_id).any()


def _check_eos_accounting(out: Generation, eos_ids):
    tokens = out.tokens.cpu()
    cut = first_eos_cut(tokens, eos_ids)
    for row, kept, fin in zip(tokens.tolist(), cut, out.finished.tolist()):
        assert 1 <= len(kept) <= GEN and kept == row[: len(kept)]
        assert not any(t in eos_ids for t in kept[:-1])  # nothing counted after the first EOS
        has_eos = any(t in eos_ids for t in row)
        assert fin == has_eos and (kept[-1] in eos_ids) == has_eos
        assert len(kept) == (row.index(kept[-1]) + 1 if has_eos else GEN)


def test_eos_accounting(case):
    _check_eos_accounting(case.out, set(case.bb.spec.eos_ids))


def test_eos_accounting_with_eos_heavy_backbone(case):
    eos_ids = set(case.bb.spec.eos_ids)
    out = _run(case.name, _EosHeavy(case.bb, 5.0), case.prompts)
    assert not (out.tokens == case.bb.spec.mask_id).any()
    _check_eos_accounting(out, eos_ids)
    assert out.finished.any(), "the EOS-heavy backbone should make some row finish"


def test_deterministic_at_zero_temperature_and_no_global_rng(case):
    state = torch.get_rng_state()
    again = _run(case.name, case.bb, case.prompts)
    assert torch.equal(torch.get_rng_state(), state), "samplers may only use the rng they are given"
    assert torch.equal(again.sequences, case.out.sequences)


def test_sampling_is_seeded_and_uses_only_the_given_rng(case):
    state = torch.get_rng_state()
    a = _run(case.name, case.bb, case.prompts, seed=3, temperature=1.0)
    b = _run(case.name, case.bb, case.prompts, seed=3, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), state), "samplers may only use the rng they are given"
    assert torch.equal(a.sequences, b.sequences)
    assert not (a.tokens == case.bb.spec.mask_id).any()


def test_works_through_the_counting_wrapper(case):
    counting = CountingBackbone(case.bb)
    out = _run(case.name, counting, case.prompts)
    assert counting.nfe >= 1 and counting.token_forwards >= counting.nfe
    assert torch.equal(out.sequences, case.out.sequences)


def test_batch_equals_singles(case):
    if not REGISTRY[case.name].can_batch:
        pytest.skip(f"{case.name} declares can_batch = False (runs one prompt per generate call)")
    for r, prompt in enumerate(case.prompts):
        single = _run(case.name, case.bb, [prompt])
        assert torch.equal(single.tokens, case.out.tokens[r:r + 1]), f"row {r} (prompt length {len(prompt)})"
        assert torch.equal(single.finished, case.out.finished[r:r + 1])


# per model call: at most this many host-device round trips (the sampler's one or two transfers per
# iteration; ``Backbone.step`` / ``forward`` themselves make none: tests/asynclane/test_static_step.py)
SYNCS_PER_CALL = 2


def test_at_most_two_host_syncs_per_model_call(case):
    """Bookkeeping stays on the device: a sampler reads the device at most twice per iteration (a
    handful more per generate call for its set-up and its output are allowed)."""
    counting = CountingBackbone(case.bb)
    # a pooling sampler's rows run in threads, which a dispatch mode (thread-local) does not see: one prompt
    prompts = case.prompts[-1:] if REGISTRY[case.name].pools_rows else case.prompts
    with OpCounter() as c:
        build_sampler(case.name, gen_length=GEN).generate(counting, prompts, torch.Generator().manual_seed(0))
    assert c.syncs <= SYNCS_PER_CALL * counting.nfe + 4, (
        f"{case.name}: {c.syncs} syncs in {counting.nfe} calls: "
        f"{ {k: v for k, v in c.ops.items() if k in SYNC_OPS} }")
