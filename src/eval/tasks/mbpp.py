"""MBPP (Austin et al. 2021): pass@1 by running each task's asserts.

Subsets (``subset``):

``full``       the original file's test split, task_ids 11-510 (500 tasks; lm-eval's ``mbpp``).
``sanitized``  the hand-verified file's records with task_id 11-510 (257 tasks), with its
               rewritten descriptions, test lists and ``test_imports``.

Prompt: the paper's (and lm-eval's) 3-shot format with tasks 2, 3 and 4 of the full file as the
shots (``num_fewshot`` <= 3 takes the first ones)::

    You are an expert Python programmer, and here is your task: {text} Your code should pass
    these tests:\\n\\n{test 1}\\n{test 2}\\n{test 3}\\n[BEGIN]\\n

each shot followed by its reference code and ``\\n[DONE]`` (shots separated by a blank line),
the task's own prompt last; the model's answer ends at ``[DONE]`` (the stop string).

Program: ``code + "\\n" + test_setup_code (full) or test_imports (sanitized) + "\\n" + tests``:
the setup comes *after* the solution because it uses the solution's definitions (task 367
builds its trees from the solution's ``Node`` class; lm-eval drops the setup, so 367 can never
pass there).  ``challenge_test_list`` is not used.

Post-processing (``postprocess``): ``sanitize`` (default) takes the code of a Markdown block
if the model wrote one and keeps the definitions (:func:`eval.tasks.extract.sanitize_code`);
``none`` runs the text before ``[DONE]`` as it is.  ``bos`` (``always`` | ``tokenizer``): how
plain prompts get a BOS (:mod:`eval.tasks.prompting`; ``tokenizer`` is lm-eval's rule).
"""
from __future__ import annotations

from . import extract as X
from .base import Example, register_task
from .humaneval import code_sandbox, exec_flags, sandbox_preflight
from .prompting import BenchmarkTask, Prompt, Shot, check_choice, fewshot_prompt

__all__ = ["MBPPTask", "SHOT_IDS", "TEST_IDS", "doc_text"]

FULL_FIELDS = ("task_id", "text", "code", "test_list", "test_setup_code")
SANITIZED_FIELDS = ("task_id", "prompt", "code", "test_list", "test_imports")
SHOT_IDS = (2, 3, 4)
TEST_IDS = range(11, 511)
STOPS = ("[DONE]",)


def doc_text(description: str, tests) -> str:
    return (f"You are an expert Python programmer, and here is your task: {description} Your code should pass "
            f"these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


@register_task("mbpp")
class MBPPTask(BenchmarkTask):
    """MBPP pass@1 (greedy: one program per task)."""

    version = "mbpp-v1"

    def __init__(self, subset: str = "full", num_fewshot: int = 3, chat_template: bool = True,
                 fewshot_as_multiturn: bool = True, postprocess: str = "sanitize", timeout: float = 10.0,
                 memory_mb: int = 2048, sandbox_strict: bool = False, bos: str = "always", **source):
        check_choice("mbpp", "subset", subset, ("full", "sanitized"))
        # the shots are tasks 2-4 of the full file (of the hub dataset's `prompt` split)
        test_file = "mbpp/mbpp.jsonl" if subset == "full" else "mbpp/sanitized-mbpp.json"
        self.set_source(source, {"test": test_file, "fewshot": "mbpp/mbpp.jsonl"},
                        "mbpp" if subset == "full" else "mbpp-sanitized")
        self.set_bos(bos)
        check_choice("mbpp", "num_fewshot", num_fewshot, (0, 1, 2, 3))
        check_choice("mbpp", "postprocess", postprocess, ("sanitize", "none"))
        self.subset, self.num_fewshot, self.postprocess = subset, num_fewshot, postprocess
        self.chat, self.multiturn = bool(chat_template), bool(fewshot_as_multiturn)
        self.sandbox = code_sandbox(timeout, memory_mb, sandbox_strict)

    @property
    def variant(self) -> str:
        fmt = ("chat-multiturn" if self.multiturn and self.num_fewshot else "chat") if self.chat else "plain"
        post = X.SANITIZER if self.postprocess == "sanitize" else "raw"
        return f"{self.subset}-{self.num_fewshot}shot-{fmt}-{post}{self.bos_suffix}"

    def _build_pool(self) -> list[Example]:
        if self.subset == "full":
            rows = [r for r in self.records("test", FULL_FIELDS) if r["task_id"] in TEST_IDS]
            text_key, setup = "text", lambda r: r["test_setup_code"]
        else:
            rows = [r for r in self.records("test", SANITIZED_FIELDS) if r["task_id"] in TEST_IDS]
            text_key, setup = "prompt", lambda r: "\n".join(r["test_imports"])
        return [Example(id=f"mbpp-{r['task_id']:03d}", prompt=doc_text(r[text_key], r["test_list"]),
                        answer="\n".join(r["test_list"]),
                        meta={"task_id": r["task_id"], "setup": setup(r), "reference_code": r["code"]})
                for r in sorted(rows, key=lambda r: r["task_id"])]

    def shots(self) -> list[Shot]:
        if not self.num_fewshot:
            return []
        full = {r["task_id"]: r for r in self.records("fewshot", FULL_FIELDS)}
        missing = [i for i in SHOT_IDS[: self.num_fewshot] if i not in full]
        if missing:
            raise ValueError(f"mbpp: the few-shot records lack task_id(s) {missing} (the shots are tasks "
                             f"{', '.join(map(str, SHOT_IDS))}); set task.hf_fewshot_split or num_fewshot=0")
        return [Shot(doc_text(full[i]["text"], full[i]["test_list"]), full[i]["code"] + "\n[DONE]")
                for i in SHOT_IDS[: self.num_fewshot]]

    def data_roles(self) -> tuple:
        return ("test", "fewshot") if self.num_fewshot else ("test",)

    def prompt(self, example: Example) -> Prompt:
        return fewshot_prompt(self.shots(), example.prompt, self.chat, self.multiturn, target_delimiter="")

    def extract(self, completion: str) -> str:
        text = X.cut_at_stops(completion, STOPS)
        return X.sanitize_code(text) if self.postprocess == "sanitize" else text

    def program(self, example: Example, completion: str) -> str:
        return f"{self.extract(completion)}\n{example.meta['setup']}\n{example.answer}\n"

    def preflight(self) -> list[str]:
        return sandbox_preflight(self)

    def score(self, example: Example, completion: str) -> dict:
        return exec_flags(self.program(example, completion), self.sandbox)
