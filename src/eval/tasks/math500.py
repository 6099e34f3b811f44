"""MATH-500 (the PRM800K test split of MATH, Lightman et al. 2023): 500 problems.

Variants:

``zeroshot``
    the problem, then ``"Please reason step by step, and put your final answer within
    \\boxed{}."`` (the instruction Instruct models are commonly evaluated with); no shots.
``minerva``
    the 4-shot prompt of Minerva (Lewkowycz et al. 2022, as lm-eval's ``minerva_math*``):
    ``"Problem:\\n{problem}\\n\\nSolution:"``, the four fixed exemplars below as shots (each ends
    "Final Answer: The final answer is $X$. I hope it is correct."), stop string ``Problem:``.

The answer is the content of the last ``\\boxed{}`` or Minerva's final-answer sentence,
whichever comes last (:func:`eval.tasks.extract.math_answer`); ``correct`` is math-verify's
``verify(gold, prediction)`` with the dataset's ``answer`` as gold (both parsed as LaTeX; on
MATH-500 this agrees with parsing the reference solution for all 500 problems).  math-verify
runs with its default timeouts, which use SIGALRM: score in the main thread.

Every row also carries lm-eval's two ``minerva_math`` metrics under their names, computed on the
completion cut at the variant's stop strings (lm-eval 0.4.13, metadata 3.1; both variants):
``exact_match`` (the "Final Answer: The final answer is X." sentence against the last box of the
reference solution, both through Minerva's normalisation, :func:`eval.tasks.extract.minerva_exact_match`;
a completion without that sentence never matches) and ``math_verify`` (math-verify of the whole
completion against the whole reference solution, :func:`eval.tasks.extract.math_verify_whole`).

Version ``math500-v2``: the Minerva shots equal lm-eval 0.4.13's (``v1`` had the development
branch's stray ``}`` and single backslashes), and rows gained ``exact_match`` and ``math_verify``.
"""
from __future__ import annotations

from typing import Optional

from . import extract as X
from .base import Example, register_task
from .prompting import BenchmarkTask, Prompt, Shot, check_choice, fewshot_prompt

__all__ = ["Math500Task", "MINERVA_SHOTS", "ZEROSHOT_INSTRUCTION", "verify_answer"]

FIELDS = ("problem", "solution", "answer", "subject", "level", "unique_id")
ZEROSHOT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MINERVA_TEMPLATE = "Problem:\n{problem}\n\nSolution:"
MINERVA_STOPS = ("Problem:",)

# The Minerva 4-shot exemplars (Lewkowycz et al. 2022, appendix) exactly as lm-eval 0.4.13 passes
# them (minerva_math, metadata version 3.1: no stray "}" after the first problem, and "\\" line
# breaks inside the two align* environments; the development branch's 3.0 had both wrong).
MINERVA_SHOTS = (
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, "
     "and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which "
     "gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final "
     "answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
     "times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
     "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
     "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: "
     "The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
     "$(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we "
     "also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
     "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
)


def _mv():
    from math_verify import parse, verify  # imported on first use: it pulls in sympy

    return parse, verify


def parse_gold(answer: str):
    parse, _ = _mv()
    return parse("$" + answer + "$")


def verify_answer(gold_parsed, prediction: Optional[str]) -> bool:
    """math-verify: does the extracted ``prediction`` equal the parsed gold answer?"""
    if not prediction:
        return False
    parse, verify = _mv()
    pred = parse("\\boxed{" + prediction + "}")
    if not pred:
        return False
    return bool(verify(gold_parsed, pred))


@register_task("math500")
class Math500Task(BenchmarkTask):
    """MATH-500; ``correct``: math-verify on the final answer (last ``\\boxed{}`` / Minerva form)."""

    version = "math500-v2"

    def __init__(self, variant: str = "zeroshot", chat_template: bool = True, fewshot_as_multiturn: bool = True,
                 bos: str = "always", **source):
        check_choice("math500", "variant", variant, ("zeroshot", "minerva"))
        self.set_source(source, {"test": "math500/test.jsonl"})
        self.variant_name, self.chat, self.multiturn = variant, bool(chat_template), bool(fewshot_as_multiturn)
        self.set_bos(bos)
        self.stops = MINERVA_STOPS if variant == "minerva" else ()
        self._gold: dict[str, object] = {}

    @property
    def variant(self) -> str:
        fmt = ("chat-multiturn" if self.multiturn and self.variant_name == "minerva" else "chat") \
            if self.chat else "plain"
        return f"{self.variant_name}-{fmt}{self.bos_suffix}"

    def _build_pool(self) -> list[Example]:
        rows = self.records("test", FIELDS)
        return [Example(id=f"math500-{i:03d}", prompt=r["problem"], answer=r["answer"],
                        meta={"unique_id": r["unique_id"], "subject": r["subject"], "level": r["level"],
                              "solution": r["solution"]})
                for i, r in enumerate(rows)]

    def prompt(self, example: Example) -> Prompt:
        if self.variant_name == "zeroshot":
            return fewshot_prompt([], f"{example.prompt}\n{ZEROSHOT_INSTRUCTION}", self.chat, self.multiturn)
        shots = [Shot(MINERVA_TEMPLATE.format(problem=p), s) for p, s in MINERVA_SHOTS]
        return fewshot_prompt(shots, MINERVA_TEMPLATE.format(problem=example.prompt), self.chat, self.multiturn)

    def extract(self, completion: str) -> str:
        return X.math_answer(X.cut_at_stops(completion, self.stops)) or ""

    def gold(self, example: Example):
        if example.id not in self._gold:
            self._gold[example.id] = parse_gold(example.answer)
        return self._gold[example.id]

    def score(self, example: Example, completion: str) -> dict:
        text = X.cut_at_stops(completion, self.stops)
        solution = example.meta["solution"]
        return {"correct": verify_answer(self.gold(example), self.extract(completion)),
                "exact_match": X.minerva_exact_match(text, X.minerva_gold(solution)),
                "math_verify": X.math_verify_whole(text, solution)}
