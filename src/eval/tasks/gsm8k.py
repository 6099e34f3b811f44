"""GSM8K (Cobbe et al. 2021): the 1319 test problems, prompted and scored as lm-eval does.

Variants (lm-evaluation-harness task, metadata version 3.0):

``fewshot`` (``gsm8k``)
    ``"Question: {question}\\nAnswer:"``; ``num_fewshot`` (default 5) training problems with
    their full worked answers as shots; stop strings ``Question:``, ``</s>``, ``<|im_end|>``;
    strict rule ``#### (\\-?[0-9\\.\\,]+)``.
``cot_zeroshot`` (``gsm8k_cot_zeroshot``)
    ``"Q: {question}\\nA: Let's think step by step."``, no shots by default; stop strings
    ``Q:``, ``</s>``, ``<|im_end|>``; strict rule ``The answer is (\\-?[0-9\\.\\,]+).``.

Shots are drawn as lm-eval's default sampler draws them: one ``random.Random(fewshot_seed)``
(lm-eval's ``fewshot_random_seed``, 1234) for the task, ``sample(train, num_fewshot)`` once per
test problem in file order.  Problem *i* therefore always gets the same shots, whichever
subset (``limit``) runs.

Every completion is cut at the first stop string and then scored two ways, both in every row
(``strict`` and ``flexible``, see :mod:`eval.tasks.extract`); ``primary`` says which is
``correct``.  ``bos`` (``always`` | ``tokenizer``): how plain prompts get a BOS
(:mod:`eval.tasks.prompting`; ``tokenizer`` is lm-eval's rule).
"""
from __future__ import annotations

import random
from functools import lru_cache

from . import extract as X
from .base import Example, register_task
from .prompting import BenchmarkTask, Prompt, Shot, check_choice, fewshot_prompt

__all__ = ["GSM8KTask", "VARIANTS", "fewshot_indices"]

VARIANTS = {
    # variant: (question template, stop strings, strict extractor, default num_fewshot)
    "fewshot": ("Question: {question}\nAnswer:", ("Question:", "</s>", "<|im_end|>"), X.gsm8k_strict, 5),
    "cot_zeroshot": ("Q: {question}\nA: Let's think step by step.", ("Q:", "</s>", "<|im_end|>"),
                     X.gsm8k_cot_strict, 0),
}
FIELDS = ("question", "answer")


@lru_cache(maxsize=8)
def fewshot_indices(seed: int, k: int, n_test: int, n_train: int) -> tuple[tuple[int, ...], ...]:
    """Train indices of the shots of every test problem (lm-eval's sampler stream)."""
    rnd = random.Random(seed)
    return tuple(tuple(rnd.sample(range(n_train), k)) for _ in range(n_test))


@register_task("gsm8k")
class GSM8KTask(BenchmarkTask):
    """GSM8K; ``correct`` = the ``primary`` extractor's match; ``strict``/``flexible`` = both."""

    version = "gsm8k-v1"

    def __init__(self, variant: str = "fewshot", num_fewshot=None, fewshot_seed: int = 1234,
                 chat_template: bool = True, fewshot_as_multiturn: bool = True, primary: str = "strict",
                 bos: str = "always", **source):
        check_choice("gsm8k", "variant", variant, tuple(VARIANTS))
        self.set_source(source, {"test": "gsm8k/test.jsonl", "fewshot": "gsm8k/train.jsonl"})
        self.set_bos(bos)
        check_choice("gsm8k", "primary", primary, ("strict", "flexible"))
        self.template, self.stops, self._strict, default_k = VARIANTS[variant]
        k = default_k if num_fewshot is None else num_fewshot
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 64:
            raise ValueError(f"gsm8k: num_fewshot must be an integer in 0..64 or null, got {num_fewshot!r}")
        self.variant_name, self.num_fewshot, self.fewshot_seed = variant, k, int(fewshot_seed)
        self.chat, self.multiturn, self.primary = bool(chat_template), bool(fewshot_as_multiturn), primary

    @property
    def variant(self) -> str:
        fmt = ("chat-multiturn" if self.multiturn and self.num_fewshot else "chat") if self.chat else "plain"
        return f"{self.variant_name}-{self.num_fewshot}shot-{fmt}-{self.primary}{self.bos_suffix}"

    def _build_pool(self) -> list[Example]:
        test = self.records("test", FIELDS)
        return [Example(id=f"gsm8k-{i:04d}", prompt=r["question"],
                        answer=r["answer"].split("#### ")[-1].strip(),
                        meta={"index": i, "reference": r["answer"]})
                for i, r in enumerate(test)]

    def shots(self, example: Example) -> list[Shot]:
        if not self.num_fewshot:
            return []
        train = self.records("fewshot", FIELDS)
        n_test = len(self.records("test", FIELDS))
        picks = fewshot_indices(self.fewshot_seed, self.num_fewshot, n_test, len(train))[example.meta["index"]]
        return [Shot(self.template.format(question=train[j]["question"]), train[j]["answer"]) for j in picks]

    def data_roles(self) -> tuple:
        return ("test", "fewshot") if self.num_fewshot else ("test",)

    def prompt(self, example: Example) -> Prompt:
        query = self.template.format(question=example.prompt)
        return fewshot_prompt(self.shots(example), query, self.chat, self.multiturn)

    def extractions(self, completion: str) -> dict[str, str]:
        text = X.cut_at_stops(completion, self.stops)
        return {"strict": self._strict(text), "flexible": X.gsm8k_flexible(text)}

    def extract(self, completion: str) -> str:
        return self.extractions(completion)[self.primary]

    def score(self, example: Example, completion: str) -> dict:
        got = self.extractions(completion)
        flags = {k: X.gsm8k_match(v, example.meta["reference"]) for k, v in got.items()}
        return {"correct": flags[self.primary], **flags, "extracted_strict": got["strict"],
                "extracted_flexible": got["flexible"]}
