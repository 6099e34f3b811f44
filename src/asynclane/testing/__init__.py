"""Tiny random backbones for tests and examples (no checkpoint, no network).

``random_backbone("llada")`` / ``random_backbone("dream")`` build a few-layer model of the
family with seeded weights scaled so logits are well spread (confidence ties are rare, which
keeps token-for-token equivalence tests meaningful), and a spec with its own mask/EOS ids.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

from ..backbone import Backbone, BackboneSpec, ModelConfig, Transformer
from ..checkpoint import native_views

# ids inside the random vocabulary; tests must read them from backbone.spec, never hard-code
_VOCAB = 96


def random_config(family: str, **over) -> ModelConfig:
    base = dict(family=family, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4 if family == "llada" else 2,
                mlp_hidden=96, vocab_size=_VOCAB, rope_theta=500000.0 if family == "llada" else 1e6,
                norm_eps=1e-5 if family == "llada" else 1e-6, qkv_bias=family == "dream", max_length=512)
    base.update(over)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in native_views(model).items():  # the unfused matrices, in the original order
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.startswith("embed"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.05))
        model.head.weight.mul_(8.0)  # sharper distributions: fewer near-ties in confidence
    return model.eval()


def random_spec(cfg: ModelConfig) -> BackboneSpec:
    v = cfg.vocab_size
    return BackboneSpec(name=f"random-{cfg.family}", family=cfg.family, mask_id=v - 1,
                        eos_ids=(v - 2, v - 3), pad_id=v - 2, vocab_size=v, max_length=cfg.max_length,
                        bos_id=v - 4)


def random_backbone(family: str = "llada", seed: int = 0, **over) -> Backbone:
    cfg = random_config(family, **over)
    return Backbone(random_model(cfg, seed), random_spec(cfg))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref| over finite entries; inf if the NaN patterns differ or if
    nothing finite is left to compare (an all-NaN comparison must not pass vacuously)."""
    a, b = ours.double(), ref.double()
    if a.shape != b.shape or not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    fin = ~torch.isnan(b)
    if not fin.any():
        return math.inf
    return ((a[fin] - b[fin]).abs().max() / b[fin].abs().max()).item()


def rand_ids(bb: Backbone, B: int, T: int, seed: int) -> torch.Tensor:
    """(B, T) uniform token ids over the whole vocabulary (special ids included), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, bb.spec.vocab_size, (B, T), generator=g)


def random_prompts(backbone: Backbone, lengths=(5, 8), seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths over ordinary (non-special) ids."""
    g = torch.Generator().manual_seed(seed)
    hi = backbone.spec.vocab_size - 4  # the top four ids are the spec's special tokens
    return [torch.randint(0, hi, (n,), generator=g).tolist() for n in lengths]


def run_counted(name: str, backbone, prompts, seed: int = 0, **options):
    """Run the registered sampler ``name`` through a CountingBackbone: (Generation, counter)."""
    from ..counting import CountingBackbone
    from ..sampler import build_sampler

    counting = CountingBackbone(backbone)
    out = build_sampler(name, **options).generate(counting, prompts, torch.Generator().manual_seed(seed))
    return out, counting


def import_file(name: str, path) -> object:
    """Import the Python file ``path`` once as module ``name`` (shared test helpers, scripts)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(path))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


class LogitsHook:
    """A delegating test backbone that sees (and may edit) the logits of every model call, whichever
    entry point the sampler uses (:meth:`Backbone.forward`, :meth:`Backbone.step` or :meth:`Backbone.step_rows`).

    Subclasses implement :meth:`adjust`; everything else is delegated to the wrapped backbone.
    """

    def __init__(self, bb):
        self._bb = bb

    def adjust(self, logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
        """logits (B, P, V) of one call; ids / positions (B, T): the call's tokens and their positions;
        rows (B, P): the index among the T of the token each logits row predicts."""
        return logits

    def edit_ids(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The tokens the model is given instead of ``ids`` (B, T) at ``positions`` (default: the same)."""
        return ids

    def forward(self, ids, positions=None, predict=None, **kwargs):
        B, T = ids.shape
        ar = torch.arange(T, device=ids.device).expand(B, T)
        pos = ar if positions is None else positions
        ids = self.edit_ids(ids, pos)
        logits = self._bb.forward(ids, positions=positions, predict=predict, **kwargs)
        return self.adjust(logits, ids, pos, ar if predict is None else predict)

    def step(self, x, cache, cols, predict=None, **kwargs):
        x = self.edit_ids(x, cache.positions[: x.shape[0]])
        logits = self._bb.step(x, cache, cols, predict=predict, **kwargs)
        call, rows = self._bb.step_columns(cache, cols, predict)
        B = x.shape[0]
        return self.adjust(logits, x[:, call], cache.positions[:B][:, call],
                           rows.expand(B, -1) if rows.dim() == 1 else rows)

    def step_rows(self, ids, cache, rows, slots, real, predict, **kwargs):
        pos = self._bb.rows_positions(cache, rows, slots)
        ids = self.edit_ids(ids, pos)
        logits = self._bb.step_rows(ids, cache, rows, slots, real, predict, **kwargs)
        return self.adjust(logits, ids, pos, predict)

    def __getattr__(self, name):
        return getattr(self._bb, name)
