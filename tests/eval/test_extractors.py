"""The pure extractors of eval.tasks.extract, on strings taken from the datasets' own answers.

GSM8K rules must behave exactly as lm-evaluation-harness's gsm8k filters and exact_match
(quirks included); MATH boxes must survive nested and escaped braces; the code sanitiser must
leave every reference solution's statements untouched.
"""
from __future__ import annotations

import ast
import warnings

import pytest

from eval.tasks import extract as X
from eval.tasks.datafiles import load_records

# ------------------------------------------------------------------------------------ GSM8K


@pytest.fixture(scope="module")
def gsm8k_test():
    return load_records("gsm8k/test.jsonl", ("question", "answer"))


def test_strict_on_reference_answers_with_commas_and_negatives(gsm8k_test):
    # test problem 146 ends "#### 2,125", 489 "#### -10", 1113 "#### -3", 2 has "$<<...>>200,000" in the text
    for i, final in [(146, "2,125"), (489, "-10"), (1113, "-3"), (2, "70000"), (0, "18")]:
        ref = gsm8k_test[i]["answer"]
        assert X.gsm8k_strict(ref) == final
        assert X.gsm8k_match(final, ref)
    assert X.gsm8k_match("2125", gsm8k_test[146]["answer"])  # "," is ignored on both sides
    assert X.gsm8k_match("$2,125.", gsm8k_test[146]["answer"])  # "$" and a final "." too
    assert not X.gsm8k_match("2,126", gsm8k_test[146]["answer"])


def test_every_reference_answer_scores_through_both_extractors(gsm8k_test):
    for r in gsm8k_test:
        assert X.gsm8k_match(X.gsm8k_strict(r["answer"]), r["answer"])
        assert X.gsm8k_match(X.gsm8k_flexible(r["answer"]), r["answer"])


def test_strict_is_the_first_hash_match_and_needs_the_space():
    assert X.gsm8k_strict("#### 5\nthen #### 7") == "5"  # take_first of the first match
    assert X.gsm8k_strict("####18") == X.INVALID
    assert X.gsm8k_strict("#### $18") == X.INVALID  # "$" is not in the strict character class
    assert X.gsm8k_strict("#### 18.") == "18." and X.gsm8k_match("18.", "#### 18")
    assert X.gsm8k_strict("#### 1,000,000 dollars") == "1,000,000"
    assert not X.gsm8k_match("18.00", "18")  # lm-eval does not normalise decimals
    assert not X.gsm8k_match(X.INVALID, "#### 18")


def test_flexible_takes_the_last_number_like_run():
    # a line of a reference answer (test problem 0): "$<<9*2=18>>18" holds several runs, the last wins
    text = "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market."
    assert X.gsm8k_flexible(text) == "18"
    assert X.gsm8k_flexible("It costs $1,000.") == "$1,000."
    assert X.gsm8k_match("$1,000.", "#### 1000")
    assert X.gsm8k_flexible("The average is -10 degrees") == "-10"
    assert X.gsm8k_flexible("so x is 5 apples") == "5"  # the one-digit second alternative
    assert X.gsm8k_flexible("1, 2, and 3") == "3"
    assert X.gsm8k_flexible("no digits here") == X.INVALID
    # a run of 2+ chars from [$0-9.,] even without digits: lm-eval's regex matches "..."
    assert X.gsm8k_flexible("18 and then...") == "..."
    assert X.gsm8k_flexible("Total: 3.5 hours") == "3.5"


def test_regex_filter_semantics_with_groups():
    assert X.regex_extract("a 12 b 7", X.GSM8K_FLEXIBLE, 0) == "12"
    assert X.regex_extract("a 12 b 7", X.GSM8K_FLEXIBLE, -1) == "7"
    assert X.regex_extract(" nothing ", r"(\d+)", fallback="none") == "none"
    assert X.regex_extract("x = 42 ", r"= (\d+ )") == "42"  # stripped


def test_cot_strict_keeps_lm_evals_trailing_any_character():
    assert X.gsm8k_cot_strict("3 + 15 = 18. The answer is 18.") == "18"
    assert X.gsm8k_cot_strict("The answer is 1,234 apples") == "1,234"
    # the pattern ends in an unescaped "." (any character): at the very end it steals a digit
    assert X.gsm8k_cot_strict("The answer is 18") == "1"
    assert X.gsm8k_cot_strict("the answer is 18.") == X.INVALID  # case-sensitive


def test_normalisation_order_and_case():
    assert X.gsm8k_normalize("The total is\n#### $1,234.") == "1234"
    assert X.gsm8k_normalize("ABC") == "abc"
    assert X.gsm8k_normalize("3.") == "3" and X.gsm8k_normalize("3..") == "3."  # one final "." only


def test_cut_at_stops():
    text = "#### 5\n\nQuestion: next one\nAnswer: #### 6"
    assert X.cut_at_stops(text, ("Question:", "</s>")) == "#### 5\n\n"
    assert X.cut_at_stops("abc", ("x",)) == "abc"
    assert X.cut_at_stops("a</s>b<|im_end|>", ("<|im_end|>", "</s>")) == "a"
    assert X.cut_at_stops("abc", ("",)) == "abc"


# ------------------------------------------------------------------------------------- MATH


@pytest.fixture(scope="module")
def math500():
    return load_records("math500/test.jsonl", ("problem", "solution", "answer"))


def test_last_boxed_on_dataset_solutions(math500):
    cases = {
        0: "\\left( 3, \\frac{\\pi}{2} \\right)",  # nested braces
        4: "\\text{Evelyn}",  # a text answer
        31: "11\\sqrt2",
        343: "58,500",
        422: "\\{1\\pm\\sqrt{5},-2\\}",  # escaped braces inside the box, prose after it
        45: "2",  # two boxes: the last one
    }
    for i, want in cases.items():
        assert X.last_boxed(math500[i]["solution"]) == want == math500[i]["answer"], i


def test_every_reference_solution_boxes_its_answer(math500):
    same = sum(X.math_answer(r["solution"]) == r["answer"] for r in math500)
    assert same >= 400  # the rest differ only in spelling (math-verify decides, see the task tests)
    assert all(X.math_answer(r["solution"]) for r in math500)


def test_box_forms():
    assert X.last_boxed("so $\\boxed 5$.") == "5"  # no braces: to the "$"
    assert X.last_boxed("so \\boxed 12\nnext") == "12"
    assert X.last_boxed("\\fbox{3}") == "3"
    assert X.last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{\\dfrac{\\sqrt{3}}{2}}") == "\\dfrac{\\sqrt{3}}{2}"
    assert X.last_boxed("\\boxed{1} then \\boxed{2") is None  # the last box was cut off
    assert X.last_boxed("no box") is None
    assert X.last_boxed("\\boxedfoo{3}") is None  # another command, not a box
    assert X.last_boxed("\\boxed {7}") == "7"


def test_minerva_final_answer_form():
    from eval.tasks.math500 import MINERVA_SHOTS

    expected = ["[2,5)", "24", "16", "-\\frac{2}{3}"]
    for (_, solution), want in zip(MINERVA_SHOTS, expected):
        assert X.strip_dollars(X.minerva_answer(solution)) == want
        assert X.math_answer(solution) == want == X.last_boxed(solution)
    assert X.minerva_answer("Final Answer: The final answer is $5$. I hope it is correct.") == "$5$"
    assert X.minerva_answer("Final Answer: The final answer is 7") is None  # lm-eval needs ". I hope..."
    assert X.minerva_answer("no final answer") is None
    # whichever comes last wins
    assert X.math_answer("\\boxed{3}\nFinal Answer: The final answer is $4$. I hope it is correct.") == "4"
    assert X.math_answer("Final Answer: The final answer is $4$. I hope it is correct. Actually \\boxed{5}") == "5"
    assert X.math_answer("nothing") is None
    assert X.strip_dollars(" $$x$$ ") == "x"


# ------------------------------------------------------------------------------------- code


def test_code_from_fences():
    md = "Here is the code:\n```python\ndef f():\n    return 1\n```\nIt returns 1."
    assert X.code_from_fences(md) == "def f():\n    return 1\n"
    assert X.code_from_fences("```\nx = 1\n") == "x = 1\n"  # never closed
    assert X.code_from_fences("def f(): pass") == "def f(): pass"
    assert X.code_from_fences("```py\r\nx = 2\r\n```") == "x = 2\r\n"
    # the prompt opened a block: the code runs to the closing fence
    assert X.code_from_fences("    return 1\n```\nExplanation", opened=True) == "    return 1\n"
    assert X.code_from_fences("    return 1\n", opened=True) == "    return 1\n"
    assert X.code_from_fences("\n```python\ndef g():\n    pass\n```", opened=True) == "def g():\n    pass\n"
    assert X.code_from_fences("```\n\nThis works because...", opened=True) == ""


def test_sanitize_keeps_definitions_and_drops_the_rest():
    text = ("Sure! Here it is:\n"
            "import math\n"
            "from typing import List\n\n"
            "CONST = 3  # kept\n\n"
            "@staticmethod_like\n"
            "def area(r):\n"
            "    # comment kept\n"
            "    return math.pi * r * r\n\n"
            "class Box:\n"
            "    size: int = 1\n\n"
            "print(area(2))\n"
            "assert area(1) > 3\n"
            "if __name__ == '__main__':\n"
            "    area(3)\n"
            "This function computes the area.\n")
    out = X.sanitize_code(text, "area")
    assert out == ("import math\nfrom typing import List\nCONST = 3  # kept\n@staticmethod_like\ndef area(r):\n"
                   "    # comment kept\n    return math.pi * r * r\nclass Box:\n    size: int = 1\n")
    ast.parse(out)


def test_sanitize_cuts_truncated_tails_and_finds_the_entry_point():
    truncated = "def f(x):\n    return x + 1\n\ndef g(y):\n    return (y +"
    assert X.sanitize_code(truncated, "f") == "def f(x):\n    return x + 1\n"
    fenced = "I will write it.\n\n```python\ndef h():\n    return 2\n```\nDone."
    assert X.sanitize_code(fenced, "h") == "def h():\n    return 2\n"
    assert X.sanitize_code("just prose, no code at all!") == ""
    assert X.sanitize_code("") == ""
    crlf = "def k():\r\n\treturn 3\r\n"
    assert X.sanitize_code(crlf) == "def k():\n\treturn 3\n"  # tabs untouched
    # the first stretch that defines something (or the entry point) wins over a longer one
    two = "x = 1\nprint(x)\n!!!\ndef m():\n    return 4\n"
    assert X.sanitize_code(two) == X.sanitize_code(two, "m") == "def m():\n    return 4\n"
    assert X.sanitize_code("x = 1\nprint(x)\n!!!\n") == "x = 1\n"  # nothing defined: the longest


def test_sanitize_leaves_every_reference_solution_unchanged():
    """No execution: the sanitised reference parses to the same statements as the original."""
    mbpp = load_records("mbpp/mbpp.jsonl", ("task_id", "code"))
    humaneval = load_records("humaneval/HumanEval.jsonl.gz", ("prompt", "canonical_solution", "entry_point"))
    sources = [(r["code"], None) for r in mbpp if 11 <= r["task_id"] <= 510]
    sources += [(r["prompt"] + r["canonical_solution"], r["entry_point"]) for r in humaneval]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some references have invalid escape sequences ("\w")
        for code, entry in sources:
            want = ast.dump(ast.parse(code.replace("\r\n", "\n")))
            assert ast.dump(ast.parse(X.sanitize_code(code, entry))) == want
