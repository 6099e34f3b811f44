"""learn2pd: a reference transcription, the degenerate equivalence with blockwise, the pure rules on
hand-made inputs, the committed filter against a constant one, EoTP on held-out problems, batch > 1,
and every way a filter file can be wrong.

Reference transcription (written fresh for this test, temperature 0, batch 1):
ims-kdks/Learning-to-Parallel-Decoding ``llada/generate.py`` ``generate_l2p_eot`` and
``generate_learn2parallel`` (commit 342293c), with the 2-layer ``LogisticRegression`` of
``model/small_model.py`` (read in a vendored copy) as the filter, ``model(x).logits`` being the
backbone's full forward.  A hook sets the mask id's logit to -inf in both (the sampler never proposes
the mask; a random model sometimes would).
"""
import json

import pytest
import torch
import torch.nn.functional as F

from asynclane.loading import load_backbone
from asynclane.sampler import build_sampler, first_eos_cut
from asynclane.testing import LogitsHook, import_file, random_prompts, run_counted
from asynclane.tiny_tokenizer import chat_prompt_ids
from baselines import learn2pd
from baselines.learn2pd import (DEFAULT_FILTER, Learn2PDConfig, block_features, eotp_end, load_filter, model_signature,
                                save_filter, signature_mismatch)
from eval.tasks import synthetic

NEG = float("-inf")
ROOT = learn2pd.TINY_DIR.parents[2]
TRAIN = import_file("_train_learn2pd_filter", ROOT / "scripts" / "train_learn2pd_filter.py")


class _Hook(LogitsHook):
    """Mask logit at -inf; optionally EOS-like logits raised along a ramp over the predicted token's
    position (later positions lean to EOS), so that EoTP fires on a random model.  By position, not
    by the call's column, so a row's logits do not depend on the call's width or its padding."""

    def __init__(self, bb, boost=0.0):
        super().__init__(bb)
        self.boost = boost

    def adjust(self, logits, ids, positions, rows):
        logits = logits.clone()
        logits[..., self._bb.spec.mask_id] = NEG
        if self.boost:
            eos = torch.tensor(self._bb.spec.eos_ids)
            ramp = self.boost * positions.gather(1, rows).to(logits.dtype) / 24
            logits = logits.index_add(-1, eos, ramp[:, :, None].expand(-1, -1, len(eos)))
        return logits


def _random_filter(path, bb, block_length, seed=0, bias=2.0):
    g = torch.Generator().manual_seed(seed)
    L = block_length
    w = [torch.randn(L, L, generator=g), 0.1 * torch.randn(L, generator=g), torch.randn(L, L, generator=g) / 2,
         bias + torch.randn(L, generator=g)]
    return str(save_filter(path, *w, model=model_signature(bb)))


# --- transcription of generate_l2p_eot / generate_learn2parallel (T = 0, batch 1) ---------------

class _RefSmallModel(torch.nn.Module):
    """The 2-layer ``LogisticRegression``: Linear -> ReLU -> Linear, a short input zero-padded to
    ``input_dim`` and the output sliced back."""

    def __init__(self, filt):
        super().__init__()
        self.input_dim = filt.block_length
        self.linear1 = torch.nn.Linear(self.input_dim, filt.w1.shape[0])
        self.linear2 = torch.nn.Linear(filt.w1.shape[0], self.input_dim)
        with torch.no_grad():
            self.linear1.weight.copy_(filt.w1), self.linear1.bias.copy_(filt.b1)
            self.linear2.weight.copy_(filt.w2), self.linear2.bias.copy_(filt.b2)

    def forward(self, x):
        d = x.shape[-1]
        if d != self.input_dim:
            x = F.pad(x, pad=(0, self.input_dim - d))
        x = self.linear2(torch.relu(self.linear1(x)))
        return x[:, :d] if d != self.input_dim else x


def _ref_num_transfer(mask_index, steps):
    n = mask_index.sum(dim=1, keepdim=True)
    out = torch.zeros(n.size(0), steps, dtype=torch.int64) + n // steps
    for i in range(n.size(0)):
        out[i, : n[i] % steps] += 1
    return out


@torch.no_grad()
def _ref_l2p(model, small, thres, prompt, steps, gen_length, block_length, mask_id, eos_id, eot):
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for nb in range(num_blocks):
        start = prompt.shape[1] + nb * block_length
        end = start + block_length
        quota = _ref_num_transfer(x[:, start:end] == mask_id, steps)
        i = 0
        while (x[:, start:end] == mask_id).any():
            mask_index = x == mask_id
            logits = model(x)
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            block_logits = small(x0_p[:, start:end].to(dtype=torch.float32))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            transfer[:, start:end] = torch.sigmoid(block_logits) > thres
            transfer = torch.where(mask_index, transfer, False)
            small_eot = (x0 == eos_id) & transfer
            end_conf = torch.where((x0 == eos_id) & mask_index, x0_p, NEG)
            x0_p[:, end:] = NEG
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, NEG)
            for j in range(confidence.shape[0]):
                _, sel = torch.topk(confidence[j], k=int(quota[j, i]))
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
            if eot:
                if small_eot.any():
                    x = x[:, : int(small_eot.to(torch.int8).argmax(dim=-1)[0]) + 1]
                elif (end_conf > NEG).any():
                    x = x[:, : int(end_conf.argmax(dim=-1)[0]) + 1]
            i += 1
    return x


def _check_against_reference(bb, prompt, gen_length, block_length, filter_path, threshold, eot):
    out, counter = run_counted("learn2pd", bb, [prompt], gen_length=gen_length, block_length=block_length,
                               filter_path=filter_path, accept_threshold=threshold, eotp=eot)
    small = _RefSmallModel(load_filter(filter_path))
    ref = _ref_l2p(lambda x: bb.forward(x), small, threshold, torch.tensor([prompt]), gen_length, gen_length,
                   block_length, bb.spec.mask_id, bb.spec.eos_id, eot)
    n = ref.shape[1]
    assert torch.equal(out.sequences[:, :n], ref)
    assert (out.sequences[:, n:] == bb.spec.eos_id).all()  # the cut tail reads as EOS
    return out, counter


@pytest.mark.parametrize("gen_length,block_length", [(32, 32), (32, 8), (24, 8)])
@pytest.mark.parametrize("eot", [True, False])
def test_matches_reference_on_random_backbones(backbone, tmp_path, gen_length, block_length, eot):
    bb = _Hook(backbone, boost=6.0 if eot else 0.0)
    path = _random_filter(tmp_path / "f.json", backbone, block_length)
    cuts = accepted = 0
    for seed, n in ((0, 5), (1, 9), (2, 3)):
        prompt = random_prompts(backbone, lengths=(n,), seed=seed)[0]
        out, c = _check_against_reference(bb, prompt, gen_length, block_length, path, 0.9, eot)
        cuts += len(out.info["eotp_cuts"][0])
        accepted += c.nfe < gen_length
    assert accepted, "the filter should accept something (else this only tests the quota)"
    assert cuts > 0 if eot else cuts == 0


@pytest.mark.parametrize("task", ["arith", "listops"])
def test_matches_reference_on_the_embedded_model(tiny, task, tiny_prompts):
    for prompt in tiny_prompts(task, [0, 1]):
        for gen_length in (64, 128):
            out, c = _check_against_reference(_Hook(tiny), prompt, gen_length, 32, str(DEFAULT_FILTER), 0.96, True)
            assert c.nfe < gen_length / 4 and out.info["eotp_cuts"][0]


# --- degenerate setting: a filter that accepts nothing, no EoTP == blockwise one token per step --

@pytest.mark.parametrize("gen_length,block_length", [(32, 32), (16, 8), (24, 8)])
def test_accepting_nothing_without_eotp_is_blockwise(backbone, tmp_path, gen_length, block_length):
    bb = _Hook(backbone)  # blockwise may propose the mask id; learn2pd never does
    path = _random_filter(tmp_path / "f.json", backbone, block_length)
    prompts = random_prompts(backbone, lengths=(5, 8), seed=4)
    ours, c1 = run_counted("learn2pd", bb, prompts, gen_length=gen_length, block_length=block_length,
                           filter_path=path, accept_threshold=1.0, eotp=False)
    ref, c2 = run_counted("blockwise", bb, prompts, gen_length=gen_length, block_length=block_length)
    assert torch.equal(ours.sequences, ref.sequences) and c1.nfe == c2.nfe == gen_length


def test_accepting_nothing_without_eotp_is_blockwise_on_the_embedded_model(tiny, tiny_prompts):
    prompts = tiny_prompts("arith", [2]) + tiny_prompts("listops", [2])
    ours, c1 = run_counted("learn2pd", tiny, prompts, gen_length=64, accept_threshold=1.0, eotp=False)
    ref, c2 = run_counted("blockwise", tiny, prompts, gen_length=64)
    assert torch.equal(ours.sequences, ref.sequences) and c1.nfe == c2.nfe == 64


# --- the pure rules on hand-made inputs ---------------------------------------------------------

def test_block_features_is_the_block_slice_zeroed_past_the_end():
    conf = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                         [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=torch.float64)
    live = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    got = block_features(conf, live, 2, 4)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor([[0.3, 0.4, 0.5, 0.6], [0.7, 0.6, 0.0, 0.0]]))
    # a block running past the columns the call saw (the reference's zero padding of a cut block)
    assert torch.equal(block_features(conf[:, :4], live[:, :4], 2, 4), torch.tensor([[0.3, 0.4, 0, 0], [0.7, 0.6, 0, 0]]))
    assert torch.equal(block_features(conf, live, 6, 3), torch.zeros(2, 3))
    assert torch.equal(conf, torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]],
                                          dtype=torch.float64))  # inputs untouched


def test_eotp_end_filter_eos_first_else_the_most_confident_eos_proposal():
    E = 9
    x0 = torch.tensor([[4, E, 4, E, E, 4],    # filter accepted EOS at 3 and 4: cut after the first (3)
                       [4, E, 4, E, E, 4],    # no accepted EOS: the most confident masked EOS (4)
                       [4, E, 4, E, E, 4],    # tie at 0.8 between 3 and 4: the lower column
                       [4, 4, 4, 4, 4, 4],    # no EOS proposal: end kept
                       [E, E, E, E, E, E]])   # EOS proposed only where already decoded: end kept
    conf = torch.tensor([[0.5, 0.9, 0.5, 0.6, 0.7, 0.5],
                         [0.5, 0.9, 0.5, 0.6, 0.7, 0.5],
                         [0.5, 0.9, 0.5, 0.8, 0.8, 0.5],
                         [0.5] * 6, [0.99] * 6])
    masked = torch.tensor([[0, 0, 1, 1, 1, 1]] * 4 + [[0] * 6], dtype=torch.bool)
    accepted = torch.zeros_like(masked)
    accepted[0, 3] = accepted[0, 4] = True
    accepted[1, 2] = True  # accepted, but not an EOS proposal
    end = torch.tensor([6, 6, 6, 6, 5])
    new, kind = eotp_end(x0, conf, masked, accepted, E, end)
    assert new.tolist() == [4, 5, 4, 6, 5] and kind.tolist() == [1, 2, 2, 0, 0]
    # an accept outside the masked set is ignored (the sampler restricts accepts to masked columns)
    acc = torch.zeros_like(masked)
    acc[1, 1] = True
    assert eotp_end(x0[1:2], conf[1:2], masked[1:2], acc[1:2], E, end[1:2])[0].tolist() == [5]


def test_filter_logits_are_the_two_layer_mlp(tmp_path, llada):
    path = _random_filter(tmp_path / "f.json", llada, 8)
    filt = load_filter(path)
    x = torch.rand(3, 8)
    ref = _RefSmallModel(filt)(x)
    assert torch.allclose(filt.logits(x), ref, atol=1e-5)
    assert sum(t.numel() for t in (filt.w1, filt.b1, filt.w2, filt.b2)) == 2 * (8 * 8 + 8)


def test_filter_file_round_trip_is_exact(tmp_path, llada):
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(6, 4, generator=g), torch.randn(6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, generator=g)]
    filt = load_filter(str(save_filter(tmp_path / "f.json", *w, model=model_signature(llada), training={"x": 1})))
    assert all(torch.equal(a, b) for a, b in zip((filt.w1, filt.b1, filt.w2, filt.b2), w))
    assert filt.block_length == 4 and filt.training == {"x": 1} and filt.model == model_signature(llada)


# --- the committed filter -------------------------------------------------------------------------

def test_committed_filter_is_the_papers_shape_for_the_embedded_model(tiny):
    filt = load_filter(None)
    assert filt.block_length == 32 and filt.w1.shape == (32, 32)  # Linear(32, 32) -> ReLU -> Linear(32, 32)
    assert signature_mismatch(model_signature(tiny), filt.model) is None
    assert filt.training["command"].startswith("python scripts/train_learn2pd_filter.py")


def test_signature_matches_the_same_weights_in_bf16(tiny):
    half = load_backbone(dtype="bf16")
    assert signature_mismatch(model_signature(half), load_filter(None).model) is None


def test_trained_filter_beats_a_constant_filter_on_fresh_labels(tiny, tiny_prompts):
    """Labels built now, as the training script builds them, from held-out evaluation problems (the
    filter was trained on the tasks' training pool only)."""
    prompts = tiny_prompts("arith", [10, 11, 12]) + tiny_prompts("listops", [10, 11, 12])
    answers, vanilla = TRAIN.reference_answers(tiny, prompts, 64, 32, batch=6)
    egp = TRAIN.egp_rows(tiny, prompts, answers, 64, 32, batch=6)
    rows = {k: torch.cat([vanilla[k], egp[k]]) for k in vanilla}
    filt = load_filter(None)
    m = TRAIN.evaluate([filt.w1, filt.b1, filt.w2, filt.b2], rows, 0.96)["all_positions"]
    assert m["n"] == 32 * len(rows["labels"]) > 1000
    assert m["accuracy_at_0.5"] > m["constant_accuracy"]
    assert m["precision_at_0.96"] > m["positive_rate"]  # accepted predictions are right more often than average


# --- EoTP on the embedded model -----------------------------------------------------------------

@pytest.mark.parametrize("tail", ["drop", "eos"])
def test_eotp_never_cuts_into_a_correct_answer(tiny, tail):
    cuts = 0
    for task in ("arith", "listops"):
        problems = synthetic.test_problems(task)[:3]
        outs = []
        for gen_length in (64, 128):
            prompts = [chat_prompt_ids(tiny.tokenizer, p.prompt) for p in problems]
            out = build_sampler("learn2pd", gen_length=gen_length, eotp_tail=tail).generate(
                tiny, prompts, torch.Generator().manual_seed(0))
            outs.append(out)
        for out in outs:
            for p, events in zip(problems, out.info["eotp_cuts"]):
                gold = len(tiny.tokenizer(p.answer, add_special_tokens=False)["input_ids"])
                assert all(e["answer_length"] >= gold for e in events), (task, p.prompt, gold, events)
                cuts += len(events)
    assert cuts >= 6


def test_eotp_tail_drop_forwards_less_than_eos(tiny, tiny_prompts):
    prompts = tiny_prompts("arith", [0])
    drop, cd = run_counted("learn2pd", tiny, prompts, gen_length=128, eotp_tail="drop")
    eos, ce = run_counted("learn2pd", tiny, prompts, gen_length=128, eotp_tail="eos")
    S = len(prompts[0]) + 128
    assert cd.nfe >= 2 and drop.info["eotp_cuts"][0]  # a call after a cut
    assert ce.token_forwards == ce.nfe * S  # the EOS tail is still forwarded
    assert cd.token_forwards < cd.nfe * S  # the dropped tail is not
    assert (drop.tokens[0, drop.info["eotp_cuts"][0][-1]["answer_length"]:] == tiny.spec.eos_id).all()


@pytest.mark.parametrize("tail", ["drop", "eos"])
def test_batch_equals_singles_on_the_embedded_model(tiny, tail, tiny_prompts):
    prompts = tiny_prompts("arith", [3, 4]) + tiny_prompts("listops", [3])
    assert len({len(p) for p in prompts}) > 1  # left padding in the batch
    batch = build_sampler("learn2pd", gen_length=64, eotp_tail=tail).generate(tiny, prompts, torch.Generator())
    for r, prompt in enumerate(prompts):
        single = build_sampler("learn2pd", gen_length=64, eotp_tail=tail).generate(tiny, [prompt], torch.Generator())
        assert torch.equal(single.tokens, batch.tokens[r:r + 1])
        cut = lambda events: [(e["answer_length"], e["by"]) for e in events]  # noqa: E731  (call numbers differ)
        assert cut(single.info["eotp_cuts"][0]) == cut(batch.info["eotp_cuts"][r])
    assert any(batch.info["eotp_cuts"])


def test_batch_equals_singles_with_cuts_on_a_random_backbone(backbone, tmp_path):
    bb = _Hook(backbone, boost=6.0)
    path = _random_filter(tmp_path / "f.json", backbone, 8)
    prompts = random_prompts(backbone, lengths=(4, 9, 6), seed=5)
    batch = build_sampler("learn2pd", gen_length=24, block_length=8, filter_path=path, accept_threshold=0.9).generate(
        bb, prompts, torch.Generator())
    assert any(batch.info["eotp_cuts"])
    for r, prompt in enumerate(prompts):
        single = build_sampler("learn2pd", gen_length=24, block_length=8, filter_path=path, accept_threshold=0.9).generate(
            bb, [prompt], torch.Generator())
        assert torch.equal(single.tokens, batch.tokens[r:r + 1])


# --- filter files: missing, malformed, mismatched -------------------------------------------------

def _one_line_error(fn, *match):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and "filter_path=" in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def test_missing_filter_file_is_a_clear_error(tmp_path):
    _one_line_error(lambda: Learn2PDConfig(filter_path=str(tmp_path / "nope.json")), "no such file",
                    "train_learn2pd_filter.py")


def test_malformed_filter_files_are_clear_errors(tmp_path, llada):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_error(lambda: Learn2PDConfig(filter_path=str(bad)), "not a readable JSON")
    bad.write_text(json.dumps({"format": "something-else"}))
    _one_line_error(lambda: Learn2PDConfig(filter_path=str(bad)), "format")
    good = json.loads(open(_random_filter(tmp_path / "g.json", llada, 32)).read())
    del good["weights"]["b2"]
    bad.write_text(json.dumps(good))
    _one_line_error(lambda: Learn2PDConfig(filter_path=str(bad)), "malformed")


def test_wrong_feature_size_is_a_clear_error(tmp_path, llada):
    doc = json.loads(open(_random_filter(tmp_path / "g.json", llada, 32)).read())
    doc["weights"]["w1"] = [row[:16] for row in doc["weights"]["w1"]]  # takes 16 features, says 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    _one_line_error(lambda: Learn2PDConfig(filter_path=str(bad)), "feature size", "w1")


def test_wrong_block_length_is_a_clear_error(tmp_path, llada):
    path = _random_filter(tmp_path / "f16.json", llada, 16)
    _one_line_error(lambda: Learn2PDConfig(filter_path=path), "16-position", "block_length=32")
    _one_line_error(lambda: build_sampler("learn2pd", block_length=16, gen_length=64), "32-position")
    assert Learn2PDConfig(filter_path=path, block_length=16).block_length == 16


def test_wrong_model_is_a_clear_error(tiny, tmp_path, llada, tiny_prompts):
    filt = load_filter(None)
    w = (filt.w1, filt.b1, filt.w2, filt.b2)
    prompts = tiny_prompts("arith", [0])
    other = save_filter(tmp_path / "other.json", *w, model=model_signature(llada))  # another model's filter
    _one_line_error(lambda: build_sampler("learn2pd", filter_path=str(other)).generate(tiny, prompts, torch.Generator()),
                    "trained on model", "vocab_size")
    retrained = dict(filt.model, probe=[v + 0.5 for v in filt.model["probe"]])  # same shape, other weights
    path = save_filter(tmp_path / "retrained.json", *w, model=retrained)
    _one_line_error(lambda: build_sampler("learn2pd", filter_path=str(path)).generate(tiny, prompts, torch.Generator()),
                    "weights")


def test_another_models_filter_is_not_applied_to_a_backbone_without_tokenizer(backbone, tmp_path):
    """A test model without tokenizer cannot fail the harness's model check: a filter of another model
    is skipped there (forced quota and EoTP only), its own filter is applied."""
    assert backbone.tokenizer is None
    prompts = random_prompts(backbone, lengths=(5, 8), seed=2)
    bb = _Hook(backbone, boost=6.0)
    default = build_sampler("learn2pd", gen_length=32).generate(bb, prompts, torch.Generator())
    nothing = build_sampler("learn2pd", gen_length=32, accept_threshold=1.0).generate(bb, prompts, torch.Generator())
    assert default.info["filter"].startswith("not applied: trained on another model (")
    assert torch.equal(default.sequences, nothing.sequences)
    own = _random_filter(tmp_path / "own.json", backbone, 32)
    out = build_sampler("learn2pd", gen_length=32, filter_path=own, accept_threshold=0.9).generate(bb, prompts, torch.Generator())
    assert out.info["filter"] == "applied"


# --- config ---------------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    cfg = Learn2PDConfig()
    assert (cfg.block_length, cfg.steps, cfg.eotp, cfg.eotp_tail, cfg.filter_path) == (32, None, True, "drop", None)
    assert cfg.threshold_for("llada") == 0.96 and cfg.threshold_for("dream") == 0.9
    assert Learn2PDConfig(accept_threshold=0.5).threshold_for("dream") == 0.5
    assert Learn2PDConfig(gen_length=64).steps_per_block == 32  # one forced commit per step


@pytest.mark.parametrize("opts,match", [
    (dict(accept_threshold=1.5), "accept_threshold=1.5"),
    (dict(accept_threshold=-0.1), "accept_threshold=-0.1"),
    (dict(eotp_tail="keep"), "eotp_tail='keep' is not one of drop, eos"),
    (dict(steps=3, gen_length=64), "steps=3 must be a positive multiple"),
    (dict(block_length=48, gen_length=64), "block_length=48 must divide gen_length=64"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        Learn2PDConfig(**opts)


def test_steps_sets_the_forced_quota(tiny, tiny_prompts):
    prompts = tiny_prompts("arith", [5])
    out, c = run_counted("learn2pd", tiny, prompts, gen_length=64, steps=4, accept_threshold=1.0, eotp=False)
    assert c.nfe == 4 and not (out.tokens == tiny.spec.mask_id).any()
    assert first_eos_cut(out.tokens, tiny.spec.eos_ids)[0]
