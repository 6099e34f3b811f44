"""Window-Diffusion: one token per step over a sliding window, with phase-level K/V refresh.

Sources: Zuo, Ke, Liu, Lou, Wang, Zhou, "Window-Diffusion", arXiv 2601.20332 [P-abstract];
vhicrgit/Window-Diffusion at d8bb349 [C]: ``llada/model/modeling_llada.py`` (``generate``) and
``dream/model/generation_utils.py`` (``nearest_sample_fast_v2_cache``), defaults from
``llada/eval.py``, ``dream/eval.py`` and both ``scripts/run_benchmarks.sh``
(docs/research/baselines_seeds.md §5).  Every ``refresh_cycle`` steps a refresh forward rewrites
the K/V cache and commits one token; the steps in between recompute only the *active* positions
(their K/V scattered into the cache), attend the cached *buffer*, and leave the *far field* (masks
beyond the first ``window_tokens``) out of attention; one token per step.  The variant follows the
backbone family, as the reference has one per model.  LLaDA: full refresh forward, the most
confident mask anywhere; active = first ``active_tokens`` masks + this phase's commits.  Dream:
the refresh covers the kept prefix only and commits the leftmost mask; active = a window from that
token to the ``active_tokens``-th mask; neg-entropy confidence, Dream's timestep quota (or one per
step and EOS truncation with ``early_stop``).  Defaults: LLaDA window 64 / active 16 / refresh 32;
Dream 128 / 16 / 32, slide on, early stop off.  Deviations, in brief: batch > 1 by row pooling (the reference: batch 1); every EOS-like
id ends a Dream answer; an active column outside the window attends itself; no re-masking where
the reference's top-k overruns a window; extra refresh steps for masks left after ``gen_length``
steps; the mask id is never proposed; ties toward the lower position.  Algorithm, options and
every deviation with its source: docs/samplers/window_diffusion.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch

from asynclane import rules
from asynclane.rowpool import pooled_generate
from asynclane.sampler import BaseSampler, Generation, SamplerConfig, finish, init_buffer, read_host, register
from baselines.blockwise import REMASKING, random_confidence
from baselines.dream import commit_sampled, dream_sample_tokens, dream_timesteps


# --------------------------------------------------------------------------- rules only window_diffusion uses

def runs(cols: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted distinct columns as maximal ``[lo, hi)`` runs of consecutive columns."""
    out: list[list[int]] = []
    for c in cols:
        if out and out[-1][1] == c:
            out[-1][1] = c + 1
        else:
            out.append([c, c + 1])
    return [(lo, hi) for lo, hi in out]


def llada_plan(masks: Sequence[int], window_tokens: int, active_tokens: int,
               extra: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """(active, far): the LLaDA variant's window plan over the masked columns ``masks`` (sorted).

    ``build_window_plan`` / ``update_window_plan`` [C]: active = the first ``active_tokens`` masks
    plus ``extra`` (the refresh's commit, or this phase's commits); window = every decoded column
    plus the first ``window_tokens`` masks, so the far field is every later mask.
    """
    return sorted(set(masks[:active_tokens]) | set(extra)), list(masks[window_tokens:])


def dream_keep(end: int, masks: Sequence[int], window_tokens: int) -> int:
    """Length of the Dream variant's kept prefix of ``x[:end]``: every decoded column plus the masks
    of 1-based rank < ``window_tokens`` (``keep_mask.sum()`` [C]; the reference keeps that many
    *leading* columns, which is the kept set when decoding has run left to right)."""
    return end - len(masks) + min(window_tokens - 1, len(masks))


def dream_window_end(end: int, masks: Sequence[int], active_tokens: int) -> int:
    """Exclusive end of the Dream variant's active window: the column of the mask of 1-based rank
    ``active_tokens + 1`` (the window holds every column whose rank is <= ``active_tokens``), or
    ``end`` when there are no more masks than that [C]."""
    return masks[active_tokens] if len(masks) > active_tokens else end


def dream_quota(n_masked: int, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """Dream's timestep quota on the host: ``int(m * (1 - s / t))`` in float32, ``m`` at the last step
    (``nearest_sample_fast_v2_cache`` [C], the quota of Dream's own ``_sample``)."""
    m = torch.tensor(float(n_masked), dtype=torch.float32)
    return n_masked if last else int(m * (1 - s / t))


@dataclass
class WindowDiffusionConfig(SamplerConfig):
    """Window-Diffusion settings; see the module docstring for sources."""

    window_tokens: Optional[int] = None  # None: FAMILY_WINDOW_TOKENS[family]; Dream's o_win_size
    active_tokens: int = 16  # Dream's i_win_size
    refresh_cycle: int = 32
    remasking: str = "low_confidence"  # LLaDA variant
    top_p: Optional[float] = None  # Dream variant (top_p / top_k / alg_temp / eps / slide / early stop)
    top_k: Optional[int] = None
    alg_temp: Optional[float] = None
    eps: float = 1e-3
    slide_window: bool = True
    early_stop: bool = False

    FAMILY_WINDOW_TOKENS: ClassVar[dict] = {"llada": 64, "dream": 128}

    def __post_init__(self):
        super().__post_init__()
        if self.window_tokens is not None and self.window_tokens < 2:
            raise ValueError(f"window_tokens={self.window_tokens} must be an integer >= 2, or null for the "
                             f"family default ({self.FAMILY_WINDOW_TOKENS})")
        for key in ("active_tokens", "refresh_cycle"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be a positive integer")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r} is not one of {', '.join(REMASKING)}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1], or null for no nucleus filter")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be a positive integer, or null for no top-k filter")
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ValueError(f"alg_temp={self.alg_temp} must be >= 0, or null (0/null: top-k positions)")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps={self.eps} must lie in (0, 1) (the end of Dream's t grid; reference 1e-3)")

    def window(self, family: str) -> int:
        """``window_tokens``, or the family's default when unset."""
        return self.FAMILY_WINDOW_TOKENS[family] if self.window_tokens is None else self.window_tokens


@register("window_diffusion")
class WindowDiffusionSampler(BaseSampler):
    """Window-Diffusion ``generate`` (LLaDA) / ``nearest_sample_fast_v2_cache`` (Dream), chosen by family."""

    Config = WindowDiffusionConfig
    can_batch = True  # by row pooling (asynclane.rowpool): one decoding per row, the calls shared
    pools_rows = True

    @torch.no_grad()
    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        if len(prompts) != 1:  # per-row rules: the rows decode side by side, their calls pooled
            return pooled_generate(self.generate, backbone, prompts, rng)
        x, _, _, P = init_buffer(backbone, prompts, self.cfg.gen_length)
        cache = backbone.new_cache(1, x.shape[1])
        run = self._dream if backbone.spec.family == "dream" else self._llada
        return finish(run(backbone, x, cache, P, rng), P, backbone.spec)

    # ------------------------------------------------------------------ LLaDA variant

    def _llada(self, backbone, x, cache, P, rng):
        cfg, mask = self.cfg, backbone.spec.mask_id
        S, G = x.shape[1], cfg.gen_length
        Wo, Wi, R = cfg.window("llada"), cfg.active_tokens, cfg.refresh_cycle
        gen = [mask] * G  # host mirror of x[0, P:]
        active: list[int] = []
        phase: list[int] = []  # columns committed by this phase's windowed steps
        every = torch.arange(P, S, device=x.device)
        for i in range(G):  # steps = gen_length: LLaDA's uniform quota is one token per step
            refresh = i % R == 0
            if refresh:  # full forward: every slot rewritten and attended; predictions for the answer
                cols, idx = (0, S), every
                logits = backbone.step(x, cache, cols, predict=(P, S))
            else:  # active columns only: fresh K/V scattered into their slots, filled slots attended
                idx = torch.tensor(active, device=x.device)
                logits = backbone.step(x, cache, active, predict=active)
            cur = x[0, idx][None]
            proposal = rules.propose(logits, mask, cfg.temperature, rng)
            if cfg.remasking == "low_confidence":
                score = rules.confidence_prob(logits, proposal)
            else:
                score = random_confidence(proposal.shape, rng, device=x.device)
            commit = rules.commit_topk(rules.restrict_confidence(score, cur == mask), 1)
            x[0].index_copy_(0, idx, torch.where(commit, proposal, cur)[0])
            new = read_host(x[0, P:])[0]
            done = [P + j for j in range(G) if gen[j] == mask and new[j] != mask]
            if not done:
                raise RuntimeError("window_diffusion: a step committed nothing (non-finite logits?)")
            gen = new
            masks = [P + j for j in range(G) if gen[j] == mask]
            if not masks:
                break
            if refresh:  # the phase's plan: its window is fixed until the next refresh
                active, far = llada_plan(masks, Wo, Wi, done)
                for lo, hi in runs(far):  # the far field: cached at the refresh, hidden until the next
                    cache.invalidate(lo, hi)
                phase = []
            else:
                phase += done
                active, _ = llada_plan(masks, Wo, Wi, phase)
        return x

    # ------------------------------------------------------------------ Dream variant

    def _dream(self, backbone, x, cache, P, rng):
        cfg, spec = self.cfg, backbone.spec
        mask = spec.mask_id
        S, G = x.shape[1], cfg.gen_length
        Wo, Wi, R = cfg.window("dream"), cfg.active_tokens, cfg.refresh_cycle
        eos = set(spec.eos_ids)
        sample = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, rng=rng)
        timesteps = dream_timesteps(G, cfg.eps)  # on the host: the quota is host arithmetic
        gen = [mask] * G  # host mirror of x[0, P:end]
        end = S  # the sequence's end: early stop truncates it after the first EOS
        reach_eos = False
        start = stop = 0
        i = 0
        while True:
            masks = [P + j for j in range(end - P) if gen[j] == mask]
            if not masks:
                break
            # steps = gen_length; masks left after them (see Deviations) get further refresh steps
            windowed = not (i % R == 0 or reach_eos or i >= G)
            if not windowed:
                keep = dream_keep(end, masks, Wo)
                start, stop = masks[0], dream_window_end(end, masks, Wi)
                cache.invalidate(keep, S)  # the reference resets its cache and forwards x[:keep]
                logits = backbone.step(x, cache, (0, keep), predict=(start, start + 1))
                tok = dream_sample_tokens(rules.without_mask(logits[0], mask), **sample)[1]
                x[0, start:start + 1] = tok  # the window's first mask, unconditionally
            else:
                if cfg.slide_window:
                    stop = dream_window_end(end, masks, Wi)
                want = [c for c in masks if c < stop]  # every one lies after `start`, the refresh's commit
                if not want:  # only without slide_window (see Deviations): nothing to decode, no call
                    i += 1
                    continue
                k = 1 if cfg.early_stop else dream_quota(len(masks), timesteps[i], timesteps[i + 1], i == G - 1)
                logits = backbone.step(x, cache, (start, stop), predict=want)
                if k > 0:
                    conf, proposal = dream_sample_tokens(rules.without_mask(logits[0], mask),
                                                         measure="neg_entropy", **sample)
                    k = min(k, len(want))
                    if cfg.alg_temp:
                        commit = commit_sampled(conf[None], k, cfg.alg_temp, rng)
                    else:
                        commit = rules.commit_topk(conf[None], k)
                    idx = torch.tensor(want, device=x.device)
                    x[0].index_copy_(0, idx, torch.where(commit[0], proposal, x[0, idx]))
            gen = read_host(x[0, P:end])[0]
            if cfg.early_stop and windowed:  # checked after a windowed step only [C]
                first = next((j for j, t in enumerate(gen) if t in eos), None)
                if first is not None:
                    end, reach_eos = P + first + 1, True  # every later step is a refresh [C]
                    gen = gen[:first + 1]
            i += 1
        if end < S:
            x[0, end:] = spec.eos_id  # the reference returns x[:end]; the harness keeps the full budget
        return x
