"""Synthetic multi-line tasks the embedded tiny dLLM is trained on and evaluated with.

Both tasks are verifiable, have answers of several lines separated by a newline delimiter
(the boundary AsyncLane forks at), and vary in length so that the generation budget matters.
Every token is a whitespace-separated word of a small closed vocabulary (``VOCAB_WORDS``), so
the tiny model's word-level tokenizer keeps sequences short.  Every answer line is produced
from *content* (a key to look up, a value to compare), never from a bare position: the
prototype training runs showed position-indexed copying is out of reach of a 3M
model trained on a CPU, while content lookups are learned early.

``arith`` (GSM8K-shaped): a start value and labelled steps; one worked step per line, then
``#### <answer>``::

    prompt:  start 7 A + 5 B - 3 C + 8
    answer:  A 7 + 5 = 12
             B 12 - 3 = 9
             C 9 + 8 = 17
             #### 17

``listops``: one operation on a list, one item group per line::

    sort 37 12 5 44        ->  5 / 12 / 37 / 44              (ascending, one value a line)
    rev a 37 b 12 c 5      ->  c 5 / b 12 / a 37             (keyed reversal)
    add 3 a 4 b 9          ->  a 7 / b 12                    (add k to every keyed value)

Held-out split: ``test_problems(task, n)`` draws from a fixed seed; ``train_problem`` rejects
any problem whose prompt is in the first ``HELD_OUT`` test prompts, so training never sees them.

The long task ``trace`` (answers of 119-914 tokens in budget classes 256/512/1024, over the same
vocabulary) lives in :mod:`eval.tasks.trace`; importing this module registers it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from . import trace  # noqa: F401  (registers task=trace; the trainer imports it from here too)

MAX_VALUE = 99  # every number is one token: 0..99
STEP_KEYS = [chr(ord("A") + i) for i in range(8)]
ITEM_KEYS = [chr(ord("a") + i) for i in range(12)]
OPS = ("sort", "rev", "add")
VOCAB_WORDS = ([str(i) for i in range(MAX_VALUE + 1)] + STEP_KEYS + ITEM_KEYS
               + ["start", "+", "-", "=", "####", *OPS, "\n"])
TASKS = ("arith", "listops")  # the short tasks; the long one is trace.TraceTask
HELD_OUT = 1000
TEST_SEED = {"arith": 1_000_003, "listops": 2_000_003}
VERSION = {"arith": "arith-v1", "listops": "listops-v1"}


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str  # the user message
    answer: str  # the reference answer text (lines joined by "\n")
    target: str  # what the scorer compares (final number for arith, the whole answer for listops)


def make_arith(rng: random.Random) -> Problem:
    n = rng.randint(2, 8)
    value = rng.randint(0, 30)
    start = value
    steps, lines = [], []
    for key in STEP_KEYS[:n]:
        ops = [op for op in "+-" if (value + 1 <= 60 if op == "+" else value - 1 >= 0)]
        op = rng.choice(ops)
        k = rng.randint(1, min(9, 60 - value) if op == "+" else min(9, value))
        new = value + k if op == "+" else value - k
        steps.append(f"{key} {op} {k}")
        lines.append(f"{key} {value} {op} {k} = {new}")
        value = new
    lines.append(f"#### {value}")
    return Problem("arith", f"start {start} " + " ".join(steps), "\n".join(lines), str(value))


def make_listops(rng: random.Random) -> Problem:
    op = rng.choice(OPS)
    if op == "sort":
        vals = rng.sample(range(MAX_VALUE + 1), rng.randint(5, 14))
        answer = "\n".join(str(v) for v in sorted(vals))
        prompt = "sort " + " ".join(map(str, vals))
    elif op == "rev":
        n = rng.randint(4, 12)
        vals = [rng.randint(0, MAX_VALUE) for _ in range(n)]
        pairs = [f"{k} {v}" for k, v in zip(ITEM_KEYS, vals)]
        answer = "\n".join(reversed(pairs))
        prompt = "rev " + " ".join(pairs)
    else:
        k = rng.randint(1, 9)
        n = rng.randint(4, 12)
        vals = [rng.randint(0, 60) for _ in range(n)]
        prompt = f"add {k} " + " ".join(f"{key} {v}" for key, v in zip(ITEM_KEYS, vals))
        answer = "\n".join(f"{key} {v + k}" for key, v in zip(ITEM_KEYS, vals))
    return Problem("listops", prompt, answer, answer)


MAKERS = {"arith": make_arith, "listops": make_listops}


def _check_task(task: str):
    if task not in MAKERS:
        raise ValueError(f"unknown synthetic task {task!r}; valid choices: {', '.join(TASKS)}")


def test_problems(task: str, n: int = HELD_OUT) -> list[Problem]:
    """The fixed held-out set (first ``n`` of a seeded stream, duplicates dropped)."""
    _check_task(task)
    return list(_test_set(task))[:n] if n <= HELD_OUT else _draw(task, TEST_SEED[task], n)


@lru_cache(maxsize=None)
def _test_set(task: str) -> tuple[Problem, ...]:
    return tuple(_draw(task, TEST_SEED[task], HELD_OUT))


def _draw(task: str, seed: int, n: int) -> list[Problem]:
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        p = MAKERS[task](rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


@lru_cache(maxsize=None)
def _held_out_prompts(task: str) -> frozenset[str]:
    return frozenset(p.prompt for p in _test_set(task))


def train_problem(task: str, rng: random.Random) -> Problem:
    """A training problem that is not in the held-out set."""
    _check_task(task)
    held = _held_out_prompts(task)
    while True:
        p = MAKERS[task](rng)
        if p.prompt not in held:
            return p


def normalize(text: str) -> str:
    """Canonical answer text: lines stripped, inner whitespace collapsed, empty lines dropped."""
    lines = (" ".join(line.split()) for line in text.replace("\r", "").split("\n"))
    return "\n".join(line for line in lines if line)


_FINAL = re.compile(r"####\s*(-?\d+(?:\.\d+)?)")  # "17.5" must not read as "17"


def extract(task: str, completion: str) -> str:
    """The scored part of a completion: ``#### n`` for arith, the normalised text for listops."""
    if task == "arith":
        m = _FINAL.findall(completion)
        return m[-1] if m else ""
    return normalize(completion)


def score(problem: Problem, completion: str) -> bool:
    return extract(problem.task, completion) == problem.target
