"""HumanEval (Chen et al. 2021): 164 problems, pass@1 by running the official tests.

Variants:

``completion``
    the bare prompt (signature and docstring) as plain text; the model continues the function.
``instruct``
    lm-eval's ``humaneval_instruct``: one user turn "Write a solution to the following problem
    and make sure that it passes the tests:\\n```python\\n{prompt}\\n```\\n" and the answer
    started for the model (``gen_prefix``) "Here is the completed function:\\n```python\\n{prompt}\\n"
    as a final assistant message, rendered with ``continue_final_message`` (lm-eval's
    construction; a template that trims message content trims the prefix's end too), so the
    model continues the function inside an open code block.

Post-processing (``postprocess``), recorded in the config and the row's ``prediction``:

``sanitize`` (default; the sanitiser ``sanitize-v1`` of :func:`eval.tasks.extract.sanitize_code`)
    the code of the completion's Markdown block (for ``instruct``: up to the fence that closes
    the block the prefix opened), appended to the prompt; then the longest parseable stretch,
    keeping only imports, definitions and assignments (prose, ``print`` calls, stray asserts and
    ``__main__`` blocks go).
``none`` (lm-eval exactly)
    prompt + the completion cut as lm-eval cuts it: first at the task's stop strings
    ``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint`` (lm-eval's ``generate_until`` rule,
    :func:`eval.tasks.extract.split_at_stops`; both variants), then, for ``instruct``, at the first
    ```` ``` ```` (its ``build_predictions_instruct`` filter).

Version ``humaneval-v2``: the instruct prompt's construction above (``v1`` appended the prefix
as text after the generation prompt) and the stop strings of ``instruct`` with ``none``.

``bos`` (``always`` | ``tokenizer``): how the plain ``completion`` prompt gets a BOS
(:mod:`eval.tasks.prompting`; ``tokenizer`` is lm-eval's rule).

The program run is ``code + "\\n" + test + "\\n" + "check(entry_point)"`` in
:mod:`eval.sandbox` (a separate process, limits, no network); ``correct`` means it exited
cleanly after running every test.  ``exec_status`` (passed/failed/timeout/error) and the end
of its stderr (``exec_error``) go into the row too.
"""
from __future__ import annotations

from .. import sandbox
from . import extract as X
from .base import Example, register_task
from .prompting import BenchmarkTask, Prompt, check_choice

__all__ = ["HumanEvalTask", "COMPLETION_STOPS", "INSTRUCTION", "GEN_PREFIX", "exec_flags"]

FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
COMPLETION_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
INSTRUCTION = ("Write a solution to the following problem and make sure that it passes the tests:\n"
               "```python\n{prompt}\n```\n")
GEN_PREFIX = "Here is the completed function:\n```python\n{prompt}\n"
ERROR_TAIL = 400  # characters of stderr kept in a result row


def code_sandbox(timeout: float, memory_mb: int, sandbox_strict: bool) -> sandbox.SandboxConfig:
    """The sandbox of a code task (its options ``timeout``, ``memory_mb``, ``sandbox_strict``)."""
    return sandbox.SandboxConfig(timeout=float(timeout), memory_mb=int(memory_mb), strict=bool(sandbox_strict))


def sandbox_preflight(task) -> list[str]:
    """Before any work: a warning naming the sandbox layers this machine cannot give, or (with
    ``sandbox_strict``) a ValueError."""
    missing = sandbox.missing_layers(task.sandbox)
    if not missing:
        return []
    msg = (f"task {task.name}: the code sandbox lacks {', '.join(missing)} on this machine, so generated "
           f"code runs with weaker isolation (see eval.sandbox)")
    if task.sandbox.strict:
        raise ValueError(msg + "; task.sandbox_strict=true refuses to run")
    return [msg + "; task.sandbox_strict=true makes this an error"]


def exec_flags(program: str, cfg: sandbox.SandboxConfig) -> dict:
    """Run ``program`` in the sandbox: the score fields of a code task."""
    res = sandbox.run_program(program, cfg)
    return {"correct": res.passed, "exec_status": res.status,
            "exec_error": "" if res.passed else res.stderr[-ERROR_TAIL:], "sandbox": res.isolation}


@register_task("humaneval")
class HumanEvalTask(BenchmarkTask):
    """HumanEval pass@1 (greedy: one completion per problem)."""

    version = "humaneval-v2"

    def __init__(self, variant: str = "instruct", postprocess: str = "sanitize", timeout: float = 10.0,
                 memory_mb: int = 2048, sandbox_strict: bool = False, bos: str = "always", **source):
        check_choice("humaneval", "variant", variant, ("completion", "instruct"))
        self.set_source(source, {"test": "humaneval/HumanEval.jsonl.gz"})
        check_choice("humaneval", "postprocess", postprocess, ("sanitize", "none"))
        self.variant_name, self.postprocess = variant, postprocess
        self.set_bos(bos)
        self.sandbox = code_sandbox(timeout, memory_mb, sandbox_strict)

    @property
    def variant(self) -> str:
        return f"{self.variant_name}-{X.SANITIZER if self.postprocess == 'sanitize' else 'raw'}{self.bos_suffix}"

    def _build_pool(self) -> list[Example]:
        rows = self.records("test", FIELDS)
        out = []
        for r in rows:
            n = int(r["task_id"].split("/")[-1])
            out.append(Example(id=f"humaneval-{n:03d}", prompt=r["prompt"],
                               answer=f"{r['test']}\ncheck({r['entry_point']})",
                               meta={"task_id": r["task_id"], "entry_point": r["entry_point"], "test": r["test"],
                                     "canonical_solution": r["canonical_solution"]}))
        return out

    def prompt(self, example: Example) -> Prompt:
        if self.variant_name == "completion":
            return Prompt(text=example.prompt)
        return Prompt(messages=({"role": "user", "content": INSTRUCTION.format(prompt=example.prompt)},),
                      gen_prefix=GEN_PREFIX.format(prompt=example.prompt))

    def body(self, completion: str) -> str:
        """The part of the completion that follows the prompt in the program."""
        if self.postprocess == "none":
            text = X.split_at_stops(completion, COMPLETION_STOPS)
            return text if self.variant_name == "completion" else X.fence_cut(text)
        return X.code_from_fences(completion, opened=self.variant_name == "instruct")

    def code(self, example: Example, completion: str) -> str:
        """The function the completion amounts to (without the tests)."""
        code = example.prompt + self.body(completion)
        if self.postprocess == "none":
            return code
        return X.sanitize_code(code, example.meta["entry_point"], fences=False)

    def program(self, example: Example, completion: str) -> str:
        return f"{self.code(example, completion)}\n{example.meta['test']}\ncheck({example.meta['entry_point']})\n"

    def extract(self, completion: str) -> str:
        return self.body(completion)  # the program is prompt + this (then sanitised), + the tests

    def preflight(self) -> list[str]:
        return sandbox_preflight(self)

    def score(self, example: Example, completion: str) -> dict:
        return exec_flags(self.program(example, completion), self.sandbox)
