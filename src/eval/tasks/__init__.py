"""Tasks: synthetic (arith, listops) and the shipped benchmarks; importing registers them."""
from __future__ import annotations

from typing import Optional

from . import synthetic
from .base import TASKS, ChatTask, Example, Task, build_task, register_task, select
# the shipped benchmarks (data in src/eval/data, see PROVENANCE.md there); importing registers them
from .gsm8k import GSM8KTask
from .humaneval import HumanEvalTask
from .math500 import Math500Task
from .mbpp import MBPPTask

__all__ = ["TASKS", "Example", "Task", "ChatTask", "build_task", "register_task", "select",
           "ArithTask", "ListopsTask", "GSM8KTask", "Math500Task", "HumanEvalTask", "MBPPTask"]


class _SyntheticTask(ChatTask):
    """A task over the fixed held-out set of :mod:`eval.tasks.synthetic` (first ``n`` problems)."""

    def __init__(self, n: int = 200):
        if not 0 < n <= synthetic.HELD_OUT:
            raise ValueError(f"{self.name}: n must be in 1..{synthetic.HELD_OUT}, got {n}")
        self.n = n

    def examples(self, limit: Optional[int] = None, seed: int = 0, mode: str = "first") -> list[Example]:
        problems = synthetic.test_problems(self.name, self.n)
        pool = [Example(id=f"{self.name}-{i:04d}", prompt=p.prompt, answer=p.target, meta={"reference": p.answer})
                for i, p in enumerate(problems)]
        return select(pool, limit, seed, mode)

    def extract(self, completion: str) -> str:
        return synthetic.extract(self.name, completion)


@register_task("arith")
class ArithTask(_SyntheticTask):
    """``correct``: the ``#### n`` final number matches; ``exact``: the whole worked answer matches."""

    version = synthetic.VERSION["arith"]

    def score(self, example: Example, completion: str) -> dict[str, bool]:
        return {"correct": self.extract(completion) == example.answer,
                "exact": synthetic.normalize(completion) == synthetic.normalize(example.meta["reference"])}


@register_task("listops")
class ListopsTask(_SyntheticTask):
    """``correct``: the normalised answer (every line) matches exactly."""

    version = synthetic.VERSION["listops"]

    def score(self, example: Example, completion: str) -> dict[str, bool]:
        return {"correct": self.extract(completion) == synthetic.normalize(example.answer)}
