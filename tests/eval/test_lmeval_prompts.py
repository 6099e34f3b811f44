"""Our benchmark prompts equal lm-evaluation-harness 0.4.13's, checked with lm-eval's own tasks.

lm-eval's own task objects are built from its installed YAML configs with its own utility
modules (``minerva_math/utils.py``, ``humaneval/utils.py``, ``mbpp/utils.py``), pointed at our
shipped data files (``dataset_path: json``).  Two of those modules cannot be imported here as
they are, and are imported with the one obstacle moved aside (only while importing, only in
this test): minerva's asserts antlr 4.11 (Hydra pins 4.9; the prompt functions do not use
antlr), and humaneval's / mbpp's download the ``code_eval`` metric (given ours,
:class:`eval.lmeval.CodeEval`, instead).  lm-eval then renders each prompt through its own
request building (``build_all_requests``: few-shot sampling, chat messages, ``gen_prefix``),
with lm-eval's HF model's chat-template rule, for the first 20 documents of every task and
variant we have, in every prompt format lm-eval offers for it (plain text; chat with few-shot
turns; chat with one collapsed user turn), under three chat templates (the tiny model's, a
Llama-3-style one that trims message content, a ChatML-style one that does not).  Our task
must render the same string, and with ``bos: tokenizer`` produce the token ids
:class:`eval.lmeval.AsyncLaneLM` makes of lm-eval's string.  The task mapping that
``python -m eval.lmeval`` uses (:func:`eval.lmeval.task_manager`, with our replacements of the
utilities) must render the same prompts as lm-eval's own tasks.
"""
from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-eval is installed by CI (.ci/run); pip install -e '.[lm-eval]'")

import eval.lmeval as L  # noqa: E402
from eval.tasks import GSM8KTask, HumanEvalTask, Math500Task, MBPPTask  # noqa: E402
from eval.tasks.prompting import encode_like_lmeval  # noqa: E402

N_DOCS = 20
LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_STYLE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATES = {"tiny": None, "llama3_style": LLAMA3_STYLE, "chatml_style": CHATML_STYLE}

# lm-eval task -> (our task, the prompt formats both have: plain / multiturn / singleturn)
FEWSHOT_FORMATS = ("plain", "multiturn", "singleturn")
VARIANTS = {
    "gsm8k": (lambda **kw: GSM8KTask(variant="fewshot", **kw), FEWSHOT_FORMATS),
    "gsm8k_cot_zeroshot": (lambda **kw: GSM8KTask(variant="cot_zeroshot", **kw), ("plain", "multiturn")),
    "minerva_math500": (lambda **kw: Math500Task(variant="minerva", **kw), FEWSHOT_FORMATS),
    "humaneval": (lambda **kw: HumanEvalTask(variant="completion", **kw), ("plain",)),
    "humaneval_64": (lambda **kw: HumanEvalTask(variant="completion", **kw), ("plain",)),
    "humaneval_instruct": (lambda **kw: HumanEvalTask(variant="instruct", **kw), ("multiturn", "singleturn")),
    "humaneval_64_instruct": (lambda **kw: HumanEvalTask(variant="instruct", **kw), ("multiturn",)),
    "mbpp": (lambda **kw: MBPPTask(subset="full", **kw), FEWSHOT_FORMATS),
}


@pytest.fixture(scope="module")
def tokenizers():
    from asynclane.loading import TINY_DIR, load_tokenizer

    out = {}
    for name, template in TEMPLATES.items():
        tok = load_tokenizer(TINY_DIR)
        if template is not None:
            tok.chat_template = template
        out[name] = tok
    return out


def hf_chat(tok):
    """lm-eval's HF model's ``apply_chat_template`` rule."""
    def render(messages, add_generation_prompt=True):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=not add_generation_prompt)
    return render


def contexts(task, fmt: str, tok) -> list[str]:
    """lm-eval's rendered prompts of the first N_DOCS documents (its own request building)."""
    task = copy.deepcopy(task)
    task.set_fewshot_seed(1234)  # simple_evaluate's fewshot_random_seed
    chat = fmt != "plain"
    task.build_all_requests(limit=N_DOCS, apply_chat_template=chat, fewshot_as_multiturn=fmt == "multiturn",
                            chat_template=hf_chat(tok) if chat else None, tokenizer_name="test")
    return [inst.args[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]


@pytest.fixture(scope="module")
def own_tasks(lm_evals):
    with L.kept_global_state():  # building tasks draws from Python's generator; sklearn sets an env var
        return {name: lm_evals.task(name) for name in VARIANTS}


@pytest.fixture(scope="module")
def mapped_tasks():
    with L.kept_global_state():
        return L.task_manager(include_defaults=False).load(list(VARIANTS))["tasks"]


def our_task(name: str, fmt: str, **kw):
    make, _ = VARIANTS[name]
    if name.startswith("humaneval"):
        return make(**kw)
    return make(chat_template=fmt != "plain", fewshot_as_multiturn=fmt == "multiturn", **kw)


CASES = [(name, fmt, template) for name, (_, fmts) in VARIANTS.items() for fmt in fmts
         for template in (TEMPLATES if fmt != "plain" else ("tiny",))]


@pytest.mark.parametrize("name, fmt, template", CASES, ids=["-".join(c) for c in CASES])
def test_our_prompts_equal_lm_evals(own_tasks, tokenizers, name, fmt, template):
    tok = tokenizers[template]
    theirs = contexts(own_tasks[name], fmt, tok)
    ours_task = our_task(name, fmt)
    examples = ours_task.examples(N_DOCS)
    assert len(theirs) == len(examples) == N_DOCS
    for ex, ctx in zip(examples, theirs):
        assert ours_task.prompt(ex).render(tok) == ctx, (name, fmt, template, ex.id)
    # token ids: lm-eval's BOS rule as a task option equals what AsyncLaneLM makes of lm-eval's string
    if template == "tiny":
        lm_rule = our_task(name, fmt, bos="tokenizer")
        for ex, ctx in zip(examples[:5], theirs[:5]):
            assert lm_rule.build_prompt(tok, ex) == encode_like_lmeval(tok, ctx)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_mapping_python_m_eval_lmeval_uses_renders_lm_evals_prompts(own_tasks, mapped_tasks, tokenizers, name):
    tok = tokenizers["llama3_style"]
    for fmt in VARIANTS[name][1]:
        assert contexts(mapped_tasks[name], fmt, tok) == contexts(own_tasks[name], fmt, tok), (name, fmt)
    mine, theirs = mapped_tasks[name].config, own_tasks[name].config
    assert mine.generation_kwargs == theirs.generation_kwargs
    assert mine.target_delimiter == theirs.target_delimiter and mine.fewshot_delimiter == theirs.fewshot_delimiter
    assert [m["metric"] if isinstance(m["metric"], str) else m["metric"].__name__ for m in mine.metric_list] == \
        [m["metric"] if isinstance(m["metric"], str) else m["metric"].__name__ for m in theirs.metric_list]
    docs = list(mapped_tasks[name].eval_docs)
    assert len(docs) == {"gsm8k": 1319, "minerva": 500, "humaneval": 164, "mbpp": 500}[name.split("_")[0]]


def test_the_shots_and_gold_answers_are_lm_evals(own_tasks, lm_evals):
    """Minerva's 4 shots (release 0.4.13: metadata 3.1) and MBPP's 3, and Minerva's gold answers."""
    with lm_evals.own_utils():
        import lm_eval.tasks.minerva_math.utils as minerva
    from eval.tasks.math500 import MINERVA_SHOTS

    assert [(d["problem"], d["solution"]) for d in minerva.list_fewshot_samples()] == list(MINERVA_SHOTS)
    assert L.minerva_fewshot_samples() == minerva.list_fewshot_samples()
    assert own_tasks["minerva_math500"].config.metadata["version"] == 3.1
    assert L.mbpp_fewshot_samples() == own_tasks["mbpp"].config.fewshot_config.samples()
    theirs = list(own_tasks["minerva_math500"].eval_docs)
    with L.kept_global_state():
        ours = list(L.task_manager(include_defaults=False).load(["minerva_math500"])["tasks"]["minerva_math500"]
                    .eval_docs)
    assert [d["answer"] for d in ours] == [d["answer"] for d in theirs]


def test_the_model_renders_chat_as_lm_evals_hf_model(tokenizers):
    lm = L.AsyncLaneLM(model="tiny")
    msgs = [{"role": "user", "content": "start 3\n"}, {"role": "assistant", "content": "A 3\n"}]
    ref = hf_chat(tokenizers["tiny"])
    assert lm.apply_chat_template(msgs[:1]) == ref(msgs[:1])
    assert lm.apply_chat_template(msgs, add_generation_prompt=False) == ref(msgs, add_generation_prompt=False)
