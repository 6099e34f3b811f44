"""The long synthetic task ``trace``: lengths per budget class, dependency distance, the tiny
vocabulary, determinism, the held-out split, exact scoring, and the trainer's data path."""
from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from asynclane.loading import TINY_DIR
from asynclane.tiny_tokenizer import build_tokenizer, chat_prompt_ids
from eval.tasks import TASKS, build_task, synthetic, trace

ROOT = Path(__file__).resolve().parents[2]
NAME = r"[A-H] [a-l]"
LINE = re.compile(rf"^({NAME}) = ({NAME}) ([+-]) ({NAME}) = (\d+) ([+-]) (\d+) = (\d+)$")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(synthetic.VOCAB_WORDS)  # the tiny model's tokenizer, built fresh


def solve(prompt: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """An independent reading of a trace prompt: its reference lines, and per line (defined name,
    operand names).  Checks the prompt's own structure on the way."""
    words, values, lines, reads = prompt.split(), {}, [], []
    i = 0
    while i < len(words):
        name = f"{words[i]} {words[i + 1]}"
        assert words[i + 2] == "=" and name not in values
        if words[i + 3].isdigit():  # a base value
            assert not lines, "base values come first"
            values[name] = int(words[i + 3])
            i += 4
            continue
        x, op, y = f"{words[i + 3]} {words[i + 4]}", words[i + 5], f"{words[i + 6]} {words[i + 7]}"
        a, b = values[x], values[y]  # operands are defined earlier
        values[name] = a + b if op == "+" else a - b
        assert 0 <= values[name] <= 99
        lines.append(f"{name} = {x} {op} {y} = {a} {op} {b} = {values[name]}")
        reads.append((name, x, y))
        i += 8
    return lines, reads


# ------------------------------------------------------------------------------- lengths and vocabulary

@pytest.mark.parametrize("budget", trace.BUDGETS)
def test_answers_fill_40_to_95_percent_of_their_budget(tok, budget):
    rng = random.Random(budget)
    problems = [trace.train_problem(rng, budget, rng.randint(1, trace.max_dep_distance(budget)))
                for _ in range(150)] + list(trace.test_problems(budget, 1, 50))
    lo, hi = trace.line_range(budget)
    fills = []
    for p in problems:
        n_answer = len(tok.encode(p.answer, add_special_tokens=False))
        n_lines = p.answer.count("\n") + 1
        assert lo <= n_lines <= hi and n_answer == trace.LINE_TOKENS * n_lines - 1
        assert len(chat_prompt_ids(tok, p.prompt)) <= trace.max_prompt_tokens(budget)
        fills.append((n_answer + 1) / budget)  # + the EOS that ends it
    assert 0.40 <= min(fills) and max(fills) <= 0.95, (min(fills), max(fills))
    assert max(fills) - min(fills) > 0.3  # the line count varies across the class
    if budget == 1024:
        assert lo >= 30 and hi <= 62  # the long class: 30-60 lines, about 460-920 tokens


def test_every_token_is_in_the_tiny_vocabulary(tok):
    vocab = json.loads((TINY_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    assert trace.WORDS <= set(vocab)  # two-letter names and numbers 0..99: no x17, no 100+
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(str(TINY_DIR))
    rng = random.Random(0)
    for budget in trace.BUDGETS:
        for _ in range(20):
            p = trace.train_problem(rng, budget, rng.randint(1, trace.max_dep_distance(budget)))
            for text in (p.prompt, p.answer):
                ids = shipped.encode(text, add_special_tokens=False)
                assert shipped.unk_token_id not in ids and len(ids) == len(text.split()) + text.count("\n")
            assert set(p.prompt.split()) | set(p.answer.split()) | {"\n"} <= trace.WORDS


# ------------------------------------------------------------------------------- structure

def test_reference_is_exactly_what_the_prompt_computes():
    rng = random.Random(5)
    for budget in trace.BUDGETS:
        for _ in range(30):
            p = trace.train_problem(rng, budget, rng.randint(1, trace.max_dep_distance(budget)))
            lines, reads = solve(p.prompt)
            assert p.answer.split("\n") == lines
            assert p.target == f"{reads[-1][0]} = {lines[-1].split()[-1]}"
            for line in lines:  # 14 words: 3 hard (two operand values, the result), 11 easy
                assert LINE.match(line) and len(line.split()) == trace.LINE_WORDS


def _line_names(p):
    return [r[0] for r in solve(p.prompt)[1]]


def test_dep_distance_1_is_a_strict_chain():
    for p in trace.test_problems(512, 1, 40):
        names, reads = _line_names(p), solve(p.prompt)[1]
        assert reads[0][1] not in names and reads[0][2] not in names  # line 1 reads base values only
        for k in range(1, len(reads)):
            read_lines = [x for x in reads[k][1:] if x in names]
            assert read_lines == [names[k - 1]]  # exactly the previous line's variable (and a base value)
        assert p.deps == (None, *range(len(reads) - 1))


@pytest.mark.parametrize("budget, dep", [(256, 3), (256, 7), (512, 8), (1024, 30)])
def test_larger_dep_distance_reaches_farther(budget, dep):
    for p in trace.test_problems(budget, dep, 20):
        names, reads = _line_names(p), solve(p.prompt)[1]
        for k, (_, x, y) in enumerate(reads):
            read_lines = [names.index(v) for v in (x, y) if v in names]
            assert read_lines == ([k - dep] if k >= dep else [])  # the first dep lines read base values
        assert len(reads) > dep  # every problem has lines that read an earlier line


def test_names_follow_a_fixed_order_and_values_stay_one_token():
    p = trace.make_trace(random.Random(3), 1024, 4)
    defined = [w[0] + " " + w[1] for w in (s.split() for s in re.split(r" (?=[A-H] [a-l] =)", p.prompt))]
    assert defined == trace.NAMES[: len(defined)]  # each name is the successor of the one before
    assert all(0 <= int(w) <= 99 for w in p.answer.split() if w.isdigit())


# ------------------------------------------------------------------------------- determinism and split

def test_generator_is_deterministic_by_seed():
    a = [trace.make_trace(random.Random(7), 512, 2) for _ in range(3)]
    assert a == [trace.make_trace(random.Random(7), 512, 2) for _ in range(3)]
    assert a[0] != trace.make_trace(random.Random(8), 512, 2)
    task = build_task("trace", budget=512, dep_distance=2, n=30)
    assert task.examples() == build_task("trace", budget=512, dep_distance=2, n=30).examples()
    assert [ex.id for ex in task.examples()] == [f"trace-{i:04d}" for i in range(30)]
    assert task.examples(10) == build_task("trace", budget=512, dep_distance=2, n=200).examples(10)  # prefix-stable


def test_training_never_draws_held_out_problems():
    held = {p.prompt for b, d in [(256, 1), (256, 7), (512, 3), (1024, 1)] for p in trace.test_problems(b, d, 150)}
    assert len(held) == 600 and all(trace.is_held_out(h) for h in held)
    rng = random.Random(11)
    drawn = [trace.train_problem(rng, b, d) for _ in range(150) for b, d in [(256, 1), (256, 7), (512, 3)]]
    assert not any(p.prompt in held or trace.is_held_out(p.prompt) for p in drawn)
    # the test stream's own seed: the raw generator yields the held-out problems, training rejects them all
    raw_rng = random.Random("trace-test-256-1")
    first_held = next(p for p in iter(lambda: trace.make_trace(raw_rng, 256, 1), None) if trace.is_held_out(p.prompt))
    assert first_held == trace.test_problems(256, 1, 1)[0]
    rng = random.Random("trace-test-256-1")
    assert not any(trace.train_problem(rng, 256, 1).prompt in held for _ in range(200))
    share = sum(trace.is_held_out(trace.make_trace(random.Random(s), 256, 1).prompt) for s in range(2000)) / 2000
    assert 0.2 < share < 0.3  # a quarter of the problem space is reserved for evaluation


# ------------------------------------------------------------------------------- scoring

def test_scorer_accepts_gold_and_rejects_one_hard_token(tok):
    task = build_task("trace", budget=256, dep_distance=1, n=20)
    assert TASKS["trace"] is type(task) and task.version == "trace-v1"
    for ex in task.examples(5):
        ref = ex.meta["reference"]
        decoded = tok.decode(tok(ref, add_special_tokens=False)["input_ids"])  # spaces around each newline
        assert task.score(ex, decoded) == {"correct": True, "exact": True, "line_accuracy": 1.0}
        assert task.extract(decoded) == ex.answer and task.build_prompt(tok, ex) == chat_prompt_ids(tok, ex.prompt)
        lines = ref.split("\n")

        def change(k, pos):  # one hard token of line k (word pos: 9 or 11 operand values, 13 the result)
            words = lines[k].split()
            words[pos] = str((int(words[pos]) + 1) % 100)
            return "\n".join([*lines[:k], " ".join(words), *lines[k + 1:]])

        for pos in (9, 11, 13):
            last = task.score(ex, change(len(lines) - 1, pos))
            assert not last["exact"] and last["line_accuracy"] == (len(lines) - 1) / len(lines)
            assert last["correct"] is (pos != 13)  # the final value decides `correct`
            middle = task.score(ex, change(1, pos))
            assert middle["correct"] and not middle["exact"]  # `exact` checks every line
        assert task.score(ex, "\n".join(lines[:-1]))["correct"] is False  # one line short
        assert task.score(ex, ref + "\n" + lines[0])["correct"] is False  # one line too many
        assert task.score(ex, "")["correct"] is False and task.extract("") == ""


def test_bad_options_name_the_valid_choices():
    with pytest.raises(ValueError, match=r"task.budget=128 .*valid choices: 256, 512, 1024"):
        build_task("trace", budget=128)
    with pytest.raises(ValueError, match=r"task.dep_distance=8 .*valid: an integer in 1..7"):
        build_task("trace", budget=256, dep_distance=8)
    with pytest.raises(ValueError, match=r"task.dep_distance=0 .*1..30"):
        build_task("trace", budget=1024, dep_distance=0)
    with pytest.raises(ValueError, match="task.n must be"):
        build_task("trace", budget=256, n=0)


def test_config_budget_follows_gen_length():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=trace", "gen_length=512"])
        pinned = compose(config_name="config", overrides=["task=trace", "gen_length=512", "task.budget=256",
                                                          "task.dep_distance=4"])
    task = OmegaConf.to_container(cfg, resolve=True)["task"]
    assert task == {"name": "trace", "version": "trace-v1", "n": 200, "budget": 512, "dep_distance": 1, "limit": 20}
    assert OmegaConf.to_container(pinned, resolve=True)["task"]["budget"] == 256
    assert build_task(**{k: v for k, v in task.items() if k != "limit"}).budget == 512


# ------------------------------------------------------------------------------- the trainer's data path

@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_tiny_under_test", ROOT / "scripts" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    path = list(sys.path)  # the script puts src/ first on sys.path
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path[:] = path


def _decode_rows(tok, ids, key_mask, gen):
    """(prompt text, answer text) per row: the answer is the row's last gen tokens up to EOS."""
    out = []
    for row, mask in zip(ids.tolist(), key_mask.tolist()):
        n = sum(mask)
        prompt, answer = row[: n - gen], row[n - gen: n]
        answer = answer[: answer.index(tok.eos_token_id)] if tok.eos_token_id in answer else answer
        user = tok.decode(prompt, skip_special_tokens=True)
        out.append((" ".join(user.split()), tok.decode(answer)))
    return out


def test_trainer_batches_trace_at_each_budget_and_mixes(trainer, tok):
    recipe = trainer.recipe_from_args(trainer.parse_args(["--tasks", "trace", "--max-length", "1556"]))
    assert recipe.gen_lengths == trace.BUDGETS and recipe.trace_fraction == 1
    seen, gens = {}, set()
    for step in range(6):
        ids, key_mask, gen, t, masked = trainer.prepare_step((step, 0, 4096, recipe))
        assert ids.shape[1] <= recipe.longest_row(gen) <= 1556 and not (masked & ~key_mask).any()
        gens.add(gen)
        for prompt, answer in _decode_rows(tok, ids, key_mask, gen):
            lines, _ = solve(prompt)  # every row is a trace problem with its exact reference
            assert answer.replace(" \n ", "\n") == "\n".join(lines)
            assert not trace.is_held_out(prompt)
            assert 0.40 * gen <= len(tok.encode(answer, add_special_tokens=False)) + 1 <= 0.95 * gen
        seen = trainer.see(seen, key_mask, gen, ("trace",))
    assert gens == set(trace.BUDGETS)  # steps 0-5 of seed 0 draw all three budgets
    assert seen["gen_lengths"] == sorted(gens) and seen["tokens"] <= 1556 and seen["prompt_tokens"] <= 532
    # mixed with the short tasks: a trace-budget step holds both kinds; a short gen length only short ones
    mixed = trainer.recipe_from_args(trainer.parse_args(
        ["--tasks", "arith,listops,trace", "--gen-lengths", "128,256", "--max-length", "512"]))
    kinds = {}
    for step in range(8):
        ids, key_mask, gen, _, _ = trainer.prepare_step((step, 0, 4096, mixed))
        for prompt, _ in _decode_rows(tok, ids, key_mask, gen):
            kinds.setdefault(gen, set()).add("trace" if " = " in prompt else prompt.split()[0])
    assert kinds[256] >= {"trace", "start"} and "trace" not in kinds[128]
    # the default recipe is the shipped one: no trace anywhere
    assert trainer.recipe_from_args(trainer.parse_args([])) == trainer.Recipe()


@pytest.mark.parametrize("argv, says", [
    (["--tasks", "trace"], "--max-length 512 is too short: rows reach 1556 tokens"),
    (["--tasks", "trace,sort"], "valid choices: arith, listops, trace"),
    (["--tasks", "trace", "--gen-lengths", "128,256"], "every gen length must be a trace budget: 256, 512, 1024"),
    (["--tasks", "trace", "--gen-lengths", "256", "--trace-deps", "9"], "valid: 1..7"),
])
def test_trainer_refuses_bad_recipes(trainer, argv, says):
    with pytest.raises(SystemExit, match=re.escape(says)):
        trainer.recipe_from_args(trainer.parse_args(argv))


def test_trainer_steps_on_trace_batches(trainer, tok):
    """A handful of optimiser steps of a very small model on trace batches: finite, falling loss."""
    args = trainer.parse_args(["--tasks", "trace", "--gen-lengths", "256", "--max-length", "512",
                               "--d-model", "32", "--layers", "1", "--heads", "2", "--mlp", "64"])
    recipe = trainer.recipe_from_args(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = trainer.Transformer(trainer.model_config(args, len(tok)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        batch = trainer.prepare_step((0, 0, 2048, recipe))
        losses = []
        for _ in range(6):  # the same batch: the loss must fall
            ids, key_mask, gen, t, masked = batch
            loss, acc = trainer.sft_loss(model, ids, key_mask, gen, tok.mask_token_id, t, masked)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]


def test_rows_name_the_dependency_distance_as_the_task_variant():
    from eval.tasks.trace import TraceTask

    assert TraceTask(n=2, budget=512, dep_distance=3).variant == "dep_distance=3"
    assert TraceTask(n=2).variant == "dep_distance=1"
