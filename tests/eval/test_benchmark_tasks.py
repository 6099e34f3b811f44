"""The shipped benchmarks: data integrity, prompts, configs, and references scoring as correct.

Reference solutions go through exactly the path a generated completion takes (``task.score``
on a completion string).  Executions are kept to a handful here; the full-dataset checks are
``@pytest.mark.slow`` (``pytest -m slow tests/eval/test_benchmark_tasks.py``).
"""
from __future__ import annotations

import gzip
import random
import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eval.tasks import TASKS, GSM8KTask, HumanEvalTask, Math500Task, MBPPTask, build_task
from eval.tasks.datafiles import DATA_DIR, FILES, DataFileError, load_records, read_records, sha256_of
from eval.tasks.prompting import Prompt

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
BENCHMARKS = {"gsm8k": 1319, "math500": 500, "humaneval": 164, "mbpp": 500}


class FakeTokenizer:
    """Chat template and encoding that are easy to read back: one id per character."""

    bos_token_id = 1

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, continue_final_message=False):
        assert tokenize is False
        body = "<s>" + "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        if continue_final_message:  # the last (assistant) message stays open, as transformers renders it
            assert add_generation_prompt is False
            return body[: -len(f"</{messages[-1]['role']}>")]
        assert add_generation_prompt is True
        return body + "<assistant>"

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [ord(c) for c in text]


def decode(ids):
    return "".join("<BOS>" if i == 1 else chr(i) for i in ids)


# ------------------------------------------------------------------------- registry and configs


def test_tasks_are_registered_with_versioned_configs():
    for name in BENCHMARKS:
        assert name in TASKS
        conf = OmegaConf.load(ROOT / "conf" / "task" / f"{name}.yaml")
        want = {"math500": "math500-v2", "humaneval": "humaneval-v2"}.get(name, f"{name}-v1")  # v2: lm-eval 0.4.13
        assert conf.name == name and conf.version == TASKS[name].version == want
        assert conf.limit is None


def _compose(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("overrides, n, variant", [
    (["task=gsm8k"], 1319, "fewshot-5shot-chat-multiturn-strict"),
    (["task=gsm8k", "task.variant=cot_zeroshot", "task.primary=flexible"], 1319, "cot_zeroshot-0shot-chat-flexible"),
    (["task=gsm8k", "task.num_fewshot=8", "task.fewshot_as_multiturn=false"], 1319, "fewshot-8shot-chat-strict"),
    (["task=math500", "task.variant=minerva", "task.chat_template=false"], 500, "minerva-plain"),
    (["task=humaneval", "task.variant=completion"], 164, "completion-sanitize-v1"),
    (["task=mbpp", "task.subset=sanitized", "task.postprocess=none"], 257, "sanitized-3shot-chat-multiturn-raw"),
])
def test_configs_compose_with_the_main_config(overrides, n, variant):
    from eval.runner import _build_task

    conf = _compose(*overrides, "limit=3")
    task = _build_task(conf["task"])
    assert conf["limit"] == 3 and task.variant == variant
    assert len(task.examples()) == n and len(task.examples(conf["limit"])) == 3
    assert _compose(*overrides)["limit"] is None  # the task preset's default: everything


def test_bad_task_options_name_the_choices():
    from eval.runner import UsageError, _build_task

    for overrides, msg in [(["task=gsm8k", "task.variant=cot"], "valid choices: fewshot, cot_zeroshot"),
                           (["task=mbpp", "task.subset=all"], "valid choices: full, sanitized"),
                           (["task=humaneval", "task.postprocess=dream"], "valid choices: sanitize, none"),
                           (["task=gsm8k", "task.num_fewshot=-1"], "num_fewshot")]:
        with pytest.raises(UsageError, match=msg):
            _build_task(_compose(*overrides)["task"])
    with pytest.raises(UsageError, match="version"):
        _build_task(_compose("task=gsm8k", "task.version=gsm8k-v0")["task"])


# ----------------------------------------------------------------------------------------- data


def test_shipped_files_match_the_provenance_table_and_shared_data():
    md = (DATA_DIR / "PROVENANCE.md").read_text()
    table = {m[0]: (m[2], int(m[1])) for m in re.findall(r"^\| (\S+) \| (\d+) \| \d+ \| ([0-9a-f]{64}) \|$", md, re.M)}
    assert table == FILES
    for rel, (sha, count) in FILES.items():
        assert sha256_of(DATA_DIR / rel) == sha
        if SHARED.exists():
            assert sha256_of(SHARED / rel) == sha, f"{rel} differs from shared/data"
    assert len(load_records("mbpp/sanitized-mbpp.json")) == 427


def test_an_altered_file_is_refused_naming_it(tmp_path):
    bad = tmp_path / "test.jsonl"
    shutil.copyfile(DATA_DIR / "gsm8k" / "test.jsonl", bad)
    data = bytearray(bad.read_bytes())
    data[100] = ord("7") if data[100] != ord("7") else ord("8")
    bad.write_bytes(bytes(data))
    with pytest.raises(DataFileError, match=re.escape(str(bad)) + ".*sha256"):
        read_records(bad, sha256=FILES["gsm8k/test.jsonl"][0])
    with pytest.raises(DataFileError, match="not found"):
        read_records(tmp_path / "missing.jsonl")


def test_malformed_records_name_the_file_and_line(tmp_path):
    good = '{"question": "q", "answer": "a #### 1"}'
    p = tmp_path / "x.jsonl"
    p.write_text(f"{good}\n{{not json\n{good}\n")
    with pytest.raises(DataFileError, match=re.escape(f"{p}:2: malformed JSON")):
        read_records(p, ("question", "answer"))
    p.write_text(f"{good}\n\n{{\"question\": \"q\"}}\n")  # blank line 2 is skipped, line 3 lacks a field
    with pytest.raises(DataFileError, match=re.escape(f"{p}:3: record lacks field(s) answer")):
        read_records(p, ("question", "answer"))
    p.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(DataFileError, match=re.escape(f"{p}:2: expected a JSON object")):
        read_records(p)
    gz = tmp_path / "y.jsonl.gz"
    gz.write_bytes(gzip.compress(f"{good}\n{good}\n{good[:-3]}\n".encode()))
    with pytest.raises(DataFileError, match=re.escape(f"{gz}:3: malformed JSON")):
        read_records(gz)
    arr = tmp_path / "z.json"
    arr.write_text('[{"a": 1},\n {"a": 2,,}]')
    with pytest.raises(DataFileError, match=re.escape(f"{arr}:2: malformed JSON")):
        read_records(arr)
    p.write_text(f"{good}\n{good}\n")
    with pytest.raises(DataFileError, match="2 records, expected 3"):
        read_records(p, count=3)


def test_splits_and_counts():
    for name, n in BENCHMARKS.items():
        ex = build_task(name).examples()
        assert len(ex) == n and len({e.id for e in ex}) == n
    ids = [e.meta["task_id"] for e in build_task("mbpp").examples()]
    assert ids == list(range(11, 511))
    san = [e.meta["task_id"] for e in build_task("mbpp", subset="sanitized").examples()]
    assert len(san) == 257 and set(san) <= set(ids)
    assert [e.id for e in build_task("humaneval").examples()[:2]] == ["humaneval-000", "humaneval-001"]


def test_prompts_encode_with_a_real_hf_tokenizer():
    """The Hugging Face API the runner's tokenizers have (the tiny model's, built fresh)."""
    from asynclane.tiny_tokenizer import build_tokenizer
    from eval.tasks import synthetic

    tok = build_tokenizer(synthetic.VOCAB_WORDS)
    bos = tok.bos_token_id
    for task in (GSM8KTask(), GSM8KTask(chat_template=False), Math500Task(variant="minerva"), HumanEvalTask(),
                 HumanEvalTask(variant="completion"), MBPPTask(fewshot_as_multiturn=False)):
        ids = task.build_prompt(tok, task.examples()[0])
        assert ids and all(isinstance(i, int) for i in ids) and ids[0] == bos and ids.count(bos) == 1
    chat = tok.apply_chat_template([{"role": "user", "content": "start 3"}], tokenize=True,
                                   add_generation_prompt=True, return_dict=False)
    assert Prompt(messages=({"role": "user", "content": "start 3"},)).encode(tok) == list(chat)
    assert Prompt(messages=({"role": "user", "content": "start 3"},), gen_prefix="A 3").encode(tok) == \
        list(chat) + tok.encode(" A 3", add_special_tokens=False)


# ---------------------------------------------------------------------------------------- GSM8K


@pytest.fixture(scope="module")
def gsm8k_data():
    return load_records("gsm8k/test.jsonl"), load_records("gsm8k/train.jsonl")


def test_gsm8k_five_shot_prompt_is_lm_evals(gsm8k_data):
    test, train = gsm8k_data
    task = GSM8KTask(chat_template=False)
    ex = task.examples()
    # lm-eval's default sampler: one Random(1234) for the task, 5 train docs per test doc, in order
    rnd = random.Random(1234)
    expected = [rnd.sample(range(len(train)), 5) for _ in range(3)]
    for i in range(3):
        shots = "".join(f"Question: {train[j]['question']}\nAnswer: {train[j]['answer']}\n\n" for j in expected[i])
        want = shots + f"Question: {test[i]['question']}\nAnswer:"
        assert task.prompt(ex[i]).text == want
    # the shots depend on the problem, not on which subset runs
    for e in task.examples(5, seed=3, mode="random"):
        assert task.prompt(e) == task.prompt(ex[e.meta["index"]])
    ids = task.build_prompt(FakeTokenizer(), ex[0])
    assert decode(ids) == "<BOS>" + task.prompt(ex[0]).text  # plain text: BOS once, in front


def test_gsm8k_chat_prompts(gsm8k_data):
    test, train = gsm8k_data
    ex = GSM8KTask().examples()[0]
    multi = GSM8KTask().prompt(ex).messages
    assert [m["role"] for m in multi] == ["user", "assistant"] * 5 + ["user"]
    assert multi[0]["content"].startswith("Question: ") and multi[0]["content"].endswith("\nAnswer:")
    assert multi[1]["content"] in {r["answer"] for r in train}  # a whole worked answer, no delimiter
    assert multi[-1]["content"] == f"Question: {test[0]['question']}\nAnswer:"
    single = GSM8KTask(fewshot_as_multiturn=False).prompt(ex)
    assert single.messages == ({"role": "user", "content": GSM8KTask(chat_template=False).prompt(ex).text},)
    text = decode(GSM8KTask().build_prompt(FakeTokenizer(), ex))
    assert text.startswith("<s><user>Question:") and text.endswith("Answer:</user><assistant>")
    assert "<BOS>" not in text  # the template owns the BOS
    cot = GSM8KTask(variant="cot_zeroshot")
    assert cot.num_fewshot == 0 and cot.prompt(ex).messages == (
        {"role": "user", "content": f"Q: {test[0]['question']}\nA: Let's think step by step."},)
    assert GSM8KTask(num_fewshot=0, chat_template=False).prompt(ex).text == f"Question: {ex.prompt}\nAnswer:"


def test_gsm8k_scores_both_extractors_after_the_stop_string(gsm8k_data):
    task = GSM8KTask()
    ex = task.examples()[146]  # "#### 2,125"
    s = task.score(ex, "500+1500+125 = 2125 blocks\n#### 2,125\n\nQuestion: another one\nAnswer: #### 7")
    assert s == {"correct": True, "strict": True, "flexible": True, "extracted_strict": "2,125",
                 "extracted_flexible": "2,125"}
    s = task.score(ex, "He picked 2125 blocks.")
    assert s["correct"] is False and s["flexible"] is True and s["extracted_strict"] == "[invalid]"
    assert GSM8KTask(primary="flexible").score(ex, "He picked 2125 blocks.")["correct"] is True
    assert task.extract("#### 5 and 6") == "5" and GSM8KTask(primary="flexible").extract("#### 5 and 6") == "6"
    cot = GSM8KTask(variant="cot_zeroshot")
    assert cot.score(ex, "So 2,125 in total. The answer is 2125.\nQ: x")["strict"] is True
    for e in task.examples():  # every reference answer, through score (no execution)
        assert task.score(e, e.meta["reference"])["correct"]


# ---------------------------------------------------------------------------------------- MATH


def test_math500_prompts():
    ex = Math500Task().examples()[0]
    zero = Math500Task().prompt(ex)
    assert zero.messages == ({"role": "user", "content": ex.prompt + "\nPlease reason step by step, and put "
                              "your final answer within \\boxed{}."},)
    minerva = Math500Task(variant="minerva", chat_template=False).prompt(ex).text
    assert minerva.count("Problem:\n") == 5 and minerva.count("Final Answer: The final answer is") == 4
    assert minerva.startswith("Problem:\nFind the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$."
                              "\n\nSolution: The expressions inside")
    assert minerva.endswith("I hope it is correct.\n\nProblem:\n" + ex.prompt + "\n\nSolution:")
    multi = Math500Task(variant="minerva").prompt(ex).messages
    assert [m["role"] for m in multi] == ["user", "assistant"] * 4 + ["user"]


def test_math500_scoring_with_math_verify():
    task = Math500Task()
    ex = task.examples()
    by_answer = {e.answer: e for e in ex}
    cases = [("\\frac{14}{3}", "so $x = \\boxed{\\dfrac{14}{3}}$", True),
             ("\\frac{14}{3}", "the answer is \\boxed{14/3}.", True),
             ("\\frac{14}{3}", "\\boxed{\\frac{15}{3}}", False),
             ("58,500", "Final Answer: The final answer is $58500$. I hope it is correct.", True),
             ("\\text{Evelyn}", "It is $\\boxed{\\text{Evelyn}}$.", True),
             ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", True),
             ("11\\sqrt2", "\\boxed{11\\sqrt{2}}", True),
             ("11\\sqrt2", "no boxed answer: 11\\sqrt{2}", False),
             ("11\\sqrt2", "", False)]
    for gold, completion, want in cases:
        assert task.score(by_answer[gold], completion)["correct"] == want, (gold, completion)
    minerva = Math500Task(variant="minerva")
    e = by_answer["\\frac{14}{3}"]
    assert minerva.score(e, "$x=14/3$.\nFinal Answer: The final answer is $\\frac{14}{3}$. I hope it is correct."
                            "\n\nProblem:\nFinal Answer: The final answer is $2$. I hope it is correct.")["correct"]
    for e in ex[::20]:  # a sample of reference solutions through the same path (all: slow test)
        assert task.score(e, e.meta["solution"])["correct"], e.id


# ---------------------------------------------------------------------------------------- code


def test_humaneval_prompts():
    ex = HumanEvalTask().examples()[0]
    assert HumanEvalTask(variant="completion").prompt(ex) == Prompt(text=ex.prompt)
    p = HumanEvalTask().prompt(ex)
    assert p.messages == ({"role": "user", "content": "Write a solution to the following problem and make sure "
                           f"that it passes the tests:\n```python\n{ex.prompt}\n```\n"},)
    assert p.gen_prefix == f"Here is the completed function:\n```python\n{ex.prompt}\n"
    text = decode(HumanEvalTask().build_prompt(FakeTokenizer(), ex))
    assert text.endswith("</user><assistant>Here is the completed function:\n```python\n" + ex.prompt + "\n")
    assert decode(HumanEvalTask(variant="completion").build_prompt(FakeTokenizer(), ex)) == "<BOS>" + ex.prompt


def test_humaneval_references_and_generated_shapes_pass():
    inst, comp = HumanEvalTask(), HumanEvalTask(variant="completion")
    ex = inst.examples()
    e = ex[0]
    sol = e.meta["canonical_solution"]
    # instruct: the body continues the prefix's code block, then the model closes it and chats on
    s = inst.score(e, sol + "```\n\nThis checks every pair.")
    assert {k: v for k, v in s.items() if k != "sandbox"} == {"correct": True, "exec_status": "passed", "exec_error": ""}
    assert "rlimits" in s["sandbox"]  # the layers the program ran under
    # instruct, model re-opened a block with the whole function in it
    full = f"```python\n{e.prompt}{sol}```"
    assert inst.score(e, full)["correct"]
    # completion: trailing junk is sanitised away (sanitize) or cut at lm-eval's stops (none)
    junk = sol + "\n\nprint(has_close_elements([1.0, 2.0], 0.5))\nassert False\n"
    assert comp.score(e, junk)["correct"]
    assert HumanEvalTask(variant="completion", postprocess="none").score(e, junk)["correct"]
    assert comp.extract(junk) == junk  # prediction: the text that follows the prompt
    wrong = comp.score(e, "    return True\n")
    assert wrong["correct"] is False and wrong["exec_status"] == "failed" and "AssertionError" in wrong["exec_error"]
    hang = HumanEvalTask(variant="completion", timeout=1.0).score(e, "    while True:\n        pass\n")
    assert hang["correct"] is False and hang["exec_status"] == "timeout"
    e2 = ex[32]  # poly / find_zero: a helper function defined in the prompt
    assert comp.score(e2, e2.meta["canonical_solution"])["correct"]


def test_mbpp_three_shot_prompt():
    full = {r["task_id"]: r for r in load_records("mbpp/mbpp.jsonl")}
    task = MBPPTask(chat_template=False)
    ex = task.examples()[0]
    assert ex.meta["task_id"] == 11

    def text(r):
        return (f"You are an expert Python programmer, and here is your task: {r['text']} Your code should pass "
                "these tests:\n\n" + "\n".join(r["test_list"]) + "\n[BEGIN]\n")

    want = "".join(text(full[i]) + full[i]["code"] + "\n[DONE]\n\n" for i in (2, 3, 4)) + text(full[11])
    assert task.prompt(ex).text == want
    assert "\nassert remove_Occ(\"hello\",\"l\") == \"heo\"\n" in want
    assert MBPPTask(chat_template=False, num_fewshot=1).prompt(ex).text == \
        text(full[2]) + full[2]["code"] + "\n[DONE]\n\n" + text(full[11])
    multi = MBPPTask().prompt(ex).messages
    assert [m["role"] for m in multi] == ["user", "assistant"] * 3 + ["user"]
    assert multi[1]["content"] == full[2]["code"] + "\n[DONE]" and multi[-1]["content"] == text(full[11])
    san = MBPPTask(subset="sanitized", chat_template=False).examples()[0]
    assert san.prompt.startswith("You are an expert Python programmer") and san.meta["task_id"] == 11


def test_mbpp_references_pass_including_the_setup_code_task():
    task = MBPPTask()
    ex = {e.meta["task_id"]: e for e in task.examples()}
    for tid in (11, 367):
        e = ex[tid]
        assert task.score(e, e.meta["reference_code"] + "\n[DONE]\nYou are an expert")["correct"], tid
    e = ex[367]
    assert e.meta["setup"].startswith("root = Node(1)")
    program = task.program(e, e.meta["reference_code"])
    assert program.index("def is_tree_balanced") < program.index("root = Node(1)") < program.index("assert")
    from eval.tasks.humaneval import exec_flags

    setup_first = f"{e.meta['setup']}\n{e.meta['reference_code']}\n{e.answer}\n"
    assert exec_flags(setup_first, task.sandbox)["exec_status"] == "failed"  # NameError: Node
    fenced = "Here you go:\n```python\n" + ex[11].meta["reference_code"] + "\n```\n[DONE]"
    assert task.score(ex[11], fenced)["correct"]
    assert not MBPPTask(postprocess="none").score(ex[11], fenced)["correct"]
    assert not task.score(ex[11], "def remove_Occ(s, ch):\n    return s\n[DONE]")["correct"]
    san = MBPPTask(subset="sanitized")
    e = next(x for x in san.examples() if x.meta["setup"])  # one with test_imports
    assert san.score(e, e.meta["reference_code"])["correct"], e.id


# ----------------------------------------------------------------------------- full-data (slow)


@pytest.mark.slow
@pytest.mark.parametrize("subset", ["full", "sanitized"])
def test_all_mbpp_references_pass(subset):
    task = MBPPTask(subset=subset)
    failed = [e.id for e in task.examples() if not task.score(e, e.meta["reference_code"] + "\n[DONE]")["correct"]]
    assert failed == []


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["completion", "instruct"])
def test_all_humaneval_canonical_solutions_pass(variant):
    task = HumanEvalTask(variant=variant)
    failed = [e.id for e in task.examples() if not task.score(e, e.meta["canonical_solution"])["correct"]]
    assert failed == []


@pytest.mark.slow
def test_all_math500_reference_solutions_verify():
    task = Math500Task()
    assert [e.id for e in task.examples() if not task.score(e, e.meta["solution"])["correct"]] == []
