"""How many model calls does an answer need at least?  An oracle-guided decoder on the tiny model.

A sampler that commits the model's argmax can be right only where the argmax already is the
reference token.  This script decodes each problem with an *oracle* that, after every model
call, commits every masked answer position whose argmax (mask id excluded) equals the reference
(the gold answer's tokens, then the first EOS), and, when no position qualifies, the leftmost
masked one with its reference token (so every call makes progress).  The EOS tail after the
answer is free (a cascade fills it).  Each call is an exact full-buffer forward.

What it measures: the greedy floor of model calls per answer, and so the most generated tokens
per call, that argmax decoding can reach on this model, with no confidence rule at all.  It is
greedy (commit everything right now), not a proof of optimality, and it reads the gold answer:
a diagnostic, not a sampler.  Compared with a benchmark run's tokens/call (``--benchmark``), it
bounds what any sampler could gain there (issue 6's "3x the tokens per call of the best
competitor").

    python scripts/oracle_floor.py --limit 50 --benchmark results/benchmark
    python scripts/oracle_floor.py --long --device cuda --benchmark results/benchmark_long   # the long proxy

``--long`` (issue 17): ``trace`` at the dependency distances and budgets of ``scripts/benchmark.py
--long`` on ``tiny_long`` (each budget class's own held-out problems: L is the class).  Tasks are
``--tasks`` entries as in the benchmark (``trace:dep_distance=7``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from asynclane.loading import CheckpointNotFound, load_backbone, model_path
from asynclane.testing import import_file
from asynclane.tiny_tokenizer import chat_prompt_ids
from eval.rows import SUMMARY
from eval.tasks import synthetic, trace

TASKS = ("arith", "listops")
BENCH = import_file("_oracle_floor_benchmark", Path(__file__).with_name("benchmark.py"))  # its run layout


@torch.no_grad()
def oracle_calls(backbone, prompt: list, reference: list, gen_length: int) -> tuple[int, int]:
    """(model calls, teacher-forced commits) to decode ``reference`` (answer + EOS) at ``gen_length``."""
    spec = backbone.spec
    if len(reference) > gen_length:
        raise ValueError(f"reference answer of {len(reference)} tokens does not fit gen_length={gen_length}")
    P = len(prompt)
    x = torch.tensor([prompt + [spec.mask_id] * gen_length], device=backbone.device)
    target = torch.tensor(reference, device=backbone.device)
    span = slice(P, P + len(reference))
    calls = forced = 0
    while (x[0, span] == spec.mask_id).any():
        logits = backbone.forward(x)[0, span]
        logits[:, spec.mask_id] = float("-inf")
        masked = x[0, span] == spec.mask_id
        right = masked & (logits.argmax(-1) == target)
        calls += 1
        if not right.any():  # progress: the leftmost mask gets its reference token
            right[int(masked.nonzero()[0])] = True
            forced += 1
        x[0, span] = torch.where(right, target, x[0, span])
    return calls, forced


def problems_of(spec: str, gen_length: int, limit: int) -> list:
    """The first ``limit`` held-out problems (``.prompt``, ``.answer``) of a ``--tasks`` entry at
    ``gen_length``: arith/listops's test set, or trace's pool of budget class ``gen_length`` at the
    entry's ``dep_distance`` (default 1), the examples ``python -m eval task=trace`` runs."""
    name, opts = BENCH.parse_task_spec(spec)
    opts = dict(opts)
    if name in TASKS and not opts:
        return list(synthetic.test_problems(name)[:limit])
    if name == "trace" and set(opts) <= {"dep_distance"}:
        dep = int(opts.get("dep_distance", 1))
        trace.check_budget(gen_length)
        trace.check_dep_distance(gen_length, dep)
        return list(trace.test_problems(gen_length, dep, limit))
    raise ValueError(f"--tasks {spec!r}: valid: arith, listops, trace or trace:dep_distance=D")


def benchmark_tokens_per_call(out: Path, task: str, gen_length: int, model: str = "tiny") -> dict:
    """{sampler: tokens per call} of every registered sampler's preset run in a benchmark's output
    directory ``out`` (scripts/benchmark.py's layout; samplers without a run are left out)."""
    found = {}
    for name in BENCH.registered_samplers():
        summary = BENCH.Run(name, task, gen_length).run_dir(out, model) / SUMMARY
        if summary.exists():
            found[name] = json.loads(summary.read_text()).get("tokens_per_nfe")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", action="store_true",
                    help="the long proxy: defaults --tasks/--lengths/--model of scripts/benchmark.py --long")
    ap.add_argument("--tasks", nargs="+", default=None,
                    help="arith, listops, trace, trace:dep_distance=D (default arith listops)")
    ap.add_argument("--lengths", nargs="+", type=int, default=None, help="default 64 128 256")
    ap.add_argument("--limit", type=int, default=50, help="first N held-out problems per task")
    ap.add_argument("--model", default=None, help="embedded model preset: tiny (default) or tiny_long")
    ap.add_argument("--model-path", default=None, help="a checkpoint directory instead of the embedded one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--benchmark", type=Path, default=None,
                    help="a benchmark's output directory (scripts/benchmark.py --out) to compare tokens/call with")
    ap.add_argument("--target", default=BENCH.TARGET, help="the sampler whose room is reported")
    args = ap.parse_args(argv)
    long = BENCH.LONG_DEFAULTS
    args.tasks = args.tasks or (BENCH._csv(long["tasks"]) if args.long else list(TASKS))
    args.lengths = args.lengths or ([int(x) for x in BENCH._csv(long["lengths"])] if args.long else [64, 128, 256])
    args.model = args.model or (long["model"] if args.long else "tiny")
    if args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    try:
        for spec in args.tasks:
            for L in args.lengths:
                problems_of(spec, L, 1)
    except ValueError as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        bb = load_backbone(model_path(args.model_path, args.model), device=args.device)
    except CheckpointNotFound as e:
        ap.error(f"--model {args.model}: {e} (here: --model-path DIR)")
    tok, eos = bb.tokenizer, bb.spec.eos_id
    t0 = time.perf_counter()
    print("| task | L | problems | oracle calls/answer (mean, min-max) | teacher-forced commits/answer | "
          "oracle tokens/call | best competitor tokens/call | 3x that | oracle / best | "
          f"{args.target} tokens/call |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for L in args.lengths:
            problems = problems_of(task, L, args.limit)
            calls, forced, tokens = [], [], 0
            for prob in problems:
                ref = tok(prob.answer, add_special_tokens=False)["input_ids"] + [eos]
                c, f = oracle_calls(bb, chat_prompt_ids(tok, prob.prompt), ref, L)
                calls.append(c)
                forced.append(f)
                tokens += len(ref)
            per_call = tokens / sum(calls)
            best = mine = None
            if args.benchmark:
                tpc = benchmark_tokens_per_call(args.benchmark, task, L, args.model)
                mine = tpc.pop(args.target, None)
                if tpc:
                    best = max(tpc.items(), key=lambda kv: kv[1])
            cells = [task, str(L), str(len(problems)),
                     f"{statistics.mean(calls):.2f} ({min(calls)}-{max(calls)})", f"{statistics.mean(forced):.2f}",
                     f"{per_call:.2f}",
                     f"{best[1]:.2f} ({best[0]})" if best else "-", f"{3 * best[1]:.2f}" if best else "-",
                     f"{per_call / best[1]:.2f}x" if best else "-", f"{mine:.2f}" if mine else "-"]
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f}s; command: python scripts/oracle_floor.py {' '.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
