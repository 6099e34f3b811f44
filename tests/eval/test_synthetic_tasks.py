"""The synthetic tasks: deterministic generators, a held-out split training never sees, scoring."""
from __future__ import annotations

import random

import pytest

from asynclane.tiny_tokenizer import build_tokenizer, chat_prompt_ids
from eval.tasks import TASKS, ArithTask, Example, ListopsTask, build_task, select, synthetic

TASK_NAMES = list(synthetic.TASKS)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(synthetic.VOCAB_WORDS)  # the tiny model's tokenizer, built fresh


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generators_are_deterministic(task):
    a = [synthetic.MAKERS[task](random.Random(7)) for _ in range(3)]
    b = [synthetic.MAKERS[task](random.Random(7)) for _ in range(3)]
    assert a == b
    assert synthetic.test_problems(task, 50) == synthetic._draw(task, synthetic.TEST_SEED[task], 50)
    ids = [ex.id for ex in build_task(task).examples()]
    assert ids == [f"{task}-{i:04d}" for i in range(200)] == [ex.id for ex in build_task(task).examples()]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_training_never_draws_held_out_prompts(task):
    held = {p.prompt for p in synthetic.test_problems(task)}
    assert len(held) == synthetic.HELD_OUT
    rng = random.Random(123)
    assert not any(synthetic.train_problem(task, rng).prompt in held for _ in range(3000))
    # the test stream's own seed makes the raw generator produce held-out prompts: all rejected
    rng = random.Random(synthetic.TEST_SEED[task])
    assert synthetic.MAKERS[task](random.Random(synthetic.TEST_SEED[task])).prompt in held
    assert not any(synthetic.train_problem(task, rng).prompt in held for _ in range(200))


def test_limit_first_and_random():
    task = build_task("listops", n=100)
    pool = task.examples()
    assert len(pool) == 100 and task.examples(5) == pool[:5]
    r1, r2 = task.examples(10, seed=1, mode="random"), task.examples(10, seed=1, mode="random")
    assert r1 == r2 and len({e.id for e in r1}) == 10 and set(r1) <= set(pool)
    assert [e.id for e in r1] == sorted(e.id for e in r1)  # kept in pool order
    assert r1 != task.examples(10, seed=2, mode="random")
    assert task.examples(None) == pool == task.examples(1000)
    with pytest.raises(ValueError, match="valid choices: first, random"):
        select(pool, 3, 0, "sideways")
    with pytest.raises(ValueError, match="limit must be"):
        select(pool, -1, 0, "first")


def test_build_task_errors_name_the_choices():
    assert set(TASKS) >= {"arith", "listops"}
    with pytest.raises(ValueError, match="valid choices: .*arith.*listops"):
        build_task("gsm9k")
    with pytest.raises(ValueError, match="arith-v1"):
        build_task("arith", version="arith-v0")
    with pytest.raises(ValueError, match="n must be"):
        build_task("arith", n=0)
    with pytest.raises(ValueError, match="bad options"):
        build_task("arith", shots=5)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_prompt_is_the_training_prompt(tok, task):
    ex = build_task(task).examples(3)[2]
    assert TASKS[task]().build_prompt(tok, ex) == chat_prompt_ids(tok, ex.prompt)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_reference_through_the_tokenizer_scores_correct(tok, task):
    for ex in build_task(task).examples(20):
        ref = ex.meta["reference"]
        decoded = tok.decode(tok(ref, add_special_tokens=False)["input_ids"])  # "a \n b": spaces around \n
        assert all(TASKS[task]().score(ex, decoded).values())


ARITH_CASES = [  # (completion, correct, exact) against the reference below
    ("A 7 + 5 = 12\nB 12 - 3 = 9\n#### 9", True, True),
    ("  A 7 + 5 = 12 \n\n B 12  - 3 = 9 \r\n #### 9  ", True, True),  # whitespace and blank lines
    ("A 7 + 5 = 12\nB 12 - 3 = 8\n#### 9", True, False),  # right number, wrong working
    ("A 7 + 5 = 12\nB 12 - 3 = 9\n####9", True, False),  # no space after ####
    ("#### 4\nA 7 + 5 = 12\nB 12 - 3 = 9\n#### 9", True, False),  # the last #### counts
    ("A 7 + 5 = 12\nB 12 - 3 = 9\n#### 9\n#### 10", False, False),
    ("A 7 + 5 = 12\nB 12 - 3 = 9\n9", False, False),  # no #### marker
    ("A 7 + 5 = 12\nB 12 - 3 = 9\n#### 09", False, False),  # numbers compared as text
    ("", False, False),
]


@pytest.mark.parametrize("completion, correct, exact", ARITH_CASES)
def test_arith_scoring(completion, correct, exact):
    p = synthetic.Problem("arith", "start 7 A + 5 B - 3", "A 7 + 5 = 12\nB 12 - 3 = 9\n#### 9", "9")
    ex = Example(id="t", prompt=p.prompt, answer=p.target, meta={"reference": p.answer})
    assert ArithTask().score(ex, completion) == {"correct": correct, "exact": exact}
    assert synthetic.score(p, completion) == correct  # the task agrees with the module's scorer


LISTOPS_CASES = [
    ("5\n12\n37", True),
    (" 5 \n\n12\r\n37\n", True),
    ("5 12 37", False),  # lines matter
    ("5\n37\n12", False),
    ("5\n12", False),
    ("5\n12\n37\n44", False),
]


@pytest.mark.parametrize("completion, correct", LISTOPS_CASES)
def test_listops_scoring(completion, correct):
    ex = Example(id="t", prompt="sort 37 12 5", answer="5\n12\n37")
    assert ListopsTask().score(ex, completion) == {"correct": correct}
    assert ListopsTask().extract(completion) == synthetic.normalize(completion)
