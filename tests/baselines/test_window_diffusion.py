"""window_diffusion: reference transcriptions, far-field exclusion, refresh period, one-token-per-step limits.

Reference transcriptions (written fresh for this test, temperature 0) of vhicrgit/Window-Diffusion
``llada/model/modeling_llada.py`` ``generate`` and ``dream/model/generation_utils.py``
``nearest_sample_fast_v2_cache``.  Their model calls (full forward writing every K/V; a call on the
active columns that scatters its K/V into the cache and attends a gathered window / a cached prefix)
go through the backbone's *general* cached call (``Transformer.forward`` with ``cache``, ``write``
and ``slot_mask``), which tests/asynclane/test_cache.py checks against the transformers oracle; the
sampler uses the static step (``Backbone.step``) and ``KVCache.invalidate``.  So these tests check
the decoding loop (windows, active sets, refresh period, commit rules, quota, early stop), not the
attention numerics.  As in the sampler (see its Deviations), the mask id is never proposed (its
column is ``-inf`` for the argmax and, on the Dream path, before the softmax) and every EOS-like id
ends a Dream answer.

Trajectories are compared, not only answers: the random LLaDA model proposes the same token
almost everywhere, so the *order* of commits (the buffer before every model call) is what tells
two decoders apart.
"""
import pytest
import torch
import torch.nn.functional as F

from asynclane.sampler import build_sampler
from asynclane.testing import LogitsHook, random_backbone, random_prompts, run_counted
from asynclane.tiny_tokenizer import chat_prompt_ids
from baselines import window_diffusion as wd
from baselines.window_diffusion import WindowDiffusionConfig
from eval.tasks import synthetic


# --- a recording backbone -----------------------------------------------------------------------

class _Rec(LogitsHook):
    """Records the buffer and the processed columns of every call, the logits it returns, and adds an
    EOS boost by predicted absolute position (``boost``: {position: value}, the same in the references)."""

    def __init__(self, bb, boost=None):
        super().__init__(bb)
        self.boost = boost or {}
        self.xs, self.cols, self.logits = [], [], []

    def step(self, x, cache, cols, predict=None, **kwargs):
        self.xs.append(x.clone())
        self.cols.append(list(range(*cols)) if isinstance(cols, tuple) else list(cols))
        return super().step(x, cache, cols, predict=predict, **kwargs)

    def forward(self, ids, positions=None, predict=None, **kwargs):
        self.xs.append(ids.clone())
        self.cols.append(list(range(ids.shape[1])))
        return super().forward(ids, positions=positions, predict=predict, **kwargs)

    def adjust(self, logits, ids, positions, rows):
        out = _boost(logits, positions.gather(1, rows), self._bb.spec.eos_id, self.boost)
        self.logits.append(out)
        return out


def _boost(logits, predicted, eos_id, boost):
    """``logits`` (B, P, V) plus ``boost[p]`` on the EOS id of each row predicting position ``p``."""
    if not boost:
        return logits
    add = torch.tensor([[boost.get(int(p), 0.0) for p in row] for row in predicted], dtype=logits.dtype)
    out = logits.clone()
    out[..., eos_id] += add
    return out


def _run(bb, prompt, boost=None, name="window_diffusion", **opts):
    rec = _Rec(bb, boost)
    out = build_sampler(name, **opts).generate(rec, [prompt], torch.Generator().manual_seed(0))
    return out, rec


def _same_trajectory(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def _topk(score, k):
    """``torch.topk(score, k).indices`` with ties toward the lower position (the sampler's documented
    tie rule; torch.topk leaves the order of ties unspecified)."""
    return score.argsort(descending=True, stable=True)[:k]


# --- transcription of llada/model/modeling_llada.py `generate` (T = 0, low_confidence) -----------

def _ref_llada(bb, prompt, gen_length, window_tokens, active_tokens, refresh_cycle, xs, cols):
    mask_id = bb.spec.mask_id
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    N = x.shape[1]
    cache = bb.new_cache(1, N)

    def model(ids, positions, slot_mask=None):
        xs.append(x.clone())
        cols.append(positions.tolist())
        hidden = bb.model(ids, positions[None], None, cache, write=True, slot_mask=slot_mask)
        return bb.model.head(hidden)

    def top1(logits, mask_index, base):
        x0 = logits.index_fill(-1, torch.tensor([mask_id]), float("-inf")).argmax(-1)
        p = F.softmax(logits, dim=-1)
        x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
        x0 = torch.where(mask_index, x0, base)
        confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf")))
        transfer = torch.zeros_like(x0, dtype=torch.bool)
        transfer[0, _topk(confidence[0], 1)] = True  # steps == gen_length: quota 1
        return x0, transfer

    def ranks():
        mask_index = x == mask_id
        rank = mask_index.long().cumsum(1) - 1
        return rank.masked_fill(~mask_index, 10**9), mask_index

    offset = 0
    for _ in range(gen_length):
        if offset == 0:
            offset += 1
            mask_index = x == mask_id
            x0, transfer = top1(model(x, torch.arange(N)), mask_index, x)
            x[transfer] = x0[transfer]
            rank, mask_index = ranks()
            active_idx = (((rank >= 0) & (rank < active_tokens)) | transfer)[0].nonzero()[:, 0]
            window_idx = (((rank >= 0) & (rank < window_tokens)) | ~mask_index)[0].nonzero()[:, 0]
            decoded = torch.zeros_like(x, dtype=torch.bool)
        else:
            offset += 1
            all_x = x[:, active_idx]
            window = torch.zeros(1, N, dtype=torch.bool)
            window[0, window_idx] = True
            x0, transfer = top1(model(all_x, active_idx, window), all_x == mask_id, all_x)
            k = transfer[0].nonzero()[:, 0]
            x[0, active_idx[k]] = x0[0, k]
            decoded[0, active_idx[k]] = True
            rank, _ = ranks()
            active_idx = (((rank >= 0) & (rank < active_tokens)) | decoded)[0].nonzero()[:, 0]
        if offset == refresh_cycle:
            offset = 0
    return x


# --- transcription of dream/model/generation_utils.py `nearest_sample_fast_v2_cache` (T = 0) -----

def _ref_dream(bb, prompt, gen_length, o_win_size, i_win_size, refresh_cycle, slide_window, early_stop,
               xs, cols, top_p=None, boost=None, eps=1e-3):
    mask_id, eos_ids = bb.spec.mask_id, bb.spec.eos_ids
    x = torch.tensor([list(prompt) + [mask_id] * gen_length])
    N, P = x.shape[1], len(prompt)
    tok_idx = torch.arange(N)[None]
    timesteps = torch.linspace(1, eps, gen_length + 1)
    reach_eos = False
    cache = None

    def model(ids, positions, keep=None):
        xs.append(F.pad(x, (0, N - x.shape[1]), value=bb.spec.eos_id))
        cols.append(positions[0].tolist())
        slot_mask = None if keep is None else cache.window(0, keep)
        hidden = bb.model(ids, positions, None, cache, write=True, slot_mask=slot_mask)
        raw = bb.model.head(hidden)
        logits = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)  # row j predicts positions[j]
        logits = _boost(logits, positions, bb.spec.eos_id, boost)
        return logits.index_fill(-1, torch.tensor([mask_id]), float("-inf"))

    def sample_tokens(logits):
        if top_p is not None and top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            remove = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
            remove[..., 1:] = remove[..., :-1].clone()
            remove[..., 0] = False
            logits = logits.masked_fill(torch.zeros_like(remove).scatter_(-1, order, remove),
                                        torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1)
        _, x0 = probs.max(dim=-1)
        return torch.sum(probs * torch.log(probs + 1e-10), dim=-1), x0

    for i in range(gen_length):
        mask_index = x == mask_id
        ranks = mask_index.long().cumsum(-1)
        if not mask_index.any():
            break
        full = i % refresh_cycle == 0 or reach_eos
        if full:
            cache = bb.new_cache(1, N)
            keep = int(((~mask_index) | (ranks < o_win_size)).long().sum())
            pruned_x = x[:, :keep]
            win = ((ranks >= 1) & (ranks <= i_win_size)).nonzero()[:, 1]
            start, stop = int(win[0]), int(win[-1]) + 1
            transfer = torch.zeros_like(pruned_x, dtype=torch.bool)
            transfer[:, start:stop] = mask_index[:, start:stop]
            logits = model(pruned_x, tok_idx[:, :keep])
        else:
            if slide_window:
                stop = int(((ranks >= 1) & (ranks <= i_win_size)).nonzero()[-1, 1]) + 1
            step_x = x[:, start:stop]
            transfer = mask_index[:, start:stop]
            logits = model(step_x, tok_idx[:, start:stop], keep)
        confidence, x0 = sample_tokens(logits[transfer])
        if full:
            x[:, start] = x0[0]
            continue
        t, s = timesteps[i], timesteps[i + 1]
        num_mask = (mask_index.sum().float() / mask_index.shape[0]).item()
        if early_stop:
            k = 1
        else:
            k = int(num_mask * (1 - s / t)) if i < gen_length - 1 else int(num_mask)
        full_confidence = torch.full(step_x.shape, float("-inf"))
        full_confidence[transfer] = confidence
        if k > 0:
            picked = _topk(full_confidence[0], k)
            x_ = torch.full_like(step_x, mask_id)
            x_[transfer] = x0
            x[0, start:stop][picked] = x_[0, picked]
            if early_stop:
                is_eos = torch.isin(x[0, P:], torch.tensor(eos_ids))
                if is_eos.any():
                    x = x[:, :P + int(is_eos.nonzero()[0, 0]) + 1]
                    reach_eos = True
    return F.pad(x, (0, N - x.shape[1]), value=bb.spec.eos_id)


# --- the reference transcriptions ---------------------------------------------------------------

LLADA_SETTINGS = [  # (gen_length, window_tokens, active_tokens, refresh_cycle)
    (32, 8, 3, 5),
    (32, 12, 4, 8),
    (24, 24, 24, 6),  # windows covering everything: only the buffer's staleness differs from blockwise
    (32, 6, 1, 4),
]


@pytest.mark.parametrize("gen_length,window_tokens,active_tokens,refresh_cycle", LLADA_SETTINGS)
def test_llada_matches_the_reference(llada, gen_length, window_tokens, active_tokens, refresh_cycle):
    prompt = random_prompts(llada, lengths=(6,), seed=1)[0]
    out, rec = _run(llada, prompt, gen_length=gen_length, window_tokens=window_tokens,
                    active_tokens=active_tokens, refresh_cycle=refresh_cycle)
    xs, cols = [], []
    want = _ref_llada(llada, prompt, gen_length, window_tokens, active_tokens, refresh_cycle, xs, cols)
    assert torch.equal(out.sequences, want)
    assert _same_trajectory(rec.xs, xs)
    assert rec.cols == cols  # the same query columns in every call
    assert len(rec.xs) == gen_length  # one token per step


DREAM_SETTINGS = [  # (gen_length, o_win_size, i_win_size, refresh_cycle, slide_window, early_stop, top_p)
    (32, 10, 3, 5, True, False, None),
    (32, 16, 4, 8, True, False, 0.9),
    (32, 40, 32, 6, True, False, None),  # windows covering everything
    (32, 14, 6, 5, False, False, None),  # fixed active window: it never runs out of masks here
    (32, 10, 3, 5, True, True, None),
]


@pytest.mark.parametrize("gen_length,o_win,i_win,refresh_cycle,slide,early_stop,top_p", DREAM_SETTINGS)
@pytest.mark.parametrize("eos_at", [None, 14])
def test_dream_matches_the_reference(dream, gen_length, o_win, i_win, refresh_cycle, slide, early_stop, top_p, eos_at):
    prompt = random_prompts(dream, lengths=(6,), seed=1)[0]
    boost = {} if eos_at is None else {len(prompt) + j: 40.0 for j in range(eos_at, gen_length)}
    out, rec = _run(dream, prompt, boost, gen_length=gen_length, window_tokens=o_win, active_tokens=i_win,
                    refresh_cycle=refresh_cycle, slide_window=slide, early_stop=early_stop, top_p=top_p)
    xs, cols = [], []
    want = _ref_dream(dream, prompt, gen_length, o_win, i_win, refresh_cycle, slide, early_stop, xs, cols,
                      top_p=top_p, boost=boost)
    assert torch.equal(out.sequences, want)
    if early_stop:  # the reference's buffer is cut after the first EOS, the sampler's keeps the full budget
        assert _same_trajectory([_cut_after_eos(x, len(prompt), dream.spec) for x in rec.xs],
                                [_cut_after_eos(x, len(prompt), dream.spec) for x in xs])
    else:
        assert _same_trajectory(rec.xs, xs)
    assert rec.cols == cols  # the same query columns in every call
    if early_stop and eos_at is not None:
        assert len(rec.xs) < gen_length  # the masks after the first EOS are never decoded
        first = out.tokens[0].tolist().index(dream.spec.eos_id)
        assert (out.tokens[0, first:] == dream.spec.eos_id).all()


def _cut_after_eos(x, P, spec):
    """``x`` with every column after the first EOS-like id of the answer set to the EOS id."""
    gen = x[0, P:].tolist()
    first = next((j for j, t in enumerate(gen) if t in spec.eos_ids), None)
    out = x.clone()
    if first is not None:
        out[0, P + first + 1:] = spec.eos_id
    return out


# --- far field, refresh period ------------------------------------------------------------------

class _CorruptFar(_Rec):
    """Before every windowed call, overwrites the K/V of the slots the call will not read with large
    random values (in the live cache, so they stay corrupted until something rewrites them), and
    records which slots those were."""

    def __init__(self, bb, slots=None):
        super().__init__(bb)
        self.hidden, self.g = [], torch.Generator().manual_seed(7)
        self.slots = slots  # None: the unread slots; else these slots (the control)

    def step(self, x, cache, cols, predict=None, **kwargs):
        refresh = isinstance(cols, tuple) and cols[0] == 0
        if not refresh:
            own = set(range(*cols)) if isinstance(cols, tuple) else set(cols)
            unread = [s for s in range(cache.length) if not cache.filled[0, s] and s not in own]
            self.hidden.append(unread)
            for t in cache.kv:
                for s in (unread if self.slots is None else self.slots):
                    t[:, s] = 50.0 * torch.randn(t[:, s].shape, generator=self.g)
        else:
            self.hidden.append(None)
        return super().step(x, cache, cols, predict=predict, **kwargs)


def _expected_far(rec, family, P, S, window_tokens):
    """The far field of every call by the reference's rule, from the recorded buffers: None at a refresh."""
    out, far = [], None
    for x, cols in zip(rec.xs, rec.cols):
        masks = [c for c in range(P, S) if x[0, c] == rec.spec.mask_id]
        if cols[0] == 0:  # refresh: the plan comes from the buffer after its commit (LLaDA) / before it (Dream)
            far = None
            if family == "dream":
                keep = S - len(masks) + min(window_tokens - 1, len(masks))
                far = list(range(keep, S))
            out.append(None)
            continue
        if far is None:  # LLaDA: the first windowed call sees the refresh's commit
            far = masks[window_tokens:]
        out.append(far)
    return out


@pytest.mark.parametrize("window_tokens,active_tokens,refresh_cycle", [(8, 3, 5), (6, 2, 4)])
def test_far_field_is_not_attended_until_the_next_refresh(backbone, window_tokens, active_tokens, refresh_cycle):
    fam, G = backbone.spec.family, 32
    prompt = random_prompts(backbone, lengths=(6,), seed=1)[0]
    opts = dict(gen_length=G, window_tokens=window_tokens, active_tokens=active_tokens, refresh_cycle=refresh_cycle)
    clean, rec = _run(backbone, prompt, **opts)
    corrupt = _CorruptFar(backbone)
    got = build_sampler("window_diffusion", **opts).generate(corrupt, [prompt], torch.Generator().manual_seed(0))
    P, S = len(prompt), len(prompt) + G
    far = _expected_far(rec, fam, P, S, window_tokens)
    assert [None if h is None else sorted(h) for h in corrupt.hidden] == far  # exactly the far field is hidden
    assert any(f for f in far if f)  # and there was one
    # corrupted far-field K/V change nothing: every call's logits and the answer are the same
    assert len(corrupt.logits) == len(rec.logits)
    assert all(torch.equal(a, b) for a, b in zip(corrupt.logits, rec.logits))
    assert torch.equal(got.sequences, clean.sequences)
    # control: corrupting a slot the windowed calls do read (the prompt's first) changes their logits
    control = _CorruptFar(backbone, slots=[0])
    build_sampler("window_diffusion", **opts).generate(control, [prompt], torch.Generator().manual_seed(0))
    windowed = [i for i, h in enumerate(control.hidden) if h is not None]
    assert not all(torch.equal(control.logits[i], rec.logits[i]) for i in windowed)


@pytest.mark.parametrize("refresh_cycle", [1, 3, 7, 32])
def test_refresh_happens_every_refresh_cycle_steps(backbone, refresh_cycle):
    G = 32
    prompt = random_prompts(backbone, lengths=(5,), seed=2)[0]
    out, counting = run_counted("window_diffusion", backbone, [prompt], 0, gen_length=G, window_tokens=8,
                                active_tokens=4, refresh_cycle=refresh_cycle)
    _, rec = _run(backbone, prompt, gen_length=G, window_tokens=8, active_tokens=4, refresh_cycle=refresh_cycle)
    refreshes = [i for i, c in enumerate(rec.cols) if c[0] == 0]
    assert refreshes == list(range(0, G, refresh_cycle))
    assert counting.nfe == G == len(rec.cols)
    # a windowed call forwards at most active_tokens masks; LLaDA's other columns are the phase's commits
    # (the refresh's included), Dream's are the decoded columns inside its window
    mask = backbone.spec.mask_id
    for x, c in zip(rec.xs, rec.cols):
        if c[0] != 0:
            masked = int((x[0, c] == mask).sum())
            assert 1 <= masked <= 4
            if backbone.spec.family == "llada":
                assert len(c) - masked <= refresh_cycle
    assert counting.token_forwards == sum(len(c) for c in rec.cols)
    assert not (out.tokens == backbone.spec.mask_id).any()


def test_dream_early_stop_refreshes_every_step_after_the_first_eos(dream):
    prompt = random_prompts(dream, lengths=(6,), seed=1)[0]
    P, G = len(prompt), 32
    out, rec = _run(dream, prompt, {P + j: 40.0 for j in range(12, G)}, gen_length=G, window_tokens=10,
                    active_tokens=3, refresh_cycle=5, early_stop=True)
    first = out.tokens[0].tolist().index(dream.spec.eos_id)
    assert (out.tokens[0, first:] == dream.spec.eos_id).all() and not (out.tokens == dream.spec.mask_id).any()
    # the first call whose buffer holds the EOS is followed by refreshes only, over the truncated sequence
    seen = next(i for i, x in enumerate(rec.xs) if (x[0, P:] == dream.spec.eos_id).any())
    assert all(c[0] == 0 and c[-1] <= P + first for c in rec.cols[seen + 1:])
    assert len(rec.cols) == first + 1  # one commit per step, none after the EOS


# --- the one-token-per-step limits --------------------------------------------------------------

def _reference_sampler(family, G):
    """Our one-token-per-step reference of the variant's refresh: LLaDA, the most confident mask of the whole
    answer (blockwise, one block); Dream, the leftmost mask (blockwise, blocks of one)."""
    return dict(name="blockwise", gen_length=G, block_length=G if family == "llada" else 1)


@pytest.mark.parametrize("gen_length", [16, 32])
def test_full_windows_refreshed_every_step_are_the_one_token_per_step_reference(backbone, gen_length):
    prompt = random_prompts(backbone, lengths=(7,), seed=3)[0]
    out, rec = _run(backbone, prompt, gen_length=gen_length, window_tokens=gen_length + 2,
                    active_tokens=gen_length, refresh_cycle=1)
    ref, ref_rec = _run(backbone, prompt, **_reference_sampler(backbone.spec.family, gen_length))
    assert torch.equal(out.sequences, ref.sequences)
    assert _same_trajectory(rec.xs, ref_rec.xs)


@pytest.mark.parametrize("refresh_cycle", [4, 32])
def test_full_windows_on_a_one_layer_model_equal_blockwise_between_refreshes(refresh_cycle):
    """One layer: a cached K/V depends only on its token and position, so the buffer is never stale and
    the windowed steps (queries = every mask and this phase's commits) are full forwards, exactly."""
    bb = random_backbone("llada", n_layers=1)
    prompt = random_prompts(bb, lengths=(6,), seed=1)[0]
    out, rec = _run(bb, prompt, gen_length=32, window_tokens=40, active_tokens=32, refresh_cycle=refresh_cycle)
    ref, ref_rec = _run(bb, prompt, **_reference_sampler("llada", 32))
    assert torch.equal(out.sequences, ref.sequences)
    assert _same_trajectory(rec.xs, ref_rec.xs)
    assert sum(len(c) for c in rec.cols) < sum(len(c) for c in ref_rec.cols)


# --- the embedded model -------------------------------------------------------------------------

def _tiny_prompt(tiny, task="arith", i=2):
    return chat_prompt_ids(tiny.tokenizer, synthetic.test_problems(task)[i].prompt)


def test_embedded_refreshed_every_step_is_blockwise(tiny):
    prompt = _tiny_prompt(tiny)
    out, rec = _run(tiny, prompt, gen_length=32, window_tokens=40, active_tokens=32, refresh_cycle=1)
    ref, ref_rec = _run(tiny, prompt, name="blockwise", gen_length=32, block_length=32)
    assert torch.equal(out.sequences, ref.sequences)
    assert _same_trajectory(rec.xs, ref_rec.xs)


@pytest.mark.parametrize("task,i,gen_length,opts", [
    ("arith", 2, 64, dict(window_tokens=16, active_tokens=4, refresh_cycle=8)),
    ("listops", 3, 128, dict()),  # the LLaDA defaults: 64 / 16 / 32
])
def test_embedded_matches_the_reference(tiny, task, i, gen_length, opts):
    prompt = _tiny_prompt(tiny, task, i)
    cfg = WindowDiffusionConfig(gen_length=gen_length, **opts)
    out, rec = _run(tiny, prompt, gen_length=gen_length, **opts)
    xs, cols = [], []
    want = _ref_llada(tiny, prompt, gen_length, cfg.window("llada"), cfg.active_tokens, cfg.refresh_cycle, xs, cols)
    assert torch.equal(out.sequences, want)
    assert _same_trajectory(rec.xs, xs) and rec.cols == cols


# --- corner cases, defaults, validation ---------------------------------------------------------

def test_dream_masks_left_after_the_budget_get_refresh_steps(dream):
    """active_tokens = 1: the last step's quota of two overruns the window (the reference would write the
    mask over a decoded token); the mask left is decoded by one more refresh step."""
    prompt = random_prompts(dream, lengths=(6,), seed=1)[0]
    out, rec = _run(dream, prompt, gen_length=16, window_tokens=8, active_tokens=1, refresh_cycle=4)
    assert not (out.tokens == dream.spec.mask_id).any()
    assert len(rec.cols) == 17 and rec.cols[-1][0] == 0


def test_dream_fixed_window_that_runs_out_skips_the_call(dream):
    """slide_window off: once the phase's window holds no mask the step makes no call (the reference would
    write the mask over decoded tokens); the masks left after the budget are decoded by refresh steps."""
    prompt = random_prompts(dream, lengths=(6,), seed=1)[0]
    out, rec = _run(dream, prompt, gen_length=32, window_tokens=8, active_tokens=2, refresh_cycle=8,
                    slide_window=False)
    assert not (out.tokens == dream.spec.mask_id).any()
    windowed = [(x, c) for x, c in zip(rec.xs, rec.cols) if c[0] != 0]
    assert windowed and all((x[0, c] == dream.spec.mask_id).any() for x, c in windowed)
    refreshes = [i for i, c in enumerate(rec.cols) if c[0] == 0]
    # steps 0, 8, 16, 24 refresh; the window's one mask is decoded at the phase's first windowed step (the
    # first phase's quota starts at 0: two calls), then the phase idles without calls
    assert refreshes[:5] == [0, 3, 5, 7, 9]
    assert len(rec.cols) > 32 and all(c[0] == 0 for c in rec.cols[9:])  # after the budget: refreshes only


def test_defaults_are_the_reference_eval_settings():
    cfg = WindowDiffusionConfig()
    assert (cfg.window("llada"), cfg.window("dream")) == (64, 128)  # window_tokens / o_win_size
    assert (cfg.active_tokens, cfg.refresh_cycle) == (16, 32)
    assert cfg.remasking == "low_confidence" and cfg.temperature == 0
    assert (cfg.slide_window, cfg.early_stop, cfg.top_p, cfg.top_k, cfg.alg_temp, cfg.eps) == (True, False, None, None,
                                                                                                 None, 1e-3)
    assert WindowDiffusionConfig(window_tokens=9).window("dream") == 9


@pytest.mark.parametrize("opts,match", [
    (dict(window_tokens=1), "window_tokens=1"),
    (dict(active_tokens=0), "active_tokens=0"),
    (dict(refresh_cycle=0), "refresh_cycle=0"),
    (dict(remasking="top"), "remasking='top'.*low_confidence"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=0), "top_k=0"),
    (dict(alg_temp=-1.0), "alg_temp=-1.0"),
    (dict(eps=1.0), "eps=1.0"),
])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        WindowDiffusionConfig(**opts)


def test_plan_helpers():
    assert wd.runs([3, 4, 5, 8, 10, 11]) == [(3, 6), (8, 9), (10, 12)]
    active, far = wd.llada_plan([10, 11, 13, 14, 15, 20], window_tokens=4, active_tokens=2, extra=[12])
    assert active == [10, 11, 12] and far == [15, 20]
    # x[:20] with masks at 12, 13, 15, 18: keep the decoded columns and the masks of rank 1..2
    assert wd.dream_keep(20, [12, 13, 15, 18], window_tokens=3) == 16 + 2
    assert wd.dream_window_end(20, [12, 13, 15, 18], active_tokens=2) == 15
    assert wd.dream_window_end(20, [12, 13], active_tokens=2) == 20


def test_dream_quota_matches_the_schedule():
    ts = torch.linspace(1, 1e-3, 33)
    assert wd.dream_quota(31, ts[1], ts[2], last=False) == 0  # one commit ahead of the schedule: none
    assert wd.dream_quota(31, ts[2], ts[3], last=False) == 1
    assert wd.dream_quota(2, ts[31], ts[32], last=True) == 2
    assert wd.dream_quota(7, ts[5], ts[6], last=False) == int(torch.tensor(7.0) * (1 - ts[6] / ts[5]))
