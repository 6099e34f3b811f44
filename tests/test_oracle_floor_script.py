"""scripts/oracle_floor.py: the oracle decoder on the embedded tiny model and the benchmark lookup."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from asynclane.loading import load_backbone
from asynclane.testing import import_file
from asynclane.tiny_tokenizer import chat_prompt_ids
from eval.tasks import synthetic

ORACLE = import_file("_oracle_floor_script", Path(__file__).resolve().parents[1] / "scripts" / "oracle_floor.py")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone()


def _case(tiny, task="arith", i=2):
    prob = synthetic.test_problems(task)[i]
    ref = tiny.tokenizer(prob.answer, add_special_tokens=False)["input_ids"] + [tiny.spec.eos_id]
    return chat_prompt_ids(tiny.tokenizer, prob.prompt), ref


def test_oracle_needs_at_least_one_call_and_no_teacher_forcing_on_a_known_answer(tiny):
    prompt, ref = _case(tiny)
    calls, forced = ORACLE.oracle_calls(tiny, prompt, ref, 64)
    assert 1 <= calls < len(ref) and forced == 0


def test_a_reference_that_is_not_the_models_answer_is_teacher_forced(tiny):
    prompt, ref = _case(tiny)
    wrong = [ref[0]] * (len(ref) - 1) + [ref[-1]]  # the first token repeated: not what the model writes
    calls, forced = ORACLE.oracle_calls(tiny, prompt, wrong, 64)
    assert forced >= 1 and calls >= forced


def test_a_reference_longer_than_the_budget_is_refused(tiny):
    prompt, ref = _case(tiny)
    with pytest.raises(ValueError, match="does not fit gen_length"):
        ORACLE.oracle_calls(tiny, prompt, ref, len(ref) - 1)


def test_benchmark_lookup_reads_preset_runs_only(tmp_path):
    for name, tpc in (("d3llm", 10.5), ("asynclane", 15.0)):
        d = ORACLE.BENCH.Run(name, "arith", 64).run_dir(tmp_path, "tiny")
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"tokens_per_nfe": tpc}))
    ablation = ORACLE.BENCH.Run("asynclane", "arith", 64, (("cascade", False),)).run_dir(tmp_path, "tiny")
    ablation.mkdir(parents=True)
    (ablation / "summary.json").write_text(json.dumps({"tokens_per_nfe": 99.0}))
    assert ORACLE.benchmark_tokens_per_call(tmp_path, "arith", 64) == {"d3llm": 10.5, "asynclane": 15.0}
    assert ORACLE.benchmark_tokens_per_call(tmp_path, "arith", 128) == {}


def test_long_task_specs_give_the_evaluators_trace_problems():
    from eval.tasks.trace import TraceTask

    got = ORACLE.problems_of("trace:dep_distance=3", 512, 4)
    want = TraceTask(n=4, budget=512, dep_distance=3).examples()
    assert [p.prompt for p in got] == [e.prompt for e in want]
    assert [p.answer for p in got] == [e.meta["reference"] for e in want]
    assert [p.prompt for p in ORACLE.problems_of("trace", 256, 2)] == \
        [e.prompt for e in TraceTask(n=2, budget=256, dep_distance=1).examples()]
    assert ORACLE.problems_of("arith", 64, 3) == list(synthetic.test_problems("arith")[:3])
    for bad in ("trace:dep=2", "gsm8k", "arith:x=1"):
        with pytest.raises(ValueError, match="valid: arith, listops, trace or trace:dep_distance=D"):
            ORACLE.problems_of(bad, 256, 1)
    with pytest.raises(ValueError, match="dep_distance"):
        ORACLE.problems_of("trace:dep_distance=9", 256, 1)  # budget 256 allows 1..7


def test_oracle_runs_on_a_trace_problem(tiny):
    prob = ORACLE.problems_of("trace", 256, 1)[0]
    ref = tiny.tokenizer(prob.answer, add_special_tokens=False)["input_ids"] + [tiny.spec.eos_id]
    prompt = chat_prompt_ids(tiny.tokenizer, prob.prompt)
    assert len(prompt) + 256 <= 512  # the tiny model's positions (it never saw trace: mechanics only)
    calls, forced = ORACLE.oracle_calls(tiny, prompt, ref, 256)
    assert 1 <= calls <= len(ref) and forced <= calls
