"""The sampler seam: a protocol, a config base, the output type and the one registry.

A sampler is a class with a ``Config`` dataclass (subclass of :class:`SamplerConfig`) and one
method ``generate(backbone, prompts, rng) -> Generation``.  It owns its decoding loop and
composes the pure rules in :mod:`asynclane.rules`; it never counts model calls or times itself
(:class:`asynclane.counting.CountingBackbone` and the runner do that).

Registry: the :func:`register` decorator; importing a sampler's module registers it.  Registry key == file stem
== the ``sampler`` column of results.  The Config dataclass is the one home of a sampler's defaults (the
harness builds its ``sampler=<key>`` config from it: ``eval.sampler_presets``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["delimiter_set", "block_steps", "SamplerConfig", "Generation", "Sampler", "BaseSampler", "register", "REGISTRY", "build_sampler",
           "finish", "read_host", "left_pad", "init_buffer", "padding_mask", "first_eos_cut", "check_block_length"]


@dataclass
class SamplerConfig:
    """Fields every sampler understands.  ``gen_length`` is the top-level override."""

    gen_length: int = 128
    temperature: float = 0.0

    def __post_init__(self):
        if self.gen_length <= 0:
            raise ValueError(f"gen_length must be positive, got {self.gen_length}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def check_block_length(block_length: int, gen_length: int) -> None:
    """Raise unless ``block_length`` divides ``gen_length`` (the message lists the valid ones)."""
    if block_length <= 0 or gen_length % block_length:
        valid = [d for d in range(1, gen_length + 1) if gen_length % d == 0]
        raise ValueError(f"block_length={block_length} must divide gen_length={gen_length}; "
                         f"valid block lengths: {valid}")


def block_steps(steps: Optional[int], block_length: int, gen_length: int) -> int:
    """Forwards per semi-AR block for ``steps`` in all (None = ``gen_length``: one token per step),
    LLaDA's schedule; a one-line ValueError unless ``steps`` is a positive multiple of the blocks."""
    blocks = gen_length // block_length
    if steps is None:
        return gen_length // blocks
    if isinstance(steps, bool) or steps <= 0 or steps % blocks:
        raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks ({blocks} = "
                         f"gen_length {gen_length} / block_length {block_length}), e.g. {blocks}, {2 * blocks} "
                         f"or {gen_length}; or null for steps = gen_length (one token per step)")
    return steps // blocks


@dataclass
class Generation:
    """Output of ``Sampler.generate``.

    sequences: (B, P + gen_length) final buffer; prompts are left-padded to P with the pad id.
    prompt_length: P.  finished: (B,) True where an EOS-like token was produced.
    trace: optional per-step records (list of dicts) for the runner to save.
    """

    sequences: torch.Tensor
    prompt_length: int
    finished: torch.Tensor
    trace: Optional[list] = None
    info: dict = field(default_factory=dict)

    @property
    def tokens(self) -> torch.Tensor:
        """(B, gen_length): the generated region, prompt excluded."""
        return self.sequences[:, self.prompt_length:]


class BaseSampler:
    """What every sampler class holds: its ``Config`` type, whether it batches, and the config it was
    built with (subclasses add ``generate``, see :class:`Sampler`)."""

    Config: ClassVar[type]
    can_batch: ClassVar[bool] = True
    # True: batch > 1 by row pooling (asynclane.rowpool): each row decodes alone in a thread, the
    # model calls of all rows pooled into one per round
    pools_rows: ClassVar[bool] = False

    def __init__(self, cfg):
        self.cfg = cfg


def read_host(*parts: torch.Tensor) -> list:
    """A sampler's one device->host transfer per iteration: every part flattened into one float64
    tensor, read with one ``tolist`` and split again, one list per part; integer and bool parts come
    back as ints (exact in float64)."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in parts]).tolist()
    out, i = [], 0
    for t in parts:
        seg = flat[i:i + t.numel()]
        out.append(seg if t.is_floating_point() else [int(v) for v in seg])
        i += t.numel()
    return out


def finish(x: torch.Tensor, P: int, spec, **extra) -> Generation:
    """The Generation of a final buffer ``x``: finished where the answer holds an EOS-like id."""
    finished = torch.isin(x[:, P:], torch.tensor(spec.eos_ids, device=x.device)).any(-1)
    return Generation(sequences=x, prompt_length=P, finished=finished, **extra)


@runtime_checkable
class Sampler(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type]
    cfg: SamplerConfig
    can_batch: ClassVar[bool]  # False: the conformance suite skips batch==singles, saying why

    def generate(self, backbone, prompts: Sequence[Sequence[int]], rng: torch.Generator) -> Generation:
        ...


REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding a sampler to :data:`REGISTRY` under ``name``."""

    def deco(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"sampler {name!r} registered twice")
        if not (dataclasses.is_dataclass(getattr(cls, "Config", None)) and issubclass(cls.Config, SamplerConfig)):
            raise TypeError(f"sampler {name!r} needs a Config dataclass derived from SamplerConfig")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def build_sampler(name: str, **options: Any):
    """Instantiate a registered sampler; unknown names or options fail with the valid choices, and
    an option of the wrong type (``block_length='abc'``) with its name and the type it needs.

    The registry holds what has been imported: ``asynclane`` registers its own samplers, and
    ``import baselines`` registers every competing one (the harness does both).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(sorted(REGISTRY))} "
                         "(competing samplers register on `import baselines`)")
    cls = REGISTRY[name]
    valid = {f.name for f in dataclasses.fields(cls.Config)}
    bad = sorted(set(options) - valid)
    if bad:
        raise ValueError(f"sampler {name!r} has no option(s) {bad}; valid options: {', '.join(sorted(valid))}")
    hints = typing.get_type_hints(cls.Config)
    for key, value in options.items():
        if not _fits(value, hints.get(key)):
            raise ValueError(f"sampler {name!r}: {key} must be {_describe(hints[key])}, got {value!r}")
    return cls(cls.Config(**options))


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the scalar type a config field declares (other hints: the config's checks)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is bool or hint is str or hint is type(None):
        return isinstance(value, hint)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return _KINDS.get(hint, getattr(hint, "__name__", str(hint)))


def left_pad(prompts: Sequence[Sequence[int]], gen_length: int, pad_id: int, mask_id: int,
             device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Buffer (B, P + gen_length) = left-padded prompts then masks; key mask; P.

    The key mask is False on padding; positions are ``key_mask.cumsum(1) - 1`` (clamped at 0),
    so every row's first real token sits at position 0 (docs/research/backbones.md §4.4).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    B, P = len(prompts), max(len(p) for p in prompts)
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=device)
    key_mask = torch.ones_like(x, dtype=torch.bool)
    for r, p in enumerate(prompts):
        x[r, : P - len(p)] = pad_id
        key_mask[r, : P - len(p)] = False
        x[r, P - len(p): P] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    return x, key_mask, P


def init_buffer(backbone, prompts: Sequence[Sequence[int]], gen_length: int):
    """The decoding buffer every sampler starts from: ``(x, key_mask, positions, P)``.

    ``x`` (B, P + gen_length): left-padded prompts then ``gen_length`` mask tokens (see
    :func:`left_pad`); ``positions``: each row's absolute positions, restarting at its first real
    token; ``P``: the padded prompt length (the generated region is ``x[:, P:]``).
    """
    spec = backbone.spec
    x, key_mask, P = left_pad(prompts, gen_length, spec.pad_id, spec.mask_id, device=backbone.device)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    return x, key_mask, positions, P


def padding_mask(key_mask: torch.Tensor, prompts: Sequence[Sequence[int]]) -> Optional[torch.Tensor]:
    """``key_mask`` when the prompts differ in length (some rows are padded), else None: known on the
    host from the prompt lengths, so an unpadded call passes no mask to the attention kernel."""
    return key_mask if len({len(p) for p in prompts}) > 1 else None


def delimiter_set(backbone, explicit: Optional[Sequence[int]]) -> frozenset:
    """Delimiter ids: ``explicit`` when given, else every id whose decoded text has a newline (built
    from the backbone's tokenizer, never hard-coded; empty without a tokenizer)."""
    if explicit is not None:
        return frozenset(int(t) for t in explicit)
    tok = getattr(backbone, "tokenizer", None)
    if tok is None:
        return frozenset()
    special = set(backbone.spec.eos_ids) | {backbone.spec.mask_id, backbone.spec.pad_id}
    return frozenset(i for i in range(backbone.spec.vocab_size)
                     if i not in special and "\n" in tok.decode([i]))


def first_eos_cut(tokens: torch.Tensor, eos_ids: Sequence[int]) -> list[list[int]]:
    """The one definition of generated tokens: up to and including the first EOS-like id."""
    out = []
    eos = set(int(e) for e in eos_ids)
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        out.append(row if cut is None else row[: cut + 1])
    return out
