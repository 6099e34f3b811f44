"""Prompt assembly shared by the benchmark tasks: few-shot text, chat messages, tokenization.

lm-evaluation-harness's conventions, which the benchmark tasks follow:

* plain text (``chat_template: false``): every shot is ``text + target_delimiter + target +
  fewshot_delimiter``, then the question's text;
* chat (``chat_template: true``) with ``fewshot_as_multiturn: true``: one user turn per shot's
  text and one assistant turn per shot's target, then the question as the last user turn;
  with ``false``: the whole plain-text prompt as one user turn;
* a ``gen_prefix`` (HumanEval instruct) is text the assistant's answer starts with: appended
  after the generation prompt, so the model continues it.

Tokenization: chat prompts are rendered by the tokenizer's own chat template (which adds any
BOS itself) and tokenized without adding special tokens; plain prompts get the tokenizer's BOS
(when it has one) in front, never twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .base import Example, select

__all__ = ["Shot", "Prompt", "fewshot_text", "fewshot_prompt", "BenchmarkTask", "check_choice"]


@dataclass(frozen=True)
class Shot:
    text: str  # what the user side says (lm-eval's doc_to_text)
    target: str  # the worked answer (lm-eval's doc_to_target for few-shot examples)


@dataclass(frozen=True)
class Prompt:
    """A prompt before tokenization: chat ``messages`` or plain ``text``, and a ``gen_prefix``."""

    messages: Optional[tuple] = None  # ({"role": ..., "content": ...}, ...)
    text: Optional[str] = None
    gen_prefix: str = ""

    def render(self, tokenizer=None) -> str:
        """The prompt as one string (chat prompts need the tokenizer's template)."""
        if self.messages is not None:
            if tokenizer is None:
                raise ValueError("a chat prompt needs a tokenizer (its chat template) to render")
            body = tokenizer.apply_chat_template(list(self.messages), tokenize=False, add_generation_prompt=True)
        else:
            body = self.text
        return body + self.gen_prefix

    def encode(self, tokenizer) -> list[int]:
        ids = list(tokenizer.encode(self.render(tokenizer), add_special_tokens=False))
        bos = getattr(tokenizer, "bos_token_id", None)
        if self.messages is None and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids


def fewshot_text(shots: Sequence[Shot], query: str, target_delimiter: str = " ",
                 fewshot_delimiter: str = "\n\n") -> str:
    return "".join(s.text + target_delimiter + s.target + fewshot_delimiter for s in shots) + query


def fewshot_prompt(shots: Sequence[Shot], query: str, chat: bool, multiturn: bool, target_delimiter: str = " ",
                   fewshot_delimiter: str = "\n\n", gen_prefix: str = "") -> Prompt:
    if not chat:
        return Prompt(text=fewshot_text(shots, query, target_delimiter, fewshot_delimiter), gen_prefix=gen_prefix)
    if multiturn:
        msgs = []
        for s in shots:
            msgs += [{"role": "user", "content": s.text}, {"role": "assistant", "content": s.target}]
        msgs.append({"role": "user", "content": query})
    else:
        msgs = [{"role": "user", "content": fewshot_text(shots, query, target_delimiter, fewshot_delimiter)}]
    return Prompt(messages=tuple(msgs), gen_prefix=gen_prefix)


def check_choice(task: str, key: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{task}: {key}={value!r}; valid choices: {', '.join(map(str, choices))}")


class BenchmarkTask:
    """Shared plumbing: the example pool (built once), selection, prompt -> token ids.

    Subclasses set ``name``/``version`` (the registry does ``name``), build ``_build_pool()``
    and ``prompt(example)``, and describe their options in ``variant`` (a short string).
    """

    name: str
    version: str
    _pool_cache: Optional[list[Example]] = None

    def _build_pool(self) -> list[Example]:
        raise NotImplementedError

    def pool(self) -> list[Example]:
        if self._pool_cache is None:
            self._pool_cache = self._build_pool()
        return self._pool_cache

    def examples(self, limit: Optional[int] = None, seed: int = 0, mode: str = "first") -> list[Example]:
        return select(self.pool(), limit, seed, mode)

    def prompt(self, example: Example) -> Prompt:
        raise NotImplementedError

    def build_prompt(self, tokenizer, example: Example) -> list[int]:
        return self.prompt(example).encode(tokenizer)

    @property
    def variant(self) -> str:
        return ""
