"""``trace``: a long synthetic task (answers of 119-914 tokens), shared by the trainer and the evaluator.

The prompt is a small program: base values, then one assignment per answer line; the answer
traces it, one line per assignment, spelling out the operands' values and the result::

    prompt:  A a = 23 A b = 9 A c = 40 ... A i = A a + A c A j = A i - A b ...
    answer:  A i = A a + A c = 23 + 40 = 63
             A j = A i - A b = 63 - 9 = 54
             ...

Every line is 14 words (15 tokens with its newline): three *hard* tokens (the two operand
values, looked up in the prompt or in an earlier line, and the result, computed) and eleven
*easy* ones (the line's own assignment, copied from the prompt, and the ``=`` signs).

Vocabulary: only words of the embedded tiny tokenizer (``synthetic.VOCAB_WORDS``, checked by
``tests/eval/test_trace_task.py`` against ``src/asynclane/tiny/tokenizer.json``).  It has no
``x17``-style names and no numbers above 99, so a variable is named by two words, an upper-case
then a lower-case letter (``A a``, ``A b`` ... ``A l``, ``B a`` ... ``H l``: 96 names in a fixed
order, each line's name the successor of the previous one, so the next name is known from
content, never from a position), and every value is kept in 0..99 (a line adds when the sum
stays below 100, else subtracts the smaller operand from the larger; where both fit, it picks).

Dependencies (``dep_distance`` = D): line k reads the variable of line k - D (lines 1..D, which
have no such line, read a base value instead) and one base value.  D = 1 is a strict chain:
every line needs the previous line's result.  With larger D, the lines form D interleaved chains
and a line's input was written D lines (15 D tokens) earlier, so D - 1 lines between could be
decoded independently of it.  Default 1: the GSM8K-like case (like ``arith``, each step reads
the previous result) and the hardest for decoding lines in parallel, which is what this task
exists to measure; larger D is the knob of that ablation.  Valid: 1 .. (fewest lines of the
budget class) - 1, so every problem has lines that read earlier lines.

Budget classes (``budget`` = the generation length it is meant for): 256, 512, 1024.  A problem
has L lines with 15 L - 1 answer tokens within 45-90% of its budget (the contract is 40-95%;
the margin is kept on both sides): L in 8..15 (256), 16..30 (512), 31..61 (1024).  The prompt
is 4 tokens per base value, 8 per line, plus 4 of the chat template: at most 532 tokens (1024).

Held-out split: a problem is held out iff ``sha256(prompt) % 4 == 0``.  The evaluation set of a
(budget, D) is the first ``n`` held-out problems of a stream seeded by (budget, D); training
rejects every held-out prompt.  Unlike arith/listops (which reject the first 1000 test prompts),
this holds for every budget, every D and every ``n`` at once, without enumerating test sets.

Scores: ``correct`` (the last line defines the final variable with the right value), ``exact``
(every line, normalised), and ``line_accuracy`` (the fraction of reference lines reproduced at
their position; a diagnostic, not summarised).
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from .base import ChatTask, Example, register_task, select

VERSION = "trace-v1"
BUDGETS = (256, 512, 1024)
FILL = (0.45, 0.90)  # answer tokens / budget
LINE_WORDS = 14  # "A i = A a + A c = 23 + 40 = 63"
LINE_TOKENS = LINE_WORDS + 1  # and its newline
BASE_RANGE = (6, 10)  # base values per problem
MAX_VALUE = 99
UPPER = [chr(ord("A") + i) for i in range(8)]
LOWER = [chr(ord("a") + i) for i in range(12)]
NAMES = [f"{u} {lo}" for u in UPPER for lo in LOWER]  # 96 two-word names, in line order
WORDS = frozenset([*UPPER, *LOWER, *map(str, range(MAX_VALUE + 1)), "=", "+", "-", "\n"])
HELD_OUT_MOD = 4
HELD_OUT_MAX = 1000  # largest evaluation pool (task.n)
CHAT_TOKENS = 4  # <|bos|> <|user|> ... <|eot|> <|assistant|>


@dataclass(frozen=True)
class TraceProblem:
    prompt: str
    answer: str  # the reference lines joined by "\n"
    target: str  # what ``correct`` compares: "<final name> = <final value>"
    budget: int
    dep_distance: int
    deps: tuple  # per line: the line index (0-based) its first operand comes from, or None (a base value)


def line_range(budget: int) -> tuple[int, int]:
    """Fewest and most lines of a budget class (answer tokens 15 L - 1 within ``FILL`` of it)."""
    check_budget(budget)
    lo = math.ceil((FILL[0] * budget + 1) / LINE_TOKENS)
    hi = math.floor((FILL[1] * budget + 1) / LINE_TOKENS)
    return lo, hi


def max_dep_distance(budget: int) -> int:
    return line_range(budget)[0] - 1


def max_prompt_tokens(budget: int) -> int:
    """Upper bound of a prompt's tokens (chat template included) in a budget class."""
    return CHAT_TOKENS + 4 * BASE_RANGE[1] + 8 * line_range(budget)[1]


def check_budget(budget) -> None:
    if budget not in BUDGETS:
        raise ValueError(f"trace: task.budget={budget!r} is not an answer length class; valid choices: "
                         f"{', '.join(map(str, BUDGETS))} (task.budget follows gen_length unless set, "
                         "e.g. gen_length=512)")


def check_dep_distance(budget: int, dep_distance) -> None:
    hi = max_dep_distance(budget)
    if not isinstance(dep_distance, int) or isinstance(dep_distance, bool) or not 1 <= dep_distance <= hi:
        raise ValueError(f"trace: task.dep_distance={dep_distance!r} is not valid for budget {budget}; valid: "
                         f"an integer in 1..{hi} (1 = a strict chain; budget {budget} has at least {hi + 1} lines)")


def make_trace(rng: random.Random, budget: int, dep_distance: int) -> TraceProblem:
    """One problem of a budget class with dependencies ``dep_distance`` lines back (see the module doc)."""
    check_budget(budget)
    check_dep_distance(budget, dep_distance)
    n_lines = rng.randint(*line_range(budget))
    n_base = rng.randint(*BASE_RANGE)
    values = [rng.randint(0, MAX_VALUE) for _ in range(n_base)]
    given = [f"{NAMES[i]} = {v}" for i, v in enumerate(values)]
    lines, deps = [], []
    for k in range(n_lines):
        var = n_base + k
        dep = n_base + k - dep_distance if k >= dep_distance else rng.randrange(n_base)
        other = rng.randrange(n_base)
        a, b = values[dep], values[other]
        forms = []
        if a + b <= MAX_VALUE:
            forms.append(((dep, other) if rng.random() < 0.5 else (other, dep), "+"))
        forms.append(((dep, other) if a >= b else (other, dep), "-"))
        (x, y), op = rng.choice(forms)
        value = values[x] + values[y] if op == "+" else values[x] - values[y]
        values.append(value)
        given.append(f"{NAMES[var]} = {NAMES[x]} {op} {NAMES[y]}")
        lines.append(f"{NAMES[var]} = {NAMES[x]} {op} {NAMES[y]} = {values[x]} {op} {values[y]} = {value}")
        deps.append(dep - n_base if k >= dep_distance else None)
    final = f"{NAMES[n_base + n_lines - 1]} = {values[-1]}"
    return TraceProblem(" ".join(given), "\n".join(lines), final, budget, dep_distance, tuple(deps))


def is_held_out(prompt: str) -> bool:
    """The evaluation side of the split: a fixed quarter of all prompts, by content."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % HELD_OUT_MOD == 0


@lru_cache(maxsize=64)
def test_problems(budget: int, dep_distance: int, n: int) -> tuple[TraceProblem, ...]:
    """The first ``n`` held-out problems of the (budget, dep_distance) stream (duplicates dropped)."""
    check_budget(budget)
    check_dep_distance(budget, dep_distance)
    rng, seen, out = random.Random(f"trace-test-{budget}-{dep_distance}"), set(), []
    while len(out) < n:
        p = make_trace(rng, budget, dep_distance)
        if is_held_out(p.prompt) and p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return tuple(out)


def train_problem(rng: random.Random, budget: int, dep_distance: int) -> TraceProblem:
    """A training problem: never a held-out one (of any budget, dep_distance or pool size)."""
    while True:
        p = make_trace(rng, budget, dep_distance)
        if not is_held_out(p.prompt):
            return p


def answer_lines(text: str) -> list[str]:
    """Non-empty lines, inner whitespace collapsed (decoded text has spaces around newlines)."""
    lines = (" ".join(line.split()) for line in text.replace("\r", "").split("\n"))
    return [line for line in lines if line]


def extract(completion: str) -> str:
    """``"<name> = <value>"`` of the completion's last line (its defined name and final value), or ""."""
    lines = answer_lines(completion)
    words = lines[-1].split() if lines else []
    return f"{words[0]} {words[1]} = {words[-1]}" if len(words) >= 4 and words[2] == "=" else ""


def score(reference: str, target: str, completion: str) -> dict:
    got, ref = answer_lines(completion), answer_lines(reference)
    return {"correct": extract(completion) == target, "exact": got == ref,
            "line_accuracy": sum(g == r for g, r in zip(got, ref)) / len(ref)}


@register_task("trace")
class TraceTask(ChatTask):
    """Held-out ``trace`` problems of one budget class and dependency distance (module doc)."""

    version = VERSION

    def __init__(self, n: int = 200, budget: int = 256, dep_distance: int = 1):
        if not isinstance(n, int) or not 0 < n <= HELD_OUT_MAX:
            raise ValueError(f"trace: task.n must be an integer in 1..{HELD_OUT_MAX}, got {n!r}")
        check_budget(budget)
        check_dep_distance(budget, dep_distance)
        self.n, self.budget, self.dep_distance = n, budget, dep_distance

    @property
    def variant(self) -> str:
        """Rows' ``task_variant``: the dependency distance (the budget class follows ``gen_length``),
        so ``eval.report`` keeps the distances of one sweep apart."""
        return f"dep_distance={self.dep_distance}"

    def examples(self, limit: Optional[int] = None, seed: int = 0, mode: str = "first") -> list[Example]:
        pool = [Example(id=f"trace-{i:04d}", prompt=p.prompt, answer=p.target, meta={"reference": p.answer})
                for i, p in enumerate(test_problems(self.budget, self.dep_distance, self.n))]
        return select(pool, limit, seed, mode)

    def extract(self, completion: str) -> str:
        return extract(completion)

    def score(self, example: Example, completion: str) -> dict:
        return score(example.meta["reference"], example.answer, completion)
