"""The task seam: what the runner needs from a task, and the one task registry.

A task owns its data, prompt building (chat template, few-shot), answer extraction and scoring;
it never sees which sampler runs.  Registry key == ``conf/task/<key>.yaml`` stem == the
``task`` column of results, and each task's ``version`` goes into every result row.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence, runtime_checkable

__all__ = ["Example", "Task", "ChatTask", "TASKS", "register_task", "build_task", "select"]

LIMIT_MODES = ("first", "random")


@dataclass(frozen=True)
class Example:
    """One evaluation item.  ``id`` is stable across runs (results resume by it)."""

    id: str
    prompt: str  # the user message
    answer: str  # the reference the scorer compares against
    meta: dict = field(default_factory=dict, hash=False)  # extra fields (e.g. the full reference)


@runtime_checkable
class Task(Protocol):
    name: ClassVar[str]
    version: ClassVar[str]

    def examples(self, limit: Optional[int] = None, seed: int = 0, mode: str = "first") -> list[Example]:
        """The evaluated examples: all of them, the first ``limit`` or a seeded random subset."""

    def build_prompt(self, tokenizer, example: Example) -> list[int]:
        """Token ids of the prompt, ready for the answer to follow."""

    def extract(self, completion: str) -> str:
        """The part of a completion that the primary score compares (for the results row)."""

    def score(self, example: Example, completion: str) -> dict[str, Any]:
        """Named correctness flags (bools; ``correct`` is the primary one), optionally with
        non-bool diagnostics (e.g. a code task's ``exec_status``) that go into the row as they
        are; summaries aggregate the bool flags only."""


def select(items: Sequence, limit: Optional[int], seed: int, mode: str) -> list:
    """``limit`` items of ``items``: the first ones, or a ``seed``-ed random subset kept in order."""
    if mode not in LIMIT_MODES:
        raise ValueError(f"unknown limit_mode {mode!r}; valid choices: {', '.join(LIMIT_MODES)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or null, got {limit}")
    if limit is None or limit >= len(items):
        return list(items)
    if mode == "first":
        return list(items[:limit])
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


class ChatTask:
    """Shared prompt building: one user turn through the tokenizer's chat template."""

    name: ClassVar[str]
    version: ClassVar[str]

    def build_prompt(self, tokenizer, example: Example) -> list[int]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
        return list(ids)


TASKS: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator adding a task to :data:`TASKS` under ``name``."""

    def deco(cls: type) -> type:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def build_task(name: str, version: Optional[str] = None, **options: Any):
    """Instantiate a registered task; a config ``version`` must equal the code's version."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid choices: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    if version is not None and str(version) != cls.version:
        raise ValueError(f"task {name!r}: config says version {version!r} but the code is {cls.version!r}; "
                         f"update conf/task/{name}.yaml together with the task")
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"task {name!r}: bad options {sorted(options)} ({e})") from None
