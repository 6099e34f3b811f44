"""lm-evaluation-harness 0.4.13 with our samplers and our data: a model class and the task mapping.

``import eval.lmeval`` registers :class:`AsyncLaneLM` under lm-eval's model name ``asynclane``;
``python -m eval.lmeval ARGS`` runs lm-eval's own command line (``lm-eval run ARGS``) with it and
with the task mapping below::

    python -m eval.lmeval --model asynclane \\
        --model_args model=tiny,sampler=fast_dllm,gen_length=256 --tasks gsm8k --limit 5

The model (``--model_args`` keys, all optional)
    ``model`` (a preset of ``conf/model``: tiny, tiny_long, llada, dream; another name needs ``path``),
    ``path`` (checkpoint directory or hub id; default: the preset's), ``dtype`` (fp32 / bf16 /
    fp16; default: the preset's), ``sampler`` (a registered sampler or a ``conf/sampler`` preset;
    default blockwise), ``gen_length`` (the canvas; default: each request's ``max_gen_toks``,
    else 256 as lm-eval's HF model), ``seed`` (0), ``batch_size`` (1), ``threads`` (as the
    runner's), ``add_bos_token`` (unset: lm-eval's HF rule, see below), ``warmup`` (1),
    ``compile`` (false), ``out_dir`` (where the per-request log and the summary go); every
    other key is a sampler option (``threshold=0.9``), checked against the sampler's Config.
    ``--device`` is the device (``python -m eval.lmeval`` passes ``auto`` when it is not given:
    lm-eval's own default is ``cuda:0``); ``--batch_size`` the batch size.

What runs for each ``generate_until`` request
    the context (the prompt lm-eval rendered: chat template and few-shot applied by lm-eval) is
    tokenized as lm-eval's HF model does (the tokenizer's default special tokens, none when the
    text already starts with the BOS string; ``add_bos_token`` forces them on / off), left-cut
    to ``max_length - gen_length`` tokens with a warning when too long (as lm-eval's HF model);
    the sampler decodes a ``gen_length`` canvas through a counting backbone (NFE, token
    forwards) under a synchronised timer, exactly as the runner (``eval.runner``): requests
    in lm-eval's order, fixed chunks of ``batch_size`` (consecutive requests of one canvas
    length), one generator per chunk seeded by (``seed``, example id of its first request:
    the runner's ids, e.g. ``gsm8k-0003``), the answer cut at its first EOS-like token and
    decoded without special tokens; then the task's stop strings (``until``) and the EOS
    string are applied after generation as lm-eval's HF model applies them
    (``handle_stop_sequences`` and ``postprocess_generated_text``, lm-eval's own functions).
    A diffusion sampler does not stop early: the stop strings only cut the text.  The
    decoding settings are the sampler's: a request's ``do_sample`` / ``temperature`` /
    ``top_p`` do not change them (a warning says so once when a task asks for sampling).

Each request's NFE, token forwards, generated tokens (to the first EOS, inclusive), prompt
tokens and generate seconds go into :attr:`AsyncLaneLM.records` (and ``out_dir``'s
``asynclane_requests.jsonl``); :meth:`AsyncLaneLM.summary` aggregates them as the runner's
summary does (TPS over non-warm-up requests, each batch's seconds once; NFE; tokens per NFE)
and, given lm-eval's results, adds its metrics; ``python -m eval.lmeval`` logs it and writes
``asynclane_summary.json`` into ``out_dir`` (default: ``--output_path``).

Loglikelihood: not supported.  A diffusion sampler generates; it does not score a fixed
continuation (LLaDA's Monte-Carlo estimate of a likelihood bound is not implemented here), so
``loglikelihood`` and ``loglikelihood_rolling`` raise ``NotImplementedError`` naming the
generate_until tasks to use instead.

What lm-eval gets wrong for this use, and what this module does about it
    * ``batch_size`` is ignored for a model object (``simple_evaluate(model=obj,
      batch_size=...)``): the object owns it (``AsyncLaneLM(batch_size=4)``) and reports it in
      ``get_model_info`` (lm-eval's ``results["config"]``).
    * ``fewshot_as_multiturn``: the runner's default is chat + multi-turn shots; lm-eval's
      depends on the entry point and release (True in ``simple_evaluate`` since 0.4.10, False
      in ``evaluate`` and before).  :func:`simple_evaluate` here and ``python -m eval.lmeval``
      (with ``--apply_chat_template``) pass it explicitly (True unless given).
    * lm-eval reseeds Python, numpy and torch at every ``simple_evaluate`` call: generations
      use only generators seeded from (``seed``, example id), and every ``generate_until`` call
      seeds the global generators with ``seed`` inside a forked RNG state (as the runner does
      once per run), so lm-eval's seeds change nothing; :func:`simple_evaluate` and
      :func:`main` give the caller its global generators (and environment) back afterwards
      (:func:`kept_global_state`).  Repeats of one document (``repeats: n``) get their own
      generators (``<id>#1``, ``<id>#2``, ...).
    * its response cache (``use_cache``) keys on (context, gen_kwargs) only, so a sampler sweep
      would be served stale generations: ``python -m eval.lmeval`` appends the model's config
      fingerprint (model, weights, dtype, device, sampler and every option, canvas, seed,
      batch size, BOS rule) to the cache path, and the model stamps a cache database with its
      fingerprint and refuses one stamped with another (or holding unstamped responses).
    * the built-in tasks cannot run offline here: every one points at a Hub dataset, and
      ``minerva_math`` asserts antlr 4.11 at import (Hydra pins 4.9) while ``humaneval`` /
      ``mbpp`` download the ``code_eval`` metric at import.  :func:`task_manager` maps the
      lm-eval task names of our benchmarks (:data:`TASKS`) to lm-eval's own YAML configs
      (read from the installed package, prompts, stop strings, filters and metric names
      unchanged) pointed at our shipped, sha256-checked data files (``dataset_path: json``),
      with lm-eval's functions that cannot load here replaced by ours (:data:`REPLACEMENTS`:
      the same computations; tests/eval/test_lmeval_prompts.py and test_lmeval_filters.py
      check them against lm-eval's): Minerva's prompt, shots, gold answers and metrics
      (``exact_match`` parses with math-verify's antlr-4.9 LaTeX parser where lm-eval uses
      sympy's), and code execution in :mod:`eval.sandbox` (lm-eval's ``code_eval`` defaults:
      3 s per program, ``candidate + "\\n" + test``).  MBPP's ``full`` test split is task_ids
      11-510 of the shipped file.  ``python -m eval.lmeval`` uses this mapping for every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("eval.lmeval needs lm-eval 0.4.13: pip install -e '.[lm-eval]' (without lm-eval's [math] "
                      "extra, whose antlr 4.11 cannot be installed next to Hydra's 4.9)") from _e

from .tasks import extract as X
from .tasks.datafiles import DATA_DIR, load_records
from .tasks.prompting import encode_like_lmeval

log = logging.getLogger(__name__)

__all__ = ["MODEL_NAME", "LM_EVAL_VERSION", "AsyncLaneLM", "TASKS", "REPLACEMENTS", "task_manager",
           "default_task_manager", "task_config", "simple_evaluate", "kept_global_state", "example_id", "CodeEval",
           "resolve_settings", "prepare_argv", "main"]

MODEL_NAME = "asynclane"
LM_EVAL_VERSION = "0.4.13"  # the release whose task configs and behaviour this module follows
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model's default when a task sends no max_gen_toks
CACHE_STAMP = "asynclane-fingerprint"  # the key stamping an lm-eval response cache database
REQUESTS_FILE, SUMMARY_FILE = "asynclane_requests.jsonl", "asynclane_summary.json"
LOGLIKELIHOOD_MESSAGE = (
    "asynclane: loglikelihood requests are not supported: a diffusion sampler generates text, it does not score "
    "a given continuation (LLaDA's Monte-Carlo likelihood estimate is not implemented); run generate_until tasks "
    "instead, e.g. gsm8k, gsm8k_cot_zeroshot, minerva_math500, humaneval, humaneval_instruct, mbpp")


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


# ------------------------------------------------------------------------------------ settings

_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _as_bool(key: str, value) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _BOOLS:
        return _BOOLS[value.lower()]
    raise ValueError(f"asynclane: {key}={value!r}; valid choices: true, false")


def _as_int(key: str, value, minimum: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        extra = " or unset" if allow_none else ""
        raise ValueError(f"asynclane: {key}={value!r}; valid: an integer >= {minimum}{extra}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything an :class:`AsyncLaneLM` is built from, resolved and checked (no weights read)."""

    model: str
    path: Optional[str]
    dtype: str
    device: str
    sampler: str  # the registry name
    sampler_options: dict  # every option but gen_length, the dataclass's defaults filled in
    gen_length: Optional[int]
    batch_size: int
    seed: int
    threads: Optional[int]
    add_bos_token: Optional[bool]
    warmup: int
    compile: bool
    out_dir: Optional[str]

    def fingerprint(self) -> str:
        """What decides a generation: model and weights, dtype, device, sampler and options,
        canvas, seed, batch size, BOS rule (not threads, warmup or out_dir)."""
        from asynclane.loading import checkpoint_id, model_path

        try:
            ckpt = checkpoint_id(model_path(self.path, self.model))
        except Exception:  # noqa: BLE001 - an unreadable checkpoint fails later, with its own message
            ckpt = str(self.path)
        key = {"model": self.model, "checkpoint_id": ckpt, "dtype": self.dtype, "device": self.device,
               "compile": self.compile, "sampler": self.sampler, "sampler_options": self.sampler_options,
               "gen_length": self.gen_length, "batch_size": self.batch_size, "seed": self.seed,
               "add_bos_token": self.add_bos_token}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_settings(model: str = "tiny", sampler: str = "blockwise", gen_length=None, path=None, dtype=None,
                     device="auto", batch_size=1, max_batch_size=None, seed=0, threads=None, add_bos_token=None,
                     warmup=1, compile=False, out_dir=None, **sampler_options) -> Settings:
    """Check and complete the model arguments (one-line ``ValueError`` naming what is valid)."""
    import baselines  # noqa: F401  (registers every competing sampler)
    from asynclane.loading import resolve_device, resolve_dtype
    from asynclane.sampler import REGISTRY, build_sampler

    from .cli import preset

    models = ("tiny", "tiny_long", "llada", "dream")
    shipped = preset("model", str(model))
    if not shipped and path is None:
        raise ValueError(f"asynclane: unknown model {model!r}; valid choices: {', '.join(models)} "
                         f"(another name needs path=DIR)")
    path = path if path is not None else shipped.get("path")
    dtype = dtype if dtype is not None else shipped.get("dtype", "fp32")
    resolve_dtype(dtype)  # raises naming the valid dtypes
    device = str(resolve_device(device if device not in (None, "") else "auto"))
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        raise ValueError(f"asynclane: batch_size={batch_size!r} is not supported (no automatic batch search for a "
                         f"diffusion sampler); valid: an integer >= 1")
    batch_size = _as_int("batch_size", batch_size, 1)
    _as_int("max_batch_size", max_batch_size, 1, allow_none=True)  # lm-eval passes it; nothing reads it
    seed = _as_int("seed", seed, 0)
    threads = _as_int("threads", threads, 1, allow_none=True)
    warmup = _as_int("warmup", warmup, 0)
    gen_length = _as_int("gen_length", gen_length, 1, allow_none=True)
    add_bos_token = _as_bool("add_bos_token", add_bos_token)
    compile = bool(_as_bool("compile", compile))

    name, options = str(sampler), {}
    if name not in REGISTRY:
        shipped_sampler = preset("sampler", name)
        if not shipped_sampler or shipped_sampler.get("name") not in REGISTRY:
            raise ValueError(f"asynclane: unknown sampler {name!r}; valid choices: {', '.join(sorted(REGISTRY))} "
                             f"(or a preset of conf/sampler)")
        options = {k: v for k, v in shipped_sampler.items() if k not in ("defaults", "name")}
        name = shipped_sampler["name"]
    options.update(sampler_options)
    try:
        probe = build_sampler(name, **options, gen_length=gen_length or DEFAULT_MAX_GEN_TOKS)
    except (ValueError, TypeError) as e:
        raise ValueError(f"asynclane: {e}") from None
    if batch_size > 1 and not getattr(probe, "can_batch", True):
        raise ValueError(f"asynclane: sampler {name!r} decodes one prompt per call (can_batch = False); valid: "
                         f"batch_size=1, got {batch_size}")
    full = {k: v for k, v in dataclasses.asdict(probe.cfg).items() if k != "gen_length"}
    return Settings(model=str(model), path=None if path is None else str(path), dtype=str(dtype), device=device,
                    sampler=name, sampler_options=full, gen_length=gen_length, batch_size=batch_size, seed=seed,
                    threads=threads, add_bos_token=add_bos_token, warmup=warmup, compile=compile,
                    out_dir=None if out_dir in (None, "") else str(out_dir))


# ----------------------------------------------------------------------------------- the model


def example_id(task: Optional[str], doc_id: Optional[int], doc: Optional[dict]) -> str:
    """The runner's example id of an lm-eval request (its generator seed), e.g. ``gsm8k-0003``;
    ``<task>-<doc_id>`` for a task the runner does not have."""
    base = str(task or "task").split("::")[-1]
    doc = doc or {}
    if base.startswith("gsm8k") and doc_id is not None:
        return f"gsm8k-{int(doc_id):04d}"
    if base == "minerva_math500" and doc_id is not None:
        return f"math500-{int(doc_id):03d}"
    if base.startswith("humaneval") and "task_id" in doc:
        return f"humaneval-{int(str(doc['task_id']).split('/')[-1]):03d}"
    if base.startswith("mbpp") and "task_id" in doc:
        return f"mbpp-{int(doc['task_id']):03d}"
    return f"{base}-{doc_id}"


class AsyncLaneLM(LM):
    """Any registered sampler on any of our backbones as an lm-eval model (``generate_until``).

    Arguments: see the module docstring; unknown keys are sampler options.  The backbone loads
    when the object is built (through the runner's cache: one load per process and checkpoint).
    """

    _collecting: Optional[list] = None  # python -m eval.lmeval gathers the models it made, for its summary

    def __init__(self, **kwargs: Any):
        super().__init__()
        import torch

        from asynclane.loading import model_path, resolve_dtype
        from asynclane.sampler import build_sampler

        from .runner import cached_backbone

        self.settings = resolve_settings(**kwargs)
        s = self.settings
        self.fingerprint = s.fingerprint()
        self.backbone = cached_backbone(s.model, model_path(s.path, s.model), resolve_dtype(s.dtype),
                                        torch.device(s.device), compile=s.compile)
        self.tokenizer = self.backbone.tokenizer
        self._build_sampler = lambda L: build_sampler(s.sampler, **s.sampler_options, gen_length=L)
        self._samplers: dict[int, Any] = {}
        self._device = self.backbone.device
        self.records: list[dict] = []
        self._warm_left = s.warmup
        self._warned: set[str] = set()
        # the EOS string lm-eval's HF model adds to every request's stop strings: its tokenizer's EOS
        eos = getattr(self.tokenizer, "eos_token_id", None)
        eos = self.backbone.spec.eos_ids[0] if eos is None else eos
        self.eos_text = self.tokenizer.decode([eos], skip_special_tokens=False)
        if AsyncLaneLM._collecting is not None:
            AsyncLaneLM._collecting.append(self)

    # ---------------------------------------------------------------- lm-eval's construction hooks

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "AsyncLaneLM":
        """``--model_args`` plus lm-eval's ``batch_size`` / ``device`` (model_args win on a clash)."""
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string) if arg_string else {}
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "AsyncLaneLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def get_model_info(self) -> dict:
        """Goes into lm-eval's ``results["config"]`` (which otherwise shows lm-eval's batch size)."""
        s = self.settings
        return {"asynclane_model": s.model, "asynclane_path": s.path, "asynclane_sampler": s.sampler,
                "asynclane_sampler_options": s.sampler_options, "asynclane_gen_length": s.gen_length,
                "asynclane_batch_size": s.batch_size, "asynclane_seed": s.seed, "asynclane_dtype": s.dtype,
                "asynclane_device": s.device, "asynclane_add_bos_token": s.add_bos_token,
                "asynclane_fingerprint": self.fingerprint}

    # ---------------------------------------------------------------- chat template (lm-eval's HF rules)

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}-{self.settings.model}-{self.fingerprint}"

    def chat_template(self, chat_template=False) -> str:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        """The messages through the tokenizer's template; ``add_generation_prompt=False`` continues
        the final (assistant) message; a template that rejects a system message is retried
        without it (as lm-eval's HF model does)."""
        import jinja2

        def render(msgs):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            self._warn_once("system", "the chat template rejected the messages; retrying without the system message")
            return render([m for m in chat_history if m.get("role") != "system"])

    # ---------------------------------------------------------------- requests

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(LOGLIKELIHOOD_MESSAGE)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(LOGLIKELIHOOD_MESSAGE)

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def set_cache_hook(self, cache_hook) -> None:
        """Accept lm-eval's response cache only if it holds this config's generations (see module doc)."""
        db = getattr(cache_hook, "dbdict", None)
        if db is not None:
            where = getattr(db, "filename", "the response cache")
            stamp = db.get(CACHE_STAMP)
            if stamp is None and len(db):
                raise ValueError(f"asynclane: {where} holds responses of unknown origin (no config stamp); use a new "
                                 f"--use_cache path (python -m eval.lmeval adds this config's fingerprint to it)")
            if stamp is not None and stamp != self.fingerprint:
                raise ValueError(f"asynclane: {where} holds generations of another sampler config (fingerprint "
                                 f"{stamp}, this one {self.fingerprint}); use one --use_cache path per config "
                                 f"(python -m eval.lmeval adds the fingerprint to it)")
            if stamp is None:
                db[CACHE_STAMP] = self.fingerprint
                db.commit()
        super().set_cache_hook(cache_hook)

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _sampler(self, gen_length: int):
        if gen_length not in self._samplers:
            try:
                self._samplers[gen_length] = self._build_sampler(gen_length)
            except (ValueError, TypeError) as e:
                raise ValueError(f"asynclane: gen_length={gen_length} (from the task's max_gen_toks; set gen_length= "
                                 f"in --model_args to choose it): {e}") from None
        return self._samplers[gen_length]

    def _prepare(self, requests) -> list[dict]:
        """Per request: the canvas, stop strings, token ids (lm-eval's HF rules) and seed key."""
        max_len = self.backbone.spec.max_length
        seen: Counter = Counter()
        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=self.eos_text)
            if kw.get("do_sample"):
                self._warn_once("sample", "a task asks for sampling (%s); asynclane decodes with the sampler's own "
                                "settings (temperature=%s)", {k: v for k, v in kw.items() if k != "max_gen_toks"},
                                self.settings.sampler_options.get("temperature"))
            L = self.settings.gen_length or int(kw["max_gen_toks"])
            ids = encode_like_lmeval(self.tokenizer, context, self.settings.add_bos_token)
            room = max_len - L
            if room <= 0:
                raise ValueError(f"asynclane: gen_length={L} leaves no room for a prompt in the model's max_length "
                                 f"{max_len}; valid: gen_length < {max_len}")
            cut_from = None
            if len(ids) > room:  # lm-eval's HF model left-truncates the context to max_length - max_gen_toks
                cut_from, ids = len(ids), ids[-room:]
                self._warn_once("truncate", "prompts longer than max_length - gen_length = %d tokens are cut from "
                                "the left, as lm-eval's HF model does (first: %d tokens)", room, cut_from)
            eid = example_id(req.task_name, req.doc_id, req.doc)
            r = seen[eid]
            seen[eid] += 1
            items.append({"index": i, "context": context, "gen_kwargs": gen_kwargs, "until": until, "L": L,
                          "ids": ids, "truncated_from": cut_from, "example_id": eid,
                          "seed_key": eid if r == 0 else f"{eid}#{r}", "task": req.task_name, "doc_id": req.doc_id})
        return items

    def _batches(self, items: list[dict]) -> list[list[dict]]:
        """Fixed chunks of ``batch_size`` consecutive requests of one canvas length (lm-eval's order)."""
        out, cur = [], []
        for it in items:
            if cur and (len(cur) == self.settings.batch_size or cur[0]["L"] != it["L"]):
                out.append(cur)
                cur = []
            cur.append(it)
        if cur:
            out.append(cur)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import torch
        from tqdm import tqdm

        from asynclane import CountingBackbone
        from asynclane.sampler import first_eos_cut

        from .runner import _derive_seed, choose_threads

        if not requests:
            return []
        s = self.settings
        items = self._prepare(requests)
        results: list[Optional[str]] = [None] * len(items)
        counter = CountingBackbone(self.backbone)
        eos_ids = self.backbone.spec.eos_ids
        device = self.backbone.device
        on_cuda = device.type == "cuda"
        threads = choose_threads(s.threads, self.backbone)
        before = torch.get_num_threads()
        state = random.getstate()
        out_file = None
        if s.out_dir:
            Path(s.out_dir).mkdir(parents=True, exist_ok=True)
            out_file = open(Path(s.out_dir) / REQUESTS_FILE, "a", encoding="utf-8")
        try:
            torch.set_num_threads(threads)
            with torch.random.fork_rng(devices=[device] if on_cuda else []):
                random.seed(s.seed)  # as the runner: global generators seeded once per run, after lm-eval's
                torch.manual_seed(s.seed)
                bar = tqdm(total=len(items), disable=disable_tqdm or None, desc=f"{MODEL_NAME}/{s.sampler}")
                for batch in self._batches(items):
                    L = batch[0]["L"]
                    sampler = self._sampler(L)
                    rng = torch.Generator(device=device).manual_seed(_derive_seed(s.seed, batch[0]["seed_key"]))
                    prompts = [it["ids"] for it in batch]
                    counter.reset()
                    if on_cuda:
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    gen = sampler.generate(counter, prompts, rng)
                    if on_cuda:
                        torch.cuda.synchronize(device)
                    seconds = time.perf_counter() - t0
                    warm = self._warm_left > 0
                    self._warm_left -= len(batch)
                    rows = []
                    for it, cut, fin in zip(batch, first_eos_cut(gen.tokens, eos_ids), gen.finished.tolist()):
                        text_ids = cut[:-1] if cut and cut[-1] in eos_ids else cut
                        completion = self.tokenizer.decode(text_ids, skip_special_tokens=True)
                        response = postprocess_generated_text(completion, it["until"], None)
                        results[it["index"]] = response
                        self.cache_hook.add_partial("generate_until", (it["context"], it["gen_kwargs"]), response)
                        rows.append({"task": it["task"], "doc_id": it["doc_id"], "example_id": it["example_id"],
                                     "seed_key": it["seed_key"], "sampler": s.sampler,
                                     "sampler_options": s.sampler_options, "model": s.model, "gen_length": L,
                                     "seed": s.seed, "batch_size": s.batch_size, "threads": threads,
                                     "fingerprint": self.fingerprint, "completion": completion,
                                     "response": response, "until": it["until"], "gen_tokens": len(cut),
                                     "prompt_tokens": len(it["ids"]), "truncated_from": it["truncated_from"],
                                     "finished": bool(fin), "nfe": counter.nfe,
                                     "token_forwards": counter.token_forwards, "seconds": seconds, "warmup": warm,
                                     "batch": f"{self.fingerprint}:{batch[0]['seed_key']}"})
                    self.records.extend(rows)
                    if out_file is not None:
                        out_file.write("".join(json.dumps(r, default=str) + "\n" for r in rows))
                        out_file.flush()
                    bar.update(len(batch))
                bar.close()
        finally:
            random.setstate(state)
            torch.set_num_threads(before)
            if out_file is not None:
                out_file.close()
        summary = self.summary()
        log.info("%s: %d requests, TPS %s, NFE mean %.1f, tokens/NFE %s", MODEL_NAME, summary["n"],
                 _fmt(summary["tps"]), summary["nfe_mean"], _fmt(summary["tokens_per_nfe"]))
        return results

    # ---------------------------------------------------------------- our summary

    def summary(self, results: Optional[dict] = None) -> dict:
        """The runner's timing and work aggregates over :attr:`records` (overall and per task),
        plus lm-eval's metrics from ``results`` (what ``simple_evaluate`` returned) when given."""
        out = {"model": self.settings.model, "sampler": self.settings.sampler,
               "sampler_options": self.settings.sampler_options, "fingerprint": self.fingerprint,
               "batch_size": self.settings.batch_size, "seed": self.settings.seed,
               "lm_eval_version": _lm_eval_version(), **_aggregate(self.records)}
        tasks = sorted({str(r["task"]) for r in self.records})
        if len(tasks) > 1:
            out["by_task"] = {t: _aggregate([r for r in self.records if str(r["task"]) == t]) for t in tasks}
        if results is not None:
            out["lm_eval_results"] = results.get("results", {})
        return out

    def write_summary(self, results: Optional[dict] = None, out_dir=None) -> Optional[Path]:
        """Write :meth:`summary` as ``asynclane_summary.json`` into ``out_dir`` (default: the model's)."""
        d = out_dir or self.settings.out_dir
        if not d:
            return None
        Path(d).mkdir(parents=True, exist_ok=True)
        path = Path(d) / SUMMARY_FILE
        path.write_text(json.dumps(self.summary(results), indent=1, default=str) + "\n")
        return path


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _aggregate(records: list[dict]) -> dict:
    """The runner's conventions (eval.rows.CONVENTIONS) over request records."""
    from .rows import CONVENTIONS

    if not records:
        return {"n": 0, "n_timed": 0, "tps": None, "tps_budget": None, "nfe_mean": None, "tokens_per_nfe": None}
    timed = [r for r in records if not r["warmup"]]
    batches = {}
    for r in timed:
        batches.setdefault(r["batch"], r["seconds"])
    secs = sum(batches.values())
    nfe = sum(r["nfe"] for r in records)
    n = len(records)
    return {"n": n, "n_timed": len(timed),
            "tps": sum(r["gen_tokens"] for r in timed) / secs if secs else None,
            "tps_budget": sum(r["gen_length"] for r in timed) / secs if secs else None,
            "nfe_mean": nfe / n, "token_forwards_mean": sum(r["token_forwards"] for r in records) / n,
            "tokens_per_nfe": sum(r["gen_tokens"] for r in records) / nfe if nfe else None,
            "seconds_mean": sum(r["seconds"] for r in timed) / len(timed) if timed else None,
            "gen_tokens_mean": sum(r["gen_tokens"] for r in records) / n,
            "prompt_tokens_mean": sum(r["prompt_tokens"] for r in records) / n,
            "finished_rate": sum(bool(r["finished"]) for r in records) / n,
            "truncated": sum(r["truncated_from"] is not None for r in records),
            "threads": sorted({r["threads"] for r in records}),
            "conventions": {k: CONVENTIONS[k] for k in ("gen_tokens", "tps_budget", "nfe", "tokens_per_nfe")}
            | {"tps": "sum gen_tokens / sum generate seconds over non-warm-up requests (each batch once)"}}


# ------------------------------------------------------------------------- code execution


class CodeEval:
    """lm-eval's ``code_eval`` contract (``compute(references, predictions, k)`` -> (pass@k per
    k, per-problem results)) executed in :mod:`eval.sandbox`: each candidate runs as
    ``candidate + "\\n" + reference``; pass@k is the unbiased estimator of Chen et al. (2021)."""

    def __init__(self, timeout: float = 3.0, memory_mb: int = 2048):
        from . import sandbox

        self.config = sandbox.SandboxConfig(timeout=float(timeout), memory_mb=int(memory_mb))

    def compute(self, references, predictions, k=(1, 10, 100)):
        from . import sandbox

        ks = [k] if isinstance(k, int) else list(k)
        details, totals = {}, []
        for i, (ref, cands) in enumerate(zip(references, predictions)):
            outcomes = []
            for j, cand in enumerate(cands):
                res = sandbox.run_program(f"{cand}\n{ref}", self.config)
                outcomes.append((j, {"task_id": i, "completion_id": j, "passed": res.passed, "result": res.status}))
            details[i] = outcomes
            totals.append((len(cands), sum(o[1]["passed"] for o in outcomes)))
        pass_at = {f"pass@{kk}": sum(_pass_at_k(n, c, kk) for n, c in totals) / len(totals)
                   for kk in ks if all(n >= kk for n, _ in totals)}
        return pass_at, details


def _pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


_CODE_EVAL: Optional[CodeEval] = None


def _code_eval() -> CodeEval:
    global _CODE_EVAL
    if _CODE_EVAL is None:
        _CODE_EVAL = CodeEval()
    return _CODE_EVAL


# --------------------------------------------------- replacements of lm-eval's task utilities
# (named as lm-eval's: a metric's function name is its name in lm-eval's results)


def minerva_doc_to_text(doc: dict) -> str:
    from .tasks.math500 import MINERVA_TEMPLATE

    return MINERVA_TEMPLATE.format(problem=doc["problem"])


def minerva_process_docs(dataset):
    def gold(doc: dict) -> dict:
        return {"problem": doc["problem"], "solution": doc["solution"], "answer": X.minerva_gold(doc["solution"])}

    return dataset.map(gold)


def minerva_fewshot_samples() -> list[dict]:
    from .tasks.math500 import MINERVA_SHOTS

    return [{"problem": p, "solution": s, "few_shot": "1"} for p, s in MINERVA_SHOTS]


def minerva_process_results(doc: dict, results: list) -> dict:
    text = results[0]
    return {"exact_match": int(X.minerva_is_equiv(X.minerva_normalize(X.minerva_final_answer(text)), doc["answer"])),
            "math_verify": int(X.math_verify_whole(text, doc["solution"]))}


def pass_at_k(references, predictions, k=None):
    """lm-eval ``humaneval``'s metric: ``{"pass@k": ...}`` through :class:`CodeEval`."""
    if k is None:
        raise ValueError("pass_at_k needs k")
    return _code_eval().compute(references=references, predictions=predictions, k=[k] if isinstance(k, int) else k)[0]


def pass_at_1(references, predictions) -> float:
    """lm-eval ``mbpp``'s metric: pass@1 through :class:`CodeEval`."""
    if isinstance(references, str):
        references = [references]
    if isinstance(predictions[0], str):
        predictions = [[p] for p in predictions]
    return _code_eval().compute(references=references, predictions=predictions, k=[1])[0]["pass@1"]


def humaneval_build_predictions(resps, docs):
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def humaneval_build_predictions_instruct(resps, docs):
    return [[doc["prompt"] + X.fence_cut(r) for r in resp] for resp, doc in zip(resps, docs)]


def mbpp_fewshot_samples() -> list[dict]:
    from .tasks.mbpp import FULL_FIELDS, SHOT_IDS

    full = {r["task_id"]: r for r in load_records("mbpp/mbpp.jsonl", FULL_FIELDS)}
    return [{"task_id": i, "text": full[i]["text"], "code": full[i]["code"], "test_list": list(full[i]["test_list"]),
             "is_fewshot": True} for i in SHOT_IDS]


def mbpp_test_split(dataset):
    """The ``full`` configuration's test split: task_ids 11-510."""
    from .tasks.mbpp import TEST_IDS

    return dataset.filter(lambda doc: doc["task_id"] in TEST_IDS)


# (lm-eval task folder, function name) -> ours
REPLACEMENTS = {
    ("minerva_math", "doc_to_text"): minerva_doc_to_text,
    ("minerva_math", "process_docs"): minerva_process_docs,
    ("minerva_math", "process_results"): minerva_process_results,
    ("minerva_math", "list_fewshot_samples"): minerva_fewshot_samples,
    ("humaneval", "pass_at_k"): pass_at_k,
    ("humaneval", "build_predictions"): humaneval_build_predictions,
    ("humaneval", "build_predictions_instruct"): humaneval_build_predictions_instruct,
    ("mbpp", "pass_at_1"): pass_at_1,
    ("mbpp", "list_fewshot_samples"): mbpp_fewshot_samples,
}

_GSM8K = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
# lm-eval task name -> (its YAML under lm_eval/tasks, our data files per split, extra config)
TASKS: dict[str, tuple[str, dict, dict]] = {
    "gsm8k": ("gsm8k/gsm8k.yaml", _GSM8K, {}),
    "gsm8k_cot": ("gsm8k/gsm8k-cot.yaml", _GSM8K, {}),
    "gsm8k_cot_zeroshot": ("gsm8k/gsm8k-cot-zeroshot.yaml", _GSM8K, {}),
    "gsm8k_cot_llama": ("gsm8k/gsm8k-cot-llama.yaml", _GSM8K, {}),
    "gsm8k_cot_self_consistency": ("gsm8k/gsm8k-cot-self-consistency.yaml", _GSM8K, {}),
    "minerva_math500": ("minerva_math/minerva_math500.yaml", {"test": "math500/test.jsonl"}, {}),
    "humaneval": ("humaneval/humaneval.yaml", {"test": "humaneval/HumanEval.jsonl.gz"}, {}),
    "humaneval_instruct": ("humaneval/humaneval_instruct.yaml", {"test": "humaneval/HumanEval.jsonl.gz"}, {}),
    "humaneval_64": ("humaneval/humaneval_64.yaml", {"test": "humaneval/HumanEval.jsonl.gz"}, {}),
    "humaneval_64_instruct": ("humaneval/humaneval_64_instruct.yaml", {"test": "humaneval/HumanEval.jsonl.gz"}, {}),
    "mbpp": ("mbpp/mbpp.yaml", {"test": "mbpp/mbpp.jsonl"}, {"process_docs": mbpp_test_split}),
}


def _tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _replace_functions(node, tasks_dir: Path, yaml_name: str):
    """Swap lm-eval's unresolved ``!function`` references (path strings) for our replacements."""
    if isinstance(node, dict):
        return {k: _replace_functions(v, tasks_dir, yaml_name) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_functions(v, tasks_dir, yaml_name) for v in node]
    if isinstance(node, str) and node.startswith(str(tasks_dir) + "/") and "/utils." in node:
        rel = node[len(str(tasks_dir)) + 1:]
        folder, fn = rel.split("/utils.")[0], rel.split("/utils.")[-1]
        if (folder, fn) not in REPLACEMENTS:
            raise RuntimeError(f"{yaml_name}: lm-eval function {folder}/utils.{fn} has no replacement in eval.lmeval; "
                               f"this module follows lm-eval {LM_EVAL_VERSION} (installed: {_lm_eval_version()})")
        return REPLACEMENTS[(folder, fn)]
    return node


def task_config(name: str) -> dict:
    """lm-eval's own config of task ``name`` (:data:`TASKS`) pointed at our shipped data files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if name not in TASKS:
        raise ValueError(f"asynclane: no shipped data for lm-eval task {name!r}; valid choices: {', '.join(TASKS)}")
    rel_yaml, files, extra = TASKS[name]
    for rel in files.values():
        load_records(rel)  # sha256 and record count checked (DataFileError names the file)
    tasks_dir = _tasks_dir()
    raw = load_yaml(tasks_dir / rel_yaml, resolve_func=False, recursive=True)
    cfg = _replace_functions(dict(raw), tasks_dir, rel_yaml)
    cfg.pop("include", None)
    cfg.pop("tag", None)
    cfg.update(task=name, dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {split: str(DATA_DIR / rel) for split, rel in files.items()}}, **extra)
    meta = dict(cfg.get("metadata") or {})
    meta["data"] = "asynclane shipped files (src/eval/data, PROVENANCE.md): " + ", ".join(sorted(set(files.values())))
    cfg["metadata"] = meta
    return cfg


def task_manager(include_path=None, metadata: Optional[dict] = None, include_defaults: bool = True, **kwargs):
    """An lm-eval ``TaskManager`` in which the task names of :data:`TASKS` read our shipped data
    (their built-in entries replaced; a task of the same name under ``include_path`` still wins)."""
    return ShippedDataTaskManager(include_path=include_path, metadata=metadata, include_defaults=include_defaults,
                                  **kwargs)


def _shipped_manager_class():
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Entry, Kind

    class _ShippedDataTaskManager(TaskManager):
        """lm-eval's TaskManager; our benchmarks' task names read the shipped data files."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            index = self.task_index
            builtin = str(_tasks_dir())
            for name in TASKS:
                old = index.get(name)
                if old is not None and old.yaml_path is not None and not str(old.yaml_path).startswith(builtin):
                    continue  # the user's own task of that name (include_path)
                index[name] = Entry(name=name, kind=Kind.TASK, yaml_path=None, cfg=task_config(name),
                                    tags=set(old.tags) if old is not None else set())
            self._all_tasks = sorted(index.keys())
            self._all_subtasks = sorted(set(self._all_subtasks) | set(TASKS))

    _ShippedDataTaskManager.__name__ = _ShippedDataTaskManager.__qualname__ = "ShippedDataTaskManager"
    return _ShippedDataTaskManager


ShippedDataTaskManager = _shipped_manager_class()
_DEFAULT_MANAGER = None


def default_task_manager():
    """One :func:`task_manager` per process (lm-eval indexes its thousands of task files in ~10 s)."""
    global _DEFAULT_MANAGER
    if _DEFAULT_MANAGER is None:
        _DEFAULT_MANAGER = task_manager()
    return _DEFAULT_MANAGER


@contextmanager
def kept_global_state():
    """lm-eval reseeds Python's, numpy's and torch's global generators on every evaluation, and
    it (its command line, the libraries it imports) sets environment variables: put the caller's
    generators and environment back afterwards."""
    import os

    import numpy as np
    import torch

    py, npy, env = random.getstate(), np.random.get_state(), dict(os.environ)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        for k in set(os.environ) - set(env):
            del os.environ[k]
        os.environ.update(env)


def simple_evaluate(model, tasks, *, task_manager=None, apply_chat_template: bool = True,
                    fewshot_as_multiturn: Optional[bool] = None, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` with our defaults: the runner's chat template and multi-turn
    shots (set explicitly, never lm-eval's entry-point-dependent default), our task mapping
    (:func:`default_task_manager` unless ``task_manager`` is given), the caller's global
    generators kept (:func:`kept_global_state`), and our summary under ``results["asynclane"]``
    when ``model`` is an :class:`AsyncLaneLM`."""
    import lm_eval

    if fewshot_as_multiturn is None:
        fewshot_as_multiturn = bool(apply_chat_template)
    with kept_global_state():
        results = lm_eval.simple_evaluate(model=model, tasks=tasks,
                                          task_manager=task_manager if task_manager is not None
                                          else default_task_manager(),
                                          apply_chat_template=apply_chat_template,
                                          fewshot_as_multiturn=fewshot_as_multiturn, **kwargs)
    if results is not None and isinstance(model, AsyncLaneLM):
        results["asynclane"] = model.summary(results)
        model.write_summary(results)
    return results


# ------------------------------------------------------------------------------ command line


def _option(argv: list[str], name: str) -> Optional[str]:
    """The value of ``--name V`` / ``--name=V`` in ``argv`` (None when absent)."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _set_option(argv: list[str], name: str, value: str) -> list[str]:
    out = list(argv)
    for i, a in enumerate(out):
        if a == name and i + 1 < len(out):
            out[i + 1] = value
            return out
        if a.startswith(name + "="):
            out[i] = f"{name}={value}"
            return out
    return out + [name, value]


def prepare_argv(argv: list[str]) -> list[str]:
    """lm-eval command-line arguments made right for our model (module docstring): ``--device
    auto`` unless given, ``--fewshot_as_multiturn true`` with ``--apply_chat_template`` unless
    given, ``out_dir`` from ``--output_path``, the config fingerprint in ``--use_cache``; the
    model arguments are checked first (``ValueError``)."""
    from lm_eval.utils import simple_parse_args_string

    argv = list(argv)
    if _option(argv, "--model") != MODEL_NAME:
        return argv
    if _option(argv, "--device") is None:
        argv += ["--device", "auto"]
    if "--apply_chat_template" in argv or _option(argv, "--apply_chat_template") is not None:
        if _option(argv, "--fewshot_as_multiturn") is None and "--fewshot_as_multiturn" not in argv:
            argv += ["--fewshot_as_multiturn", "true"]
    model_args = _option(argv, "--model_args") or ""
    args = simple_parse_args_string(model_args) if model_args else {}
    output_path = _option(argv, "--output_path")
    if output_path and "out_dir" not in args:
        out = Path(output_path)
        out_dir = out.parent if out.suffix == ".json" else out
        model_args = ",".join(p for p in (model_args, f"out_dir={out_dir}") if p)
        argv = _set_option(argv, "--model_args", model_args)
        args["out_dir"] = str(out_dir)
    # check the model arguments before lm-eval starts (a bad one is one error line, no lm-eval log)
    extra = {"device": _option(argv, "--device"), "batch_size": _option(argv, "--batch_size")}
    settings = resolve_settings(**{**{k: v for k, v in extra.items() if v is not None}, **args})
    cache = _option(argv, "--use_cache")
    if cache:
        argv = _set_option(argv, "--use_cache", f"{cache}-{MODEL_NAME}-{settings.fingerprint()}")
    return argv


@contextmanager
def _shipped_tasks():
    """While lm-eval's command line runs: its TaskManager is ours (our data for :data:`TASKS`)."""
    import lm_eval.tasks

    original = lm_eval.tasks.TaskManager
    lm_eval.tasks.TaskManager = ShippedDataTaskManager
    try:
        yield
    finally:
        lm_eval.tasks.TaskManager = original


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m eval.lmeval ARGS``: lm-eval's command line (``lm-eval [run] ARGS``) with the
    ``asynclane`` model and our task mapping; our summary is logged (and written to ``out_dir``)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = prepare_argv(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    saved = sys.argv
    made: list = []
    AsyncLaneLM._collecting = made
    sys.argv = ["lm-eval", *argv]
    try:
        setup_logging()
        with _shipped_tasks(), kept_global_state():
            parser = HarnessCLI()
            args = parser.parse_args()
            parser.execute(args)
    except ValueError as e:
        if str(e).startswith(f"{MODEL_NAME}:"):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        sys.argv = saved
        AsyncLaneLM._collecting = None
    for lm in made:
        summary = lm.summary()
        path = lm.write_summary()
        print(f"{MODEL_NAME} summary ({lm.settings.sampler}, {summary['n']} requests): TPS {_fmt(summary['tps'])}, "
              f"NFE mean {_fmt(summary['nfe_mean'])}, tokens/NFE {_fmt(summary['tokens_per_nfe'])}"
              + (f"; written to {path}" if path else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    # run through the package module, so the model class is registered once (as eval.lmeval)
    import importlib

    sys.exit(importlib.import_module("eval.lmeval").main())
else:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry fills itself only when empty)

    if MODEL_NAME not in model_registry.keys():
        register_model(MODEL_NAME)(AsyncLaneLM)
