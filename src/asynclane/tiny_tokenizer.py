"""The embedded tiny model's word-level tokenizer, saved as a real Hugging Face tokenizer.

One token per whitespace-separated word, ``"\\n"`` its own token (the line delimiter samplers
look for), special tokens for mask / EOS / chat roles, and a Jinja chat template, so the tiny
model is loaded and prompted exactly like LLaDA (tokenizer files + ``apply_chat_template``).
"""
from __future__ import annotations

from typing import Iterable

SPECIALS = {"bos": "<|bos|>", "eos": "<|eos|>", "mask": "<|mask|>", "user": "<|user|>",
            "assistant": "<|assistant|>", "eot": "<|eot|>", "unk": "<|unk|>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] | trim }} <|eot|> "
    "{% endfor %}<|assistant|>")


def build_tokenizer(words: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` over SPECIALS + ``words`` (ids in that order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for w in [*SPECIALS.values(), *words]:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.Split("\n", behavior="isolated")])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=SPECIALS["bos"], eos_token=SPECIALS["eos"],
        pad_token=SPECIALS["eos"], mask_token=SPECIALS["mask"], unk_token=SPECIALS["unk"],
        additional_special_tokens=[SPECIALS["user"], SPECIALS["assistant"], SPECIALS["eot"]])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_prompt_ids(tok, user_text: str) -> list[int]:
    """Token ids of a single-turn chat prompt, ready for the answer to follow."""
    return tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=True,
                                   add_generation_prompt=True, return_dict=False)
