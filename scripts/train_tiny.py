"""Train the embedded tiny dLLM (LLaDA family) on the synthetic tasks with the LLaDA SFT objective.

The shipped weights (``src/asynclane/tiny``) came from one run on an NVIDIA H200 (torch 2.11,
bf16 autocast, 14 data-worker processes, 32,768-token batches): 15,486 steps in 360 s of
training, stopped by ``--time-budget`` at 80% of the 19,278-step schedule it calibrated from its
measured step rate.  Its log is ``results/tiny_training/log.jsonl``; ``training.json`` beside the
weights holds the exact command and the one that reproduces the schedule without calibration::

    python scripts/train_tiny.py --device cuda --amp --workers 14 --batch-tokens 32768 \
        --steps 19278 --stop-after 15486 --lr 2e-3 --warmup 300 --probe-every 1000 --probe-n 100

The run resumes from ``--state`` (default ``scripts/tiny_state/``, not committed) when present.
On a CPU (the defaults: fp32, 4,096-token batches, inline data) a run is bit-exact across
interruptions, because every step's data and noise come from ``seed`` and the step number alone;
batches built by ``--workers`` processes are identical to inline ones.  On a GPU, kernels are not
bit-deterministic, so a rerun reproduces the recipe, not the last bit of the weights.

Objective (LLaDA SFT, GUIDELINES): the prompt stays clean; the answer, padded with EOS to the
generation length, has each position masked with probability t ~ U(eps, 1] per row; loss is
cross-entropy on masked positions weighted 1/t, divided by the row's answer length (EOS pads
included, as LLaDA does), averaged over rows.  Each step draws its generation length from
{64, 128, 256} so the model learns to fill any of the swept budgets with EOS, and sizes the
batch to a fixed token budget.

Model: native ``asynclane.backbone.Transformer`` in LLaDA form, d 256, 4 layers, 4 heads,
SwiGLU 768, word-level vocabulary (about 3.4M parameters).  AdamW (0.9, 0.95), wd 0.1,
linear warm-up then cosine decay to 10%, grad-norm clip 1.0, fp32, 2 threads.

Step time: 0.8 s for a 4,096-token batch on the project's 2-core CPU (fp32, 2 threads; 7,000
steps there reached only 15% / 0% exact match on arith / listops), 23 ms for a 32,768-token batch
on the H200 (43 steps/s, data workers included).  The log records, every 50 steps, the loss,
masked-token accuracy and cumulative training seconds, and at every probe the exact match of
greedy decoding and the fill-in accuracy (one answer token masked; numbers vs structure).
``src/asynclane/tiny/training.json`` states the step and seconds of the shipped weights.

Trained context: every checkpoint saved records, in ``training.json``'s ``trained_context``, the
lengths its run showed the model (longest prompt, answer budgets, longest prompt + answer row,
tasks) next to the ``max_length`` it supports; the evaluator warns past them
(``asynclane.loading.context_limits``).  The counts persist in ``--state`` across resumes.

Long task (``--tasks trace`` alone, or mixed with the short tasks, e.g. ``--tasks
arith,listops,trace``): ``eval.tasks.trace`` answers of 119-914 tokens in budget classes
256/512/1024.  With trace, the gen lengths default to those three (equal weights); a step whose
gen length is a trace budget fills ``--trace-fraction`` of its rows with trace problems of that
class (default 0.5 when mixed; the others with the short tasks, padded with EOS to the same
budget), each with a dependency distance drawn from ``--trace-deps`` (default: uniform over
every valid one).
``--max-length`` must hold the longest row (1024 + 532 prompt tokens: 1556).  Without trace the
batches are exactly those of the shipped recipe.  A CPU pilot (one thread, 256 s, a 0.1M-parameter
model; loss 3.52 at step 50, 1.09 at step 1,500)::

    python scripts/train_tiny.py --tasks trace --gen-lengths 256 --max-length 512 --d-model 64 \
        --layers 2 --heads 2 --mlp 192 --threads 1 --steps 1500 --time-budget 270 --warmup 50 \
        --lr 3e-3 --probe-every 100000 --save-every 100000 --state /tmp/pilot/state \
        --out /tmp/pilot/out --log /tmp/pilot/log.jsonl

Chunks: ``--chunk-seconds`` stops an invocation (resumably, after a save) once that much wall
time has passed, so a long run is a series of short commands on ``--state``; ``--shard-mib``
writes the exported weights and the state in files holding at most that much tensor data (a
file adds a few KiB: ``--shard-mib 15`` keeps every file under 16 MiB).  ``--compact-state`` leaves
AdamW's moments out of the state (a third of the size, small enough to travel to a GPU machine and
back with the repository); a resume from it starts fresh moments and ramps the lr up again over
``--rewarm`` steps.  ``--export-only`` writes ``--out`` from a state (with the same model flags),
so only the state needs to come back from the machine that trained: ``scripts/gpu_long.sh``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from asynclane.backbone import ModelConfig, Transformer  # noqa: E402
from asynclane.checkpoint import native_views  # noqa: E402
from asynclane.loading import TRAINED_CONTEXT, save_checkpoint  # noqa: E402
from asynclane.tiny_tokenizer import build_tokenizer, chat_prompt_ids  # noqa: E402
from asynclane.tinymodel import export_checkpoint  # noqa: E402
from eval.tasks import synthetic, trace  # noqa: E402

GEN_LENGTHS = (64, 128, 256)
GEN_WEIGHTS = (0.6, 0.25, 0.15)
TASK_CHOICES = (*synthetic.TASKS, "trace")
SHORT_PROMPT = 40  # a short task's prompt in the batch sizing (the longest is 30 tokens)


@dataclass(frozen=True)
class Recipe:
    """What the batches hold.  The defaults are the shipped recipe (arith and listops alternating,
    gen lengths 64/128/256); ``trace_deps`` None draws a dependency distance uniformly from all
    valid ones of the budget."""

    tasks: tuple = synthetic.TASKS
    gen_lengths: tuple = GEN_LENGTHS
    gen_weights: tuple = GEN_WEIGHTS
    trace_fraction: float = 0.0
    trace_deps: Optional[tuple] = None

    @property
    def short(self) -> tuple:
        return tuple(t for t in self.tasks if t != "trace")

    def trace_at(self, gen: int) -> bool:
        return "trace" in self.tasks and gen in trace.BUDGETS

    def deps(self, gen: int) -> list[int]:
        valid = range(1, trace.max_dep_distance(gen) + 1)
        return list(valid) if self.trace_deps is None else [d for d in self.trace_deps if d in valid]

    def longest_row(self, gen: int) -> int:
        """Most tokens a row of this gen length can have (prompt bound + gen)."""
        return gen + (max(SHORT_PROMPT, trace.max_prompt_tokens(gen)) if self.trace_at(gen) else SHORT_PROMPT)


def _int_list(text: str, flag: str) -> tuple:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated positive integers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise SystemExit(f"{flag} must be comma-separated positive integers, got {text!r}")
    return vals


def recipe_from_args(args) -> Recipe:
    """The batch recipe of ``--tasks``, ``--gen-lengths``, ``--gen-weights``, ``--trace-*``, checked
    against ``--max-length`` (one error line naming the flag and what is valid)."""
    tasks = tuple(t for t in args.tasks.split(",") if t)
    bad = [t for t in tasks if t not in TASK_CHOICES]
    if bad or not tasks or len(set(tasks)) != len(tasks):
        raise SystemExit(f"--tasks: {args.tasks!r} is not a list of distinct tasks; valid choices: "
                         f"{', '.join(TASK_CHOICES)} (comma-separated)")
    has_trace = "trace" in tasks
    if args.gen_lengths is None:
        gens, weights = (trace.BUDGETS, (1, 1, 1)) if has_trace else (GEN_LENGTHS, GEN_WEIGHTS)
    else:
        gens = _int_list(args.gen_lengths, "--gen-lengths")
        weights = (1,) * len(gens)
    if args.gen_weights is not None:
        try:
            weights = tuple(float(w) for w in args.gen_weights.split(","))
        except ValueError:
            weights = ()
        if len(weights) != len(gens) or min(weights) <= 0:
            raise SystemExit(f"--gen-weights must be {len(gens)} positive numbers (one per gen length "
                             f"{', '.join(map(str, gens))}), got {args.gen_weights!r}")
    only_trace = tasks == ("trace",)
    if has_trace and not any(g in trace.BUDGETS for g in gens):
        raise SystemExit(f"--gen-lengths {','.join(map(str, gens))}: trace needs at least one of its budgets "
                         f"{', '.join(map(str, trace.BUDGETS))}")
    if only_trace and any(g not in trace.BUDGETS for g in gens):
        raise SystemExit(f"--gen-lengths {','.join(map(str, gens))}: with --tasks trace alone every gen length "
                         f"must be a trace budget: {', '.join(map(str, trace.BUDGETS))}")
    fraction = 0.0 if not has_trace else args.trace_fraction if args.trace_fraction is not None else (
        1.0 if only_trace else 0.5)
    if has_trace and not (0 < fraction <= 1 and (fraction == 1 or not only_trace)):
        raise SystemExit(f"--trace-fraction must be in (0, 1] (1 with --tasks trace alone), got {fraction}")
    deps = None if args.trace_deps in (None, "all") else _int_list(args.trace_deps, "--trace-deps")
    recipe = Recipe(tasks, gens, weights, fraction, deps)
    for g in gens:
        if recipe.trace_at(g) and not recipe.deps(g):
            raise SystemExit(f"--trace-deps {args.trace_deps}: none is valid for budget {g}; valid: "
                             f"1..{trace.max_dep_distance(g)}")
    need = max(recipe.longest_row(g) for g in gens)
    if need > args.max_length:
        raise SystemExit(f"--max-length {args.max_length} is too short: rows reach {need} tokens (prompt + gen "
                         f"length); valid: --max-length >= {need}")
    return recipe


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10000,
                    help="length of the lr schedule; 0 = calibrate it to --time-budget (see below)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds of training: stop (resumably) once spent; with --steps 0 the schedule "
                         "length is set from the step rate measured over steps 20-60 (recorded in the log "
                         "and training.json, so a rerun with that --steps reproduces the schedule)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (cuda)")
    ap.add_argument("--workers", type=int, default=0, help="processes building batches (0: inline)")
    ap.add_argument("--log", type=Path, default=None, help="log file (default: STATE/log.jsonl)")
    ap.add_argument("--weights-only", action="store_true",
                    help="export weights, config and training.json but not the tokenizer files")
    ap.add_argument("--probe-n", type=int, default=20, help="held-out problems per task per probe")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (resumably) at this step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--probe-every", type=int, default=500)
    ap.add_argument("--state", type=Path, default=ROOT / "scripts" / "tiny_state")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "asynclane" / "tiny")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=768)
    ap.add_argument("--max-length", type=int, default=512,
                    help="positions the model supports (config.json); must hold the longest row")
    ap.add_argument("--tasks", default=",".join(synthetic.TASKS),
                    help=f"comma-separated tasks to train on: {', '.join(TASK_CHOICES)}")
    ap.add_argument("--gen-lengths", default=None,
                    help="comma-separated answer budgets a step draws from (default: 64,128,256; with "
                         "trace: 256,512,1024)")
    ap.add_argument("--gen-weights", default=None,
                    help="their draw weights (default: 0.6,0.25,0.15 for the short default; else equal)")
    ap.add_argument("--trace-fraction", type=float, default=None,
                    help="share of a trace-budget step's rows that are trace problems (default: 1 with "
                         "--tasks trace alone, else 0.5)")
    ap.add_argument("--trace-deps", default=None,
                    help="comma-separated dependency distances to draw from; default (all): every valid one")
    ap.add_argument("--chunk-seconds", type=float, default=None,
                    help="stop (resumably, after a save) once this invocation has run this many wall seconds")
    ap.add_argument("--shard-mib", type=float, default=None,
                    help="write the exported weights and the training state in files of at most this many MiB")
    ap.add_argument("--compact-state", action="store_true",
                    help="save the state without AdamW's moments (weights, step, schedule, counts: a third of the "
                         "size); a resume starts fresh moments and ramps the lr up again over --rewarm steps")
    ap.add_argument("--export-only", action="store_true",
                    help="write --out from the state in --state (weights, config, training.json as the run that "
                         "saved it wrote them) and stop: the export of a state brought back from another machine")
    ap.add_argument("--export-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                    help="with --export-only: the exported weights' dtype (fp16 halves a committed model)")
    ap.add_argument("--rewarm", type=int, default=50,
                    help="lr ramp after resuming from a compact state (default 50 steps; AdamW's second moment "
                         "averages over ~20 steps at beta2 0.95)")
    return ap.parse_args(argv)


def model_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig(family="llada", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.heads, mlp_hidden=args.mlp, vocab_size=vocab_size,
                       rope_theta=10000.0, norm_eps=1e-5, qkv_bias=False, max_length=args.max_length)


def make_batch(step: int, seed: int, tok, batch_tokens: int, recipe: Recipe = Recipe()):
    """Deterministic batch for ``step``: ids (B, T), key mask, answer mask, gen length.

    The default recipe draws exactly the shipped run's batches (same random stream)."""
    rng = random.Random(seed * 1_000_003 + step)
    gen = rng.choices(recipe.gen_lengths, recipe.gen_weights)[0]
    long = recipe.trace_at(gen)
    rows = max(4, batch_tokens // (recipe.longest_row(gen)))
    eos, short, n_short = tok.eos_token_id, recipe.short, 0
    seqs, prompt_lens = [], []
    for _ in range(rows):
        if long and (not short or rng.random() < recipe.trace_fraction):
            p = trace.train_problem(rng, gen, rng.choice(recipe.deps(gen)))
        else:
            p = synthetic.train_problem(short[n_short % len(short)], rng)
            n_short += 1
        prompt = chat_prompt_ids(tok, p.prompt)
        answer = tok.encode(p.answer, add_special_tokens=False)[: gen - 1]
        seqs.append(prompt + answer + [eos] * (gen - len(answer)))
        prompt_lens.append(len(prompt))
    T = max(map(len, seqs))
    ids = torch.full((rows, T), eos, dtype=torch.long)
    key_mask = torch.zeros(rows, T, dtype=torch.bool)
    answer_mask = torch.zeros(rows, T, dtype=torch.bool)
    for r, (s, pl) in enumerate(zip(seqs, prompt_lens)):
        ids[r, : len(s)] = torch.tensor(s)
        key_mask[r, : len(s)] = True
        answer_mask[r, pl: len(s)] = True
    return ids, key_mask, answer_mask, gen


def make_noise(step: int, seed: int, answer_mask: torch.Tensor, eps=1e-3):
    """Per-row mask ratio t ~ U(eps, 1] and the masked answer positions for ``step``."""
    B, T = answer_mask.shape
    g = torch.Generator().manual_seed(seed * 7919 + step)
    t = (1 - eps) * torch.rand(B, 1, generator=g) + eps
    masked = (torch.rand(B, T, generator=g) < t) & answer_mask
    return t, masked


_TOK = None


def prepare_step(job):
    """Everything step ``step`` trains on (runs in a data worker when --workers > 0)."""
    global _TOK
    step, seed, batch_tokens, *rest = job
    if _TOK is None:
        _TOK = build_tokenizer(synthetic.VOCAB_WORDS)  # trace's words are a subset
    ids, key_mask, answer_mask, gen = make_batch(step, seed, _TOK, batch_tokens, *rest)
    t, masked = make_noise(step, seed, answer_mask)
    return ids, key_mask, gen, t, masked


def sft_loss(model, ids, key_mask, gen: int, mask_id: int, t, masked):
    B, T = ids.shape
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    positions = torch.arange(T, device=ids.device).expand(B, T)
    hidden = model(noisy, positions, key_mask)
    logits = model.head(hidden[masked])
    ce = F.cross_entropy(logits, ids[masked], reduction="none")
    weight = 1.0 / (t.expand(B, T)[masked] * gen)
    loss = (ce * weight).sum() / B
    acc = (logits.argmax(-1) == ids[masked]).float().mean()
    return loss, acc


def lr_at(step, args, rewarm_from=None):
    """The schedule's lr at ``step``: linear warm-up, cosine decay to 10%.  ``rewarm_from``: the step
    a run resumed at with fresh optimizer moments (a compact state); the lr ramps up again over
    ``args.rewarm`` steps from there."""
    if step < args.warmup:
        lr = args.lr * (step + 1) / args.warmup
    else:
        frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    if rewarm_from is not None and args.rewarm > 0:
        lr *= min(1.0, (step - rewarm_from + 1) / args.rewarm)
    return lr


@torch.no_grad()
def greedy_blockwise(model, prompts, gen, block, mask_id, eos_id):
    """LLaDA low-confidence remasking, one token per step, temperature 0, left-padded batch.

    Kept inside the trainer (not the project's ``blockwise`` sampler) so the training loop never
    imports code that may change while a long run is in flight.
    """
    B, P = len(prompts), max(map(len, prompts))
    T = P + gen
    ids = torch.full((B, T), mask_id, dtype=torch.long)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    for r, pr in enumerate(prompts):
        ids[r, : P - len(pr)] = eos_id
        key_mask[r, : P - len(pr)] = False
        ids[r, P - len(pr): P] = torch.tensor(pr)
    dev = model.head.weight.device
    ids, key_mask = ids.to(dev), key_mask.to(dev)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    for b0 in range(P, T, block):
        for _ in range(block):
            logits = model.head(model(ids, positions, key_mask)).float()
            conf, pred = logits.softmax(-1).max(-1)
            still = ids == mask_id
            still[:, b0 + block:] = False
            conf = torch.where(still, conf, torch.full_like(conf, -1.0))
            j = conf.argmax(-1)
            rows = still.any(-1)
            ids[rows, j[rows]] = pred[rows, j[rows]]
    return [row[P:].tolist() for row in ids]


def _greedy_texts(model, tok, prompts_text, gen, block):
    prompts = [chat_prompt_ids(tok, t) for t in prompts_text]
    comps = greedy_blockwise(model, prompts, gen, block, tok.mask_token_id, tok.eos_token_id)
    return [tok.decode(c[: c.index(tok.eos_token_id)] if tok.eos_token_id in c else c) for c in comps]


def probe(model, tok, n=20, gen=64, block=32, tasks=synthetic.TASKS):
    """Exact match of greedy one-token-per-step decoding on the first n held-out problems."""
    model.eval()
    out = {}
    for task in tasks:
        probs = synthetic.test_problems(task, n)
        texts = _greedy_texts(model, tok, [p.prompt for p in probs], gen, block)
        out[task] = sum(synthetic.score(p, t) for p, t in zip(probs, texts)) / n
    model.train()
    return out


def probe_trace(model, tok, n=20, budget=256, block=32):
    """The same decoding on the first n held-out trace problems (dep_distance 1) at ``budget``:
    the final line (``correct``) and every line (``exact``) exactly right."""
    model.eval()
    probs = trace.test_problems(budget, 1, n)
    texts = _greedy_texts(model, tok, [p.prompt for p in probs], budget, block)
    scores = [trace.score(p.answer, p.target, t) for p, t in zip(probs, texts)]
    model.train()
    return {"budget": budget, **{k: round(sum(s[k] for s in scores) / n, 3)
                                 for k in ("correct", "exact", "line_accuracy")}}


@torch.no_grad()
def fill_in_accuracy(model, tok, n=40, tasks=synthetic.TASKS, trace_budget=None):
    """Accuracy on one masked answer token with everything else visible, numbers vs the rest.

    Numbers can only be right by copying from the prompt or computing; structure (keys, signs,
    newlines) is learned first.  This shows copying emerge long before exact match moves.
    With ``trace_budget``, also trace (n // 10 problems of that budget, dep_distance 1): there the
    numbers are the hard tokens (operand values and results), the rest the easy ones.
    """
    model.eval()
    numbers = set(tok.convert_tokens_to_ids([str(i) for i in range(synthetic.MAX_VALUE + 1)]))
    sets = {task: synthetic.test_problems(task, n) for task in tasks}
    if trace_budget is not None:
        sets["trace"] = trace.test_problems(trace_budget, 1, max(1, n // 10))
    out = {}
    for task, problems in sets.items():
        hit = {"number": [0, 0], "other": [0, 0]}
        for p in problems:
            prompt = chat_prompt_ids(tok, p.prompt)
            answer = tok.encode(p.answer, add_special_tokens=False)
            seq = torch.tensor(prompt + answer + [tok.eos_token_id])
            rows = seq.repeat(len(answer), 1)
            cols = torch.arange(len(answer)) + len(prompt)
            rows[torch.arange(len(answer)), cols] = tok.mask_token_id
            T = rows.shape[1]
            dev = model.head.weight.device
            hidden = model(rows.to(dev), torch.arange(T, device=dev).expand(len(answer), T))
            pred = model.head(hidden[torch.arange(len(answer), device=dev), cols.to(dev)]).argmax(-1).cpu()
            for t, ok in zip(answer, (pred == torch.tensor(answer)).tolist()):
                h = hit["number" if t in numbers else "other"]
                h[0] += ok
                h[1] += 1
        out[task] = {k: round(a / max(1, b), 3) for k, (a, b) in hit.items()}
    model.train()
    return out


STATE_INDEX = "state-index.pt"  # the sharded state: this index (the structure) + state-*-of-*.pt


def save_state(path: Path, step, model, opt, elapsed, schedule_steps, seen=None, shard_bytes=None, compact=False,
               meta=None):
    """The resumable state, in one ``state.pt`` or (``shard_bytes``) in files of at most that size.
    ``compact``: without the optimizer's moments (a third of the size; see ``--compact-state``).
    ``meta``: the export's training.json fields (so ``--export-only`` rebuilds the export from it).

    Sharded: every tensor goes into a shard file, the index (written last, atomically) holds the
    rest and names the shards; shards of older saves are removed after it, so a kill at any point
    leaves a loadable state."""
    path.mkdir(parents=True, exist_ok=True)
    blob = {"step": step, "model": model.state_dict(), "opt": None if compact else opt.state_dict(),
            "elapsed": elapsed, "schedule_steps": schedule_steps, "seen": seen, "meta": meta}
    if shard_bytes is None:
        tmp = path / "state.pt.tmp"
        torch.save(blob, tmp)
        os.replace(tmp, path / "state.pt")
        stale = [path / STATE_INDEX, *path.glob("state-*-of-*.pt")]
    else:
        tensors = []

        def pull(obj):
            if isinstance(obj, torch.Tensor):
                tensors.append(obj.detach().cpu())
                return ("__tensor__", len(tensors) - 1)
            if isinstance(obj, dict):
                return {k: pull(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(pull(v) for v in obj)
            return obj

        skeleton = pull(blob)
        groups, size = [[]], 0
        for i, t in enumerate(tensors):
            nbytes = t.numel() * t.element_size()
            if groups[-1] and size + nbytes > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        names = [f"state-{step:08d}-{k + 1:03d}-of-{len(groups):03d}.pt" for k in range(len(groups))]
        for name, group in zip(names, groups):
            torch.save({i: tensors[i] for i in group}, path / (name + ".tmp"))
            os.replace(path / (name + ".tmp"), path / name)
        torch.save({"skeleton": skeleton, "shards": names}, path / (STATE_INDEX + ".tmp"))
        os.replace(path / (STATE_INDEX + ".tmp"), path / STATE_INDEX)
        stale = [path / "state.pt", *(f for f in path.glob("state-*-of-*.pt") if f.name not in names)]
    for f in stale:
        f.unlink(missing_ok=True)


def load_state(path: Path, map_location):
    """The state :func:`save_state` wrote (either form), or None if there is none."""
    if (path / "state.pt").exists():
        return torch.load(path / "state.pt", weights_only=False, map_location=map_location)
    if not (path / STATE_INDEX).exists():
        return None
    index = torch.load(path / STATE_INDEX, weights_only=False)
    tensors = {}
    for name in index["shards"]:
        tensors.update(torch.load(path / name, weights_only=False, map_location=map_location))

    def push(obj):
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tensor__":
            return tensors[obj[1]]
        if isinstance(obj, dict):
            return {k: push(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(push(v) for v in obj)
        return obj

    return push(index["skeleton"])


def tensors_per_shard(model, shard_bytes: int) -> int:
    """The most exported tensors per safetensors shard (fp32, official order) keeping each within
    ``shard_bytes`` (``asynclane.loading.save_checkpoint`` shards by tensor count)."""
    sizes = [p.numel() * 4 for p in native_views(model).values()]
    for n in range(len(sizes), 0, -1):
        if all(sum(sizes[i: i + n]) <= shard_bytes for i in range(0, len(sizes), n)):
            return n
    raise SystemExit(f"--shard-mib {shard_bytes / 2 ** 20:g}: one tensor alone is {max(sizes) / 2 ** 20:.1f} MiB; "
                     f"valid: --shard-mib >= {math.ceil(max(sizes) / 2 ** 20)}")


def export(model, tok, out: Path, meta: dict, with_tokenizer: bool, shard_bytes=None, dtype="fp32") -> None:
    if shard_bytes is None:
        export_checkpoint(model, tok, out, meta=meta, with_tokenizer=with_tokenizer, dtype=dtype)
        return
    ids = {"mask": tok.mask_token_id, "eos": tok.eos_token_id, "pad": tok.eos_token_id, "bos": tok.bos_token_id}
    save_checkpoint(model, out, ids, tokenizer=tok if with_tokenizer else None,
                    shard_size=tensors_per_shard(model, shard_bytes), meta=meta, dtype=dtype)


def trained_context(seen: dict, max_length: int) -> dict:
    """The record every saved checkpoint carries (training.json): what this run showed the model."""
    return {"max_length": max_length, "prompt_tokens": seen["prompt_tokens"],
            "gen_lengths": sorted(seen["gen_lengths"]), "tokens": seen["tokens"], "tasks": sorted(seen["tasks"])}


def see(seen: dict, key_mask: torch.Tensor, gen: int, tasks) -> dict:
    """Fold one batch into the running record (rows are prompt + gen tokens, the rest padding)."""
    rows = key_mask.sum(1)
    longest = int(rows.max())
    return {"prompt_tokens": max(seen.get("prompt_tokens", 0), longest - gen),
            "gen_lengths": sorted(set(seen.get("gen_lengths", ())) | {gen}),
            "tokens": max(seen.get("tokens", 0), longest), "tasks": sorted(set(seen.get("tasks", ())) | set(tasks))}


def _worker_init():
    torch.set_num_threads(1)


def data_pool(args):
    """``--workers`` batch-building processes, forked before any CUDA context exists (or None)."""
    if args.workers <= 0:
        return None
    import multiprocessing as mp
    return mp.get_context("fork").Pool(args.workers, initializer=_worker_init)


def _to_numpy(batch):
    ids, key_mask, gen, t, masked = batch
    return ids.numpy(), key_mask.numpy(), gen, t.numpy(), masked.numpy()


def _prepare_numpy(job):
    # plain arrays travel by pickle: torch tensors would go through shared-memory file descriptors
    return _to_numpy(prepare_step(job))


def batches(args, pool, start: int, recipe: Optional[Recipe] = None):
    """Step batches in order from ``start``, built inline or by ``pool`` (same content either way).

    At most ``4 * workers`` batches are in flight, so memory stays bounded however long the run.
    """
    recipe = recipe or recipe_from_args(args)
    if pool is None:
        step = start
        while True:
            yield prepare_step((step, args.seed, args.batch_tokens, recipe))
            step += 1
    from collections import deque
    pending, nxt = deque(), start
    while True:
        while len(pending) < 4 * args.workers:
            pending.append(pool.apply_async(_prepare_numpy, ((nxt, args.seed, args.batch_tokens, recipe),)))
            nxt += 1
        ids, key_mask, gen, t, masked = pending.popleft().get()
        yield torch.from_numpy(ids), torch.from_numpy(key_mask), gen, torch.from_numpy(t), torch.from_numpy(masked)


def main(argv=None):
    args = parse_args(argv)
    command = "python scripts/train_tiny.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    recipe = recipe_from_args(args)  # bad flags fail here, before any work
    if args.shard_mib is not None and args.shard_mib <= 0:
        raise SystemExit(f"--shard-mib must be a positive number of MiB, got {args.shard_mib}")
    shard_bytes = None if args.shard_mib is None else int(args.shard_mib * 2 ** 20)
    wall0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pool = data_pool(args)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tok = build_tokenizer(synthetic.VOCAB_WORDS)
    cfg = model_config(args, len(tok))
    model = Transformer(cfg)
    for name, p in native_views(model).items():  # the official matrices, in their original order
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    if shard_bytes is not None:
        tensors_per_shard(model, shard_bytes)  # refuses a limit below the largest tensor, before any work
    model.to(args.device)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    step, elapsed, seen, rewarm_from = 0, 0.0, {}, None
    st = load_state(args.state, args.device)
    if args.export_only:
        if st is None or st.get("meta") is None:
            raise SystemExit(f"--export-only: no state with its export record in {args.state} (states saved by this "
                             f"version of the trainer hold one); valid: a --state directory a run wrote")
        model.load_state_dict(st["model"])
        half = {} if args.export_dtype == "fp32" else {"weights_dtype": args.export_dtype}
        export(model, tok, args.out, {**st["meta"], **half},
               with_tokenizer=not args.weights_only, shard_bytes=shard_bytes, dtype=args.export_dtype)
        print(f"exported step {st['step']} from {args.state} to {args.out}", flush=True)
        return
    if st is not None:
        model.load_state_dict(st["model"])
        if st.get("opt") is not None:
            opt.load_state_dict(st["opt"])
        else:  # a compact state: fresh moments, the lr ramps up again
            rewarm_from = st["step"]
        step, elapsed = st["step"], st["elapsed"]
        seen = st.get("seen") or {}  # a state saved before the record existed: counted from here on
        args.steps = st.get("schedule_steps", args.steps) if args.steps == 0 else args.steps
        print(f"resumed at step {step} ({elapsed:.0f} s of training so far"
              f"{'; fresh optimizer moments, lr re-warmed' if rewarm_from is not None else ''})", flush=True)
    if args.steps == 0 and args.time_budget is None:
        raise SystemExit("--steps 0 (calibrated schedule) needs --time-budget SECONDS")
    calibrating = args.steps == 0
    horizon = 10 ** 9 if calibrating else args.steps
    stop = min(horizon, args.stop_after or horizon)
    args.state.mkdir(parents=True, exist_ok=True)
    log = open(args.log or args.state / "log.jsonl", "a")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.amp else torch.autocast("cpu", enabled=False)
    model.train()
    t0 = time.time()
    run_loss = run_acc = 0.0
    trace_probe = min((g for g in recipe.gen_lengths if recipe.trace_at(g)), default=None)
    for ids, key_mask, gen, t, masked in batches(args, pool, step, recipe):
        if step >= stop:
            break
        long = recipe.trace_at(gen)
        step_tasks = (("trace",) if long else ()) + (recipe.short if not long or recipe.trace_fraction < 1 else ())
        seen = see(seen, key_mask, gen, step_tasks)
        if calibrating and step == 20:
            t_cal = time.time()
        if calibrating and step == 60:
            rate = 40 / (time.time() - t_cal)
            args.steps = max(args.warmup + 100, int(rate * args.time_budget))
            stop = min(args.steps, args.stop_after or args.steps)
            calibrating = False
            print(json.dumps({"calibrated_steps_per_s": round(rate, 2), "schedule_steps": args.steps}), flush=True)
            log.write(json.dumps({"step": step, "calibrated_steps_per_s": round(rate, 2),
                                  "schedule_steps": args.steps}) + "\n")
        dev = args.device
        ids, key_mask, t, masked = (x.to(dev, non_blocking=True) for x in (ids, key_mask, t, masked))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args, rewarm_from)
        with amp:
            loss, acc = sft_loss(model, ids, key_mask, gen, tok.mask_token_id, t, masked)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += loss.item()
        run_acc += acc.item()
        over_budget = args.time_budget is not None and elapsed + (time.time() - t0) >= args.time_budget
        over_budget |= args.chunk_seconds is not None and time.time() - wall0 >= args.chunk_seconds
        if step % 50 == 0:
            now = time.time()
            elapsed += now - t0
            t0 = now
            rec = {"step": step, "loss": round(run_loss / 50, 4), "masked_acc": round(run_acc / 50, 4),
                   "lr": lr_at(step, args, rewarm_from), "seconds": round(elapsed, 1)}
            run_loss = run_acc = 0.0
            if step % args.probe_every == 0:
                with amp:
                    if recipe.short:
                        rec["probe_gen64"] = probe(model, tok, n=args.probe_n, tasks=recipe.short)
                    if trace_probe is not None:
                        rec["probe_trace"] = probe_trace(model, tok, n=args.probe_n, budget=trace_probe)
                    rec["fill_in_acc"] = fill_in_accuracy(model, tok, tasks=recipe.short, trace_budget=trace_probe)
                t0 = time.time()
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % args.save_every == 0 or step == stop or over_budget:
            elapsed += time.time() - t0
            t0 = time.time()
            meta = {"step": step, "schedule_steps": args.steps, "train_seconds": round(elapsed),
                    "device": args.device, "command": command, TRAINED_CONTEXT: trained_context(seen, cfg.max_length)}
            save_state(args.state, step, model, opt, elapsed, args.steps, seen, shard_bytes, args.compact_state, meta)
            export(model, tok, args.out, meta, with_tokenizer=not args.weights_only, shard_bytes=shard_bytes)
        if over_budget:
            break
    if pool is not None:
        pool.terminate()
    log.close()
    print(f"stopped at step {step}, {elapsed:.0f} s of training", flush=True)


if __name__ == "__main__":
    main()
