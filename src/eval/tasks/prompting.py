"""Prompt assembly shared by the benchmark tasks: few-shot text, chat messages, tokenization.

lm-evaluation-harness's conventions, which the benchmark tasks follow:

* plain text (``chat_template: false``): every shot is ``text + target_delimiter + target +
  fewshot_delimiter``, then the question's text;
* chat (``chat_template: true``) with ``fewshot_as_multiturn: true``: one user turn per shot's
  text and one assistant turn per shot's target, then the question as the last user turn;
  with ``false``: the whole plain-text prompt as one user turn;
* a ``gen_prefix`` (HumanEval instruct) is text the assistant's answer starts with.  Chat: it is
  a final assistant message that the template renders with ``add_generation_prompt=False,
  continue_final_message=True`` (lm-eval's construction, as its HF model applies it), so the model
  continues that message exactly as the template writes it (a template that trims message
  content trims the prefix too); plain text: appended to the prompt.

Tokenization (``bos``, a task option):

``always`` (default)
    chat prompts are rendered by the tokenizer's own chat template (which adds any BOS itself)
    and tokenized without adding special tokens; plain prompts get the tokenizer's BOS (when it
    has one) in front, never twice.
``tokenizer`` (lm-eval's behaviour)
    lm-eval leaves BOS to the model; its HF model tokenizes the rendered prompt with the
    tokenizer's default special tokens, except that a prompt already starting with the BOS
    string gets none added (:func:`encode_like_lmeval`).  For LLaDA, Dream and the tiny model
    the default adds nothing, so plain prompts carry no BOS there; chat prompts are the same
    token ids under both rules.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

from .base import Example, select
from .sources import HF_DEFAULTS, TaskData

__all__ = ["Shot", "Prompt", "fewshot_text", "fewshot_prompt", "BenchmarkTask", "check_choice", "BOS_RULES",
           "encode_like_lmeval", "render_chat"]

BOS_RULES = ("always", "tokenizer")


def render_chat(tokenizer, messages, gen_prefix: str = "") -> str:
    """Chat ``messages`` through the tokenizer's template, ready for the answer: with a
    ``gen_prefix``, as a final assistant message the model continues (lm-eval's construction)."""
    msgs = list(messages)
    if gen_prefix:
        return tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": gen_prefix}], tokenize=False,
                                             add_generation_prompt=False, continue_final_message=True)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def encode_like_lmeval(tokenizer, text: str, add_bos_token: Optional[bool] = None) -> list[int]:
    """Token ids of a rendered prompt as lm-eval's HF model makes them: ``add_bos_token`` None
    uses the tokenizer's default special tokens, unless ``text`` already starts with the BOS
    string (then none); True / False force them on / off."""
    if add_bos_token is None:
        bos = getattr(tokenizer, "bos_token", None)
        add = not (isinstance(bos, str) and bos and text.startswith(bos))
    else:
        add = bool(add_bos_token)
    return list(tokenizer.encode(text, add_special_tokens=add))


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
            return render_chat(tokenizer, self.messages, self.gen_prefix)
        return self.text + self.gen_prefix

    def encode(self, tokenizer, bos: str = "always") -> list[int]:
        """Token ids (``bos``: one of :data:`BOS_RULES`, see the module docstring)."""
        check_choice("prompt", "bos", bos, BOS_RULES)
        if bos == "tokenizer":
            return encode_like_lmeval(tokenizer, self.render(tokenizer))
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
    bos: str = "always"  # one of BOS_RULES (a task option where the task takes one)
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
        return self.prompt(example).encode(tokenizer, self.bos)

    def set_source(self, options: dict, shipped: dict, hf_key: Optional[str] = None) -> None:
        """Where the records come from (:mod:`eval.tasks.sources`): the task's ``source`` / ``hf_*``
        options, its shipped file per role, and its canonical hub dataset (``HF_DEFAULTS[hf_key]``)."""
        own = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "source")]
        self.data = TaskData(self.name, shipped, HF_DEFAULTS[hf_key or self.name], options, own)

    def records(self, role: str, fields) -> list[dict]:
        """The records of ``role`` (``test`` | ``fewshot``) from the task's data source."""
        return self.data.records(role, fields)

    def provenance(self) -> dict:
        """Where the evaluated data came from (every result row records it)."""
        return self.data.provenance(self.data_roles())

    def data_roles(self) -> tuple:
        """The roles the task's prompts read (``fewshot`` too when shots come from the data)."""
        return ("test",)

    def set_bos(self, bos: str) -> None:
        check_choice(self.name, "bos", bos, BOS_RULES)
        self.bos = bos

    @property
    def bos_suffix(self) -> str:
        """What the task's ``variant`` string gains for a non-default ``bos`` rule."""
        return "" if self.bos == "always" else f"-bos_{self.bos}"

    @property
    def variant(self) -> str:
        return ""
