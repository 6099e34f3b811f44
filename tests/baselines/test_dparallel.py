"""dparallel: reference transcriptions, the one-token-per-step degenerate case, validation.

Reference transcriptions (written fresh for this test, temperature 0): czg1225/dParallel
``LLaDA/generate.py`` (``generate`` with ``threshold`` -> ``get_transfer_index_entropy``) and the
``alg="entropy_threshold"`` branch of ``Dream/model/generation_utils_semiar.py`` (``_sample``
with ``sample_tokens_with_entropy``).  Both are batch 1; the LLaDA one runs on the backbone's
aligned logits, the Dream one on the raw (shifted) head output, undoing the shift itself.

The random backbones start every all-mask position near 3.0 nats (LLaDA) / 2.54 (Dream), and the
entropies drift as tokens get decoded; the thresholds below are chosen per family to commit one,
some or all candidates per step.
"""
import pytest
import torch
import torch.nn.functional as F

from asynclane.sampler import build_sampler, left_pad
from asynclane.testing import random_prompts, run_counted
from baselines.dparallel import DParallelConfig

THRESHOLDS = {"llada": [0.5, 3.0008, 3.01, 1e9], "dream": [0.5, 2.45, 2.52, 1e9]}


def _run(bb, prompts, seed=0, **opts):
    return run_counted("dparallel", bb, prompts, seed, **opts)


# --- transcription of LLaDA/generate.py `generate` + `get_transfer_index_entropy` (T = 0) --------

def _ref_transfer_index_entropy(logits, mask_index, x, entropy_threshold):
    x0 = torch.argmax(logits, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    entropy = -torch.sum(p * torch.log(p + 1e-12), dim=-1)
    x0 = torch.where(mask_index, x0, x)
    entropy_for_selection = torch.where(mask_index, entropy, torch.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(entropy_for_selection.shape[0]):
        _, select_index = torch.topk(entropy_for_selection[j], k=int(num_transfer_tokens[j]), largest=False)
        transfer_index[j, select_index] = True
        for k in range(1, int(num_transfer_tokens[j])):
            if entropy[j, select_index[k]] > entropy_threshold:
                transfer_index[j, select_index[k]] = False
    return x0, transfer_index


def _ref_llada_generate(forward, prompt, gen_length, block_length, mask_id, threshold):
    """Returns (x, nfe); ``forward(x)`` gives aligned logits of a full forward."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    nfe = 0
    for num_block in range(gen_length // block_length):
        end = prompt.shape[1] + (num_block + 1) * block_length
        while True:
            nfe += 1
            mask_index = x == mask_id
            logits = forward(x)
            mask_index[:, end:] = 0
            x0, transfer_index = _ref_transfer_index_entropy(logits, mask_index, x, threshold)
            x[transfer_index] = x0[transfer_index]
            if (x[:, end - block_length:end] == mask_id).sum() == 0:
                break
    return x, nfe


# --- transcription of Dream generation_utils_semiar.py `_sample`, alg="entropy_threshold" (T = 0) --

def _ref_dream_sample(raw_model, input_ids, gen_length, block_length, mask_token_id, threshold):
    x = F.pad(input_ids, (0, gen_length), value=mask_token_id)
    i = 0
    for num_block in range(gen_length // block_length):
        current_block_start = input_ids.shape[1] + num_block * block_length
        current_block_end = current_block_start + block_length
        while True:
            i += 1
            mask_index = x == mask_token_id
            logits = raw_model(x)
            mask_index[:, current_block_end:] = 0
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            mask_logits = logits[mask_index]
            original_probs = torch.softmax(mask_logits, dim=-1)  # sample_tokens_with_entropy, T = 0
            entropy = -torch.sum(original_probs * torch.log(original_probs + 1e-8), dim=-1)
            x0 = torch.argmax(mask_logits, dim=-1)
            x_ = torch.zeros_like(x) + mask_token_id
            full_entropy = torch.full_like(x, torch.inf, dtype=logits.dtype)
            x_[mask_index] = x0.clone()
            full_entropy[mask_index] = entropy
            current_transfer_tokens = int((x[:, current_block_start:current_block_end] == mask_token_id).sum())
            selected_entropy, select_index = torch.topk(full_entropy, current_transfer_tokens, largest=False)
            transfer_index = torch.zeros_like(x, dtype=torch.bool)
            transfer_index[0, select_index[0]] = True
            for k in range(1, current_transfer_tokens):
                transfer_index[0, select_index[0, k]] = bool(selected_entropy[0, k] < threshold)
            x[transfer_index] = x_[transfer_index].clone()
            if (x[:, current_block_start:current_block_end] == mask_token_id).sum() == 0:
                break
    return x, i


@pytest.mark.parametrize("gen_length,block_length", [(32, 8), (32, 32), (24, 8)])
@pytest.mark.parametrize("t", range(4))
def test_matches_the_llada_reference(backbone, gen_length, block_length, t):
    threshold = THRESHOLDS[backbone.spec.family][t]
    prompts = random_prompts(backbone, lengths=(7,), seed=3)
    out, counting = _run(backbone, prompts, gen_length=gen_length, block_length=block_length, threshold=threshold)
    want, nfe = _ref_llada_generate(backbone.forward, torch.tensor(prompts), gen_length, block_length,
                                    backbone.spec.mask_id, threshold)
    assert torch.equal(out.sequences, want)
    assert counting.nfe == nfe


@pytest.mark.parametrize("block_length", [8, 16])
@pytest.mark.parametrize("t", range(4))
def test_matches_the_dream_reference(dream, block_length, t):
    threshold = THRESHOLDS["dream"][t]
    prompts = random_prompts(dream, lengths=(6,), seed=5)

    def raw(x):  # the plain model: the head on every hidden state, logits still shifted
        return dream.model.head(dream.model(x, torch.arange(x.shape[1]).expand_as(x)))

    out, counting = _run(dream, prompts, gen_length=32, block_length=block_length, threshold=threshold)
    want, nfe = _ref_dream_sample(raw, torch.tensor(prompts), 32, block_length, dream.spec.mask_id, threshold)
    assert torch.equal(out.sequences, want)
    assert counting.nfe == nfe


def test_threshold_trades_steps_for_parallelism(backbone):
    prompts = random_prompts(backbone, lengths=(6,), seed=5)
    nfes = [_run(backbone, prompts, gen_length=32, block_length=8, threshold=t)[1].nfe
            for t in [0.0] + THRESHOLDS[backbone.spec.family]]
    assert nfes[0] == nfes[1] == 32 and nfes[-1] == 4  # 0 / 0.5: one per step; huge: a block per step
    assert all(a >= b for a, b in zip(nfes, nfes[1:])) and 4 < nfes[-2] < 32


# --- degenerate setting: threshold 0 = one token per step, lowest entropy first ---------------

def _one_per_step_by_entropy(bb, prompts, gen_length, block_length):
    """LLaDA-style block loop, one forward per token, committing the masked block position of
    highest negative entropy (written here: blockwise only scores by probability or at random)."""
    spec = bb.spec
    x, key_mask, P = left_pad(prompts, gen_length, spec.pad_id, spec.mask_id)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    for lo in range(P, P + gen_length, block_length):
        for _ in range(block_length):
            logits = bb.forward(x, positions=positions, key_mask=key_mask)
            p = torch.softmax(logits.double(), dim=-1)
            neg_entropy = (p * torch.log(p)).nan_to_num().sum(-1)
            neg_entropy[:, :lo] = neg_entropy[:, lo + block_length:] = -torch.inf
            neg_entropy[x != spec.mask_id] = -torch.inf
            best = neg_entropy.argmax(-1)
            rows = torch.arange(x.shape[0])
            x[rows, best] = logits[rows, best].argmax(-1)
    return x


@pytest.mark.parametrize("gen_length,block_length", [(32, 32), (32, 8), (24, 8)])
def test_threshold_zero_is_one_token_per_step_by_entropy(backbone, gen_length, block_length):
    prompts = random_prompts(backbone, lengths=(5, 8), seed=2)  # a left-padded batch
    out, counting = _run(backbone, prompts, gen_length=gen_length, block_length=block_length, threshold=0.0)
    assert torch.equal(out.sequences, _one_per_step_by_entropy(backbone, prompts, gen_length, block_length))
    assert counting.nfe == gen_length


def test_calls_are_full_forwards_with_block_rows_only(llada):
    prompts = random_prompts(llada, lengths=(6,), seed=1)
    _, counting = _run(llada, prompts, gen_length=16, block_length=8, threshold=0.0)
    assert counting.nfe == 16 and counting.token_forwards == 16 * 22  # no cache: the whole buffer each step


# --- configuration ----------------------------------------------------------------------------

def test_defaults_are_the_reported_setting():
    cfg = DParallelConfig(gen_length=256)
    assert (cfg.block_length, cfg.threshold, cfg.temperature) == (32, 0.5, 0.0)


@pytest.mark.parametrize("opts,match", [
    (dict(gen_length=32, block_length=24), r"block_length=24 must divide gen_length=32.*\[1, 2, 4, 8, 16, 32\]"),
    (dict(gen_length=32, block_length=0), r"block_length=0"),
    (dict(gen_length=32, threshold=-0.1), r"threshold=-0.1 must be an entropy >= 0"),
    (dict(gen_length=32, threshold=float("nan")), r"threshold=nan"),
    (dict(gen_length=0), r"gen_length"),
    (dict(gen_length=32, temperature=-1.0), r"temperature"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        DParallelConfig(**opts)
    with pytest.raises(ValueError, match=match):
        build_sampler("dparallel", **opts)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"cache.*valid options: block_length, gen_length, temperature, threshold"):
        build_sampler("dparallel", cache="prefix")
