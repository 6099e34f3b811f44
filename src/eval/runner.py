"""The evaluation loop: one composed config in, ``samples.jsonl`` + ``summary.json`` out.

Knows neither which sampler nor which task runs: it builds both from the config, loads the
backbone, and for each batch of examples

1. builds prompts (the task: chat template), outside the timed region;
2. resets the :class:`~asynclane.counting.CountingBackbone`, synchronises the device, times
   ``sampler.generate`` alone, synchronises again;
3. cuts each row at its first EOS-like token (:func:`asynclane.sampler.first_eos_cut`, the one
   definition of generated tokens, EOS included in the count, excluded from the text), decodes,
   scores through the task, and appends one JSON row per example to ``samples.jsonl``.

Per-row work numbers: ``nfe``, ``token_forwards`` and ``seconds`` are those of the generate call
that produced the row.  With ``batch_size`` > 1 every row of a batch carries its batch's values
(and the same ``batch`` key), so per-row means read as "per generate call"; the summary counts
each batch's seconds once.  The first ``warmup`` examples a process generates are scored but
excluded from timing (``warmup: true`` rows); a resumed run warms up again.  Each row records
the torch CPU ``threads`` of the process that made it (``threads=null``: :func:`choose_threads`).

Resume: rows carry a ``fingerprint`` of everything that decides their content (model, dtype,
device, sampler options, task and version, seed, batch size).  A rerun in the same directory
skips the example ids already present with the same fingerprint; rows of other fingerprints are
kept in the file but ignored.  Each batch's rows go out in one write, so a kill leaves whole rows
and at most one torn last line, which the next run cuts off (that example reruns).  Batches are
fixed chunks of the example list, so a batch cut short is regenerated whole (the same prompts and
generator) and only its missing rows are written.  At temperature 0 on a CPU a killed-and-resumed
run's rows, and so its summary, equal an uninterrupted run's, timing aside, at any batch size.
``summary.json`` is computed from the rows alone (:func:`eval.rows.summarize`, pandas).

Data parallel (``torchrun --nproc_per_node N -m eval``, :mod:`eval.distributed`): every rank builds
the same batches; rank 0 alone reads the directory: it folds rank files a previous run left into
``samples.jsonl``, finds the batches still missing and deals them out in turn (batch i to rank
i mod N).  Each rank, with its own model copy, appends its rows (``rank``, ``world_size`` on each)
to ``samples.rank<k>.jsonl``; once all have finished, rank 0 merges those into ``samples.jsonl``
(:func:`eval.rows.merge_rank_files`) and writes ``summary.json`` from the merged rows, as one
process would, plus ``data_parallel`` (the job's wall-clock throughput).  A batch's generator
depends on (seed, its first example id), not on the process that runs it, so the rows equal a
single process's, timing aside; a dead rank's rows, and everyone else's, stay in the rank files.

Length guard (before the weights load, from config.json, training.json and the tokenizer): a
run whose longest prompt + ``gen_length`` exceeds the model's ``max_length`` is a usage error; one
past the context the model was trained for (``model.trained_context``, else the checkpoint's
``trained_context`` record) but within ``max_length`` runs with a warning in the log and in
``summary.json``'s ``warnings``.

Backbones are cached by (path, dtype, device) for the process: a Hydra multirun loads each
checkpoint once (under ``hydra/launcher=joblib`` once per worker process, under submitit once
per job: :mod:`eval.launch`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import subprocess
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

import baselines  # noqa: F401  (importing registers every competing sampler)
from asynclane import CheckpointError, CheckpointNotFound, CountingBackbone, build_sampler, load_backbone
from asynclane.loading import checkpoint_id, context_limits, load_tokenizer, model_path, resolve_device, resolve_dtype
from asynclane.sampler import first_eos_cut

from . import distributed
from .cli import UsageError, check_keys, check_output_dir, preset
from .rows import (SAMPLES, SUMMARY, TRACES, Appender, merge_rank_files, merge_rank_traces, rank_file, read_rows,
                   summarize, write_rows)
from .tasks import build_task
from .tasks.sources import SOURCE_OPTIONS

log = logging.getLogger(__name__)

__all__ = ["run", "UsageError", "read_rows", "summarize", "SAMPLES", "SUMMARY", "environment"]
_appender = Appender  # the name tests/eval/test_cli.py knows
# config keys that decide a row's content; the others (limit, warmup, threads, hydra) do not
FINGERPRINT_KEYS = ("model", "sampler", "task", "seed", "batch_size", "dtype", "device")
# model keys that never change a row (left out of the fingerprint, so adding them kept old rows resumable)
MODEL_INFO_KEYS = ("trained_context",)
# task keys that only choose which examples run (ids are stable), not what a row holds
SELECTION_KEYS = ("limit", "n")
# threads=null (auto) on a CPU: one thread below this many parameters (the tiny model has 3.5M), whose
# matmuls are too small to gain much from more, and whose extra threads stall whenever other work
# holds a core (tiny, L=128, 2 cores, one other busy process: 24 TPS on 1 thread, 4.8 on 2)
SMALL_MODEL_PARAMS = 100_000_000
TORCH_THREADS = torch.get_num_threads()  # torch's default in this process, before any run sets its own
PROGRESS_SECONDS = 60.0  # a progress line at least this often (besides the first example and each ~10%)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Evaluate ``cfg`` (the composed config of conf/config.yaml), writing into ``out_dir``.

    The run seeds Python's and torch's global generators with ``seed`` and sets torch's thread
    count; both are put back when it returns, so runs in one process (a sweep, a test) do not
    inherit each other's state."""
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            return _run(cfg, out_dir)
    finally:
        random.setstate(state)


def _run(cfg: DictConfig, out_dir: Path) -> dict:
    world = distributed.world()
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    conf = OmegaConf.to_container(cfg, resolve=True)
    check_keys(conf)
    _check_top_level(conf)
    task = _build_task(conf["task"])
    warnings = _preflight(task)
    sampler_name, sampler = _build_sampler(conf["sampler"])
    if int(conf["batch_size"]) > 1 and not getattr(sampler, "can_batch", True):
        raise UsageError(f"sampler {sampler_name!r} decodes one prompt per call (can_batch = False); "
                         f"use batch_size=1, got batch_size={conf['batch_size']}")
    try:
        device = resolve_device(conf["device"])
        dtype = resolve_dtype(conf["dtype"])
    except ValueError as e:
        raise UsageError(str(e)) from e
    conf["device"] = str(device)  # the fingerprint's: the same on every rank ("cuda", not cuda:<rank>)
    device = distributed.rank_device(device, world)
    model = conf["model"]
    with _checkpoint_errors(model):  # the weights' identity is part of the fingerprint: rows from
        model["checkpoint_id"] = checkpoint_id(model_path(model.get("path"), model["name"]))  # other weights never resume
    data_source = task.provenance() if hasattr(task, "provenance") else None  # hf: loads the records
    fingerprint = _fingerprint(conf, data_source)
    seed = int(conf["seed"])
    random.seed(seed)
    torch.manual_seed(seed)

    examples = task.examples(conf["limit"], seed, conf["limit_mode"])
    ids = [ex.id for ex in examples]
    warnings += _length_guard(model, task, examples, int(conf["gen_length"]))
    samples = out_dir / SAMPLES
    # batches are fixed chunks of the example list: a resumed run regenerates a batch cut short by a
    # kill whole (same prompts, same generator), writing only its missing rows; and every rank of a
    # data-parallel run makes the same batches, so its rows equal a single process's
    bs = int(conf["batch_size"])
    batches = [examples[i: i + bs] for i in range(0, len(examples), bs)]
    plan = None
    if world.leader:  # the one reader of the directory; the other ranks wait for its plan
        merge_rank_files(out_dir, fingerprint, ids)  # rows a data-parallel run left in its rank files
        done = {r["example_id"] for r in read_rows(samples) if r.get("fingerprint") == fingerprint}
        todo = [i for i, b in enumerate(batches) if any(ex.id not in done for ex in b)]
        n_todo = sum(ex.id not in done for i in todo for ex in batches[i])
        log.info("%s: %d examples, %d already in %s, %d to run%s", task.name, len(examples),
                 len(examples) - n_todo, samples, n_todo, f" on {world.size} ranks" if world.distributed else "")
        plan = todo, {ex.id for i in todo for ex in batches[i] if ex.id in done}
    todo, done = distributed.broadcast(plan, world)
    mine = [batches[i] for i in todo[world.rank::world.size]]  # strided: balanced when difficulty drifts
    rows_path = out_dir / rank_file(SAMPLES, world.rank) if world.distributed else samples

    generated = {"rank": world.rank, "gen_tokens": 0, "seconds": 0.0}
    if mine:
        with _checkpoint_errors(model):
            backbone = cached_backbone(model["name"], model_path(model.get("path"), model["name"]), dtype, device,
                                       compile=bool(model.get("compile")))
        threads = choose_threads(conf.get("threads"), backbone)
        options = {k: v for k, v in conf["sampler"].items() if k not in ("name", "gen_length")}
        common = {"task": task.name, "task_version": task.version, "task_variant": getattr(task, "variant", ""),
                  "sampler": sampler_name, "sampler_options": options,
                  "model": model["name"], "gen_length": sampler.cfg.gen_length, "seed": seed,
                  "batch_size": bs, "fingerprint": fingerprint, "threads": threads,
                  "rank": world.rank, "world_size": world.size}
        if data_source is not None:
            common["data_source"] = data_source
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        try:
            generated["gen_tokens"] = _generate_all(task, sampler, backbone, mine, done, conf, common, rows_path)
        finally:
            torch.set_num_threads(before)  # a process-wide setting: leave it as found
        generated["seconds"] = time.perf_counter() - t0
    per_rank = distributed.all_gather(generated, world)  # returns once every rank's rows are in its file

    summary = None
    if world.leader:
        merge_rank_files(out_dir, fingerprint, ids)
        merge_rank_traces(out_dir)
        wanted, rows = set(ids), {}
        for r in read_rows(samples):  # first row per example id (a resumed run never writes a second)
            if r.get("fingerprint") == fingerprint and r["example_id"] in wanted:
                rows.setdefault(r["example_id"], r)
        rows = list(rows.values())
        summary = summarize(rows)
        if world.distributed:
            summary["data_parallel"] = _data_parallel(per_rank)
        summary.update(environment(device, dtype))
        summary.update(sampler=sampler_name, task=task.name, task_version=task.version,
                       task_variant=getattr(task, "variant", ""), model=conf["model"]["name"],
                       fingerprint=fingerprint, config=conf)
        if data_source is not None:
            summary["data_source"] = data_source
        if warnings:
            summary["warnings"] = warnings
        (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1, default=str) + "\n")
        log.info("wrote %s and %s", samples, out_dir / SUMMARY)
    return distributed.broadcast(summary, world)


def _data_parallel(per_rank: list[dict]) -> dict:
    """This invocation's ranks: their generated tokens and generation-loop seconds (warm-up included, model
    loading excluded), and ``tps_wall``: all ranks' tokens over the slowest rank's seconds, the throughput
    of the whole job; the summary's ``tps`` is per process (per GPU), from the rows."""
    tokens = sum(r["gen_tokens"] for r in per_rank)
    wall = max(r["seconds"] for r in per_rank)
    return {"world_size": len(per_rank), "ranks": per_rank, "gen_tokens": tokens, "wall_seconds": wall,
            "tps_wall": tokens / wall if wall > 0 else None}


def choose_threads(requested, backbone) -> int:
    """``threads``, or for ``null`` (auto): 1 for a model under :data:`SMALL_MODEL_PARAMS` parameters
    on a CPU, otherwise torch's default (:data:`TORCH_THREADS`)."""
    if requested:
        return int(requested)
    small = sum(p.numel() for p in backbone.model.parameters()) < SMALL_MODEL_PARAMS
    return 1 if backbone.device.type == "cpu" and small else TORCH_THREADS


def progress_due(done: int, prev: int, total: int, since_last: float) -> bool:
    """Whether to log a progress line after ``prev`` -> ``done`` of ``total`` examples: after the
    first batch, at each ~10%, at the end, and when :data:`PROGRESS_SECONDS` passed since the last."""
    every = max(1, total // 10)
    return prev == 0 or done >= total or done // every > prev // every or since_last >= PROGRESS_SECONDS


def _generate_all(task, sampler, backbone, todo, skip, conf, common, samples: Path) -> int:
    """Generate the batches ``todo``, appending the rows of examples not in ``skip`` to ``samples``;
    returns the tokens generated (:func:`~asynclane.sampler.first_eos_cut`'s count, every row written)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    counter = CountingBackbone(backbone)
    tok, eos_ids = backbone.tokenizer, backbone.spec.eos_ids
    warm_left = int(conf["warmup"])
    on_cuda = backbone.device.type == "cuda"
    total = sum(ex.id not in skip for batch in todo for ex in batch)
    done, n_correct, last_line = 0, 0, time.monotonic()
    timed_tokens, timed_secs, written_tokens = 0, 0.0, 0  # for the live TPS (the summary recomputes from rows)
    leader = common["rank"] == 0  # the other ranks of a data-parallel run: no bar, their lines in eval.log
    traces = samples.parent / (rank_file(TRACES, common["rank"]) if common["world_size"] > 1 else TRACES)
    # on a terminal: a bar with live accuracy and TPS, log lines printed above it; otherwise (no bar) the
    # log lines alone, to the console and eval.log: after the first batch, each ~10%, at least once a minute
    with Appender(samples) as out, logging_redirect_tqdm() if leader else nullcontext(), \
            tqdm(total=total, desc=f"{common['sampler']}/{task.name}", unit="ex", disable=None if leader else True,
                 dynamic_ncols=True) as bar:
        log.info("%d examples to run with %d torch thread(s) on %s", total, common["threads"], backbone.device)
        for batch in todo:
            prompts = [task.build_prompt(tok, ex) for ex in batch]
            # one generator per call, seeded by (seed, first example id): resumes reproduce
            rng = torch.Generator(device=backbone.device).manual_seed(_derive_seed(common["seed"], batch[0].id))
            counter.reset()
            if on_cuda:
                torch.cuda.synchronize(backbone.device)
            t0 = time.perf_counter()
            gen = sampler.generate(counter, prompts, rng)
            if on_cuda:
                torch.cuda.synchronize(backbone.device)
            seconds = time.perf_counter() - t0
            warm = warm_left > 0
            warm_left -= len(batch)
            cuts = first_eos_cut(gen.tokens, eos_ids)
            rows = []
            for ex, prompt, cut, fin in zip(batch, prompts, cuts, gen.finished.tolist()):
                text_ids = cut[:-1] if cut and cut[-1] in eos_ids else cut
                completion = tok.decode(text_ids, skip_special_tokens=True)
                rows.append({"example_id": ex.id, **common, "completion": completion, "answer": ex.answer,
                             "prediction": task.extract(completion), **task.score(ex, completion),
                             "gen_tokens": len(cut), "prompt_tokens": len(prompt), "finished": bool(fin),
                             "nfe": counter.nfe, "token_forwards": counter.token_forwards, "seconds": seconds,
                             "warmup": warm, "batch": f"{common['fingerprint']}:{batch[0].id}"})
            if not warm:
                timed_tokens += sum(r["gen_tokens"] for r in rows)
                timed_secs += seconds
            rows = [r for r in rows if r["example_id"] not in skip]  # a cut-short batch: its missing rows
            write_rows(out, rows)  # the batch in one write: a kill keeps whole rows (+ a torn tail)
            written_tokens += sum(r["gen_tokens"] for r in rows)
            if conf.get("save_traces") and gen.trace is not None:
                _save_trace(traces, batch, gen)
            n_correct += sum(bool(r["correct"]) for r in rows)
            prev, done = done, done + len(rows)
            tps = f"{timed_tokens / timed_secs:.1f}" if timed_secs else None
            bar.set_postfix(acc=f"{n_correct / max(done, 1):.3f}", tps=tps or "warm-up", refresh=False)
            bar.update(len(rows))
            if progress_due(done, prev, total, time.monotonic() - last_line):
                last_line = time.monotonic()
                log.info("%d/%d done, accuracy so far %.3f, TPS %s", done, total, n_correct / max(done, 1),
                         tps or "n/a (warm-up)")
    return written_tokens


def _save_trace(path: Path, batch, gen) -> None:
    """Append the sampler's per-step trace (and info, e.g. AsyncLane's lane tree) for a batch."""
    with open(path, "a") as fh:
        fh.write(json.dumps({"example_ids": [ex.id for ex in batch], "trace": gen.trace,
                             "info": gen.info}, default=str) + "\n")


# Loaded backbones by (path, dtype, device): a multirun (Hydra's basic launcher runs its jobs
# one after another in this process) loads each checkpoint once.  LOADS counts real loads.
_BACKBONES: dict = {}
LOADS = 0


def cached_backbone(name: str, path, dtype: torch.dtype, device: torch.device, compile: bool = False):
    """The loaded backbone of (path, dtype, device), loading it the first time; ``compile``: its layer
    stack under ``torch.compile`` (``model.compile``, :meth:`asynclane.Backbone.compile`)."""
    global LOADS
    key = (str(Path(path).resolve()) if Path(path).exists() else str(path), str(dtype), str(device), compile)
    if key in _BACKBONES:
        log.info("reusing the loaded %s from %s (%s, %s)", name, path, dtype, device)
        return _BACKBONES[key]
    _BACKBONES.clear()  # hold one: a sweep over two 8B models must not keep both on the device
    log.info("loading %s from %s (%s, %s)", name, path, dtype, device)
    backbone = load_backbone(path, dtype=dtype, device=device)
    if backbone.tokenizer is None:
        raise CheckpointNotFound(f"{path} has no tokenizer files; the runner needs them to build prompts")
    if compile:
        log.info("compiling %s's layer stack (torch.compile, mode=reduce-overhead)", name)
        backbone.compile()
    LOADS += 1
    _BACKBONES[key] = backbone
    return backbone


@contextmanager
def _checkpoint_errors(model: dict):
    """A missing or unreadable checkpoint as a :class:`UsageError` naming the model, and for a
    missing one, how to get the model preset's checkpoint."""
    try:
        yield
    except (CheckpointNotFound, CheckpointError) as e:
        name, hint = model["name"], ""
        shipped = preset("model", name)  # the preset as shipped: its path is the model's hub id
        if isinstance(e, CheckpointNotFound) and shipped:
            hub_id = shipped.get("path")
            if hub_id is None and model.get("path"):
                hint = f"; model={name} ships in the package: leave model.path unset (null)"
            elif hub_id is not None and f"hf download {hub_id}" not in str(e):
                hint = f"; for model={name}: `hf download {hub_id} --local-dir DIR`, then model.path=DIR"
        raise UsageError(f"model={name}: {e}{hint}") from e


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {"device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "python_version": platform.python_version(),
            "git_commit": _git("rev-parse", "HEAD"), "git_dirty": _git_dirty()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> Optional[str]:
    try:
        res = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _git_dirty() -> Optional[bool]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _check_top_level(conf: dict) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise UsageError(msg)

    need(isinstance(conf.get("gen_length"), int) and conf["gen_length"] > 0,
         f"gen_length must be a positive integer, got {conf.get('gen_length')!r}")
    need(conf.get("limit") is None or (isinstance(conf["limit"], int) and conf["limit"] >= 0),
         f"limit must be a non-negative integer or null, got {conf.get('limit')!r}")
    need(conf.get("limit_mode") in ("first", "random"),
         f"unknown limit_mode {conf.get('limit_mode')!r}; valid choices: first, random")
    need(isinstance(conf.get("batch_size"), int) and conf["batch_size"] >= 1,
         f"batch_size must be an integer >= 1, got {conf.get('batch_size')!r}")
    need(isinstance(conf.get("warmup"), int) and conf["warmup"] >= 0,
         f"warmup must be an integer >= 0, got {conf.get('warmup')!r}")
    need(isinstance(conf.get("seed"), int), f"seed must be an integer, got {conf.get('seed')!r}")
    need(conf.get("threads") is None or (isinstance(conf["threads"], int) and conf["threads"] >= 1),
         f"threads must be an integer >= 1 or null, got {conf.get('threads')!r}")
    need(isinstance(conf["model"].get("compile", False), bool),
         f"model.compile must be true or false, got {conf['model'].get('compile')!r}")


def _build_task(task_conf: dict):
    options = {k: v for k, v in task_conf.items() if k != "limit"}  # limit: the top-level default
    try:
        return build_task(options.pop("name"), **options)
    except (ValueError, KeyError) as e:
        raise UsageError(str(e)) from None


def _preflight(task) -> list[str]:
    """The task's own checks before any work (code tasks: the sandbox this machine can give):
    warnings are logged and kept for ``summary.json``; a refusal is a usage error."""
    check = getattr(task, "preflight", None)
    try:
        warnings = list(check()) if check else []
    except ValueError as e:
        raise UsageError(str(e)) from None
    for w in warnings:
        log.warning("%s", w)
    return warnings


def _length_guard(model: dict, task, examples, gen_length: int) -> list[str]:
    """Refuse a run longer than the model's ``max_length``; warn (returned for ``summary.json``)
    about one past the context it was trained for.  Reads config.json, training.json and the
    tokenizer only, so a bad length fails before the weights load."""
    trained = model.get("trained_context")
    if trained is not None and (not isinstance(trained, int) or isinstance(trained, bool) or trained <= 0):
        raise UsageError(f"model.trained_context must be a positive integer (prompt + answer tokens the model "
                         f"was trained for) or null (the checkpoint's own record), got {trained!r}")
    name = model["name"]
    with _checkpoint_errors(model):
        limits = context_limits(model_path(model.get("path"), model["name"]))
        tok = load_tokenizer(limits.directory)
        if tok is None:
            raise CheckpointNotFound(f"{limits.directory} has no tokenizer files; the runner needs them to build prompts")
    if not examples:
        return []
    longest = max(len(task.build_prompt(tok, ex)) for ex in examples)  # batches pad to their longest prompt
    need = longest + gen_length
    if need > limits.max_length:
        room = limits.max_length - longest
        valid = f"valid here: gen_length <= {room}" if room > 0 else "no gen_length fits: the prompt alone is too long"
        raise UsageError(f"model={name}: the longest prompt of task={task.name} ({longest} tokens) + gen_length="
                         f"{gen_length} = {need} tokens exceeds the model's max_length {limits.max_length} (its "
                         f"config.json); {valid}")
    record, source = ({"tokens": trained}, "model.trained_context") if trained is not None else (
        limits.trained, f"{limits.directory / 'training.json'}")
    if not record:
        return []
    beyond = []
    gens = record.get("gen_lengths")
    if gens and gen_length > max(gens):
        beyond.append(f"gen_length={gen_length} > its largest trained answer budget (trained on "
                      f"{'/'.join(map(str, gens))})")
    if "prompt_tokens" in record and longest > record["prompt_tokens"]:
        beyond.append(f"task={task.name}'s longest prompt ({longest} tokens) > its longest trained prompt "
                      f"({record['prompt_tokens']})")
    if "tokens" in record and need > record["tokens"]:
        beyond.append(f"prompt + gen_length = {need} tokens > its longest trained sequence ({record['tokens']})")
    if not beyond:
        return []
    warning = (f"BEYOND THE TRAINED CONTEXT: model={name}: {'; '.join(beyond)} (from {source}). The run goes on, "
               f"within max_length {limits.max_length}, but the model never saw such lengths: its outputs "
               f"there are unreliable")
    log.warning("%s", warning)
    return [warning]


def _build_sampler(sampler_conf: dict):
    options = dict(sampler_conf)
    name = options.pop("name", None)
    if name is None:
        raise UsageError("the sampler config has no `name`; a preset in conf/sampler/ must set name: <sampler>")
    try:
        return name, build_sampler(name, **options)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _fingerprint(conf: dict, data_source: Optional[dict] = None) -> str:
    """The identity of a run's rows.  Data: shipped files are the task's version (their sha256 is
    checked on load), so their rows keep the fingerprint they had before the source options existed;
    another source adds the sha256 of the records' content (a moving hub branch never resumes)."""
    key = {k: conf.get(k) for k in FINGERPRINT_KEYS}
    key["task"] = {k: v for k, v in key["task"].items() if k not in SELECTION_KEYS}
    if data_source is None or data_source.get("source") == "shipped":
        key["task"] = {k: v for k, v in key["task"].items() if k not in SOURCE_OPTIONS}
    else:
        key["data_sha256"] = data_source["sha256"]
    key["model"] = {k: v for k, v in key["model"].items() if k not in MODEL_INFO_KEYS}
    if not key["model"].get("compile"):  # eager rows keep the fingerprint they had before the key existed;
        key["model"] = {k: v for k, v in key["model"].items() if k != "compile"}  # compiled rows differ
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _derive_seed(seed: int, example_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:7], "little")

