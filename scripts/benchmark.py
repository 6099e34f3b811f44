"""One invocation, every sampler side by side through the real harness, printed as tables.

    python scripts/benchmark.py                                   # every sampler, arith+listops, L 64/128/256
    python scripts/benchmark.py --samplers blockwise,fast_dllm,asynclane --lengths 64 --limit 20 --threads 2
    python scripts/benchmark.py --dry-run                         # the planned runs, as `python -m eval` lines
    python scripts/benchmark.py --threshold-sweep none --no-ablations   # the main table only
    python scripts/benchmark.py --batch-sizes 1,4,16 --threshold-sweep none --no-ablations   # + a batch sweep
    python scripts/benchmark.py --long --gpu-costs results/gpu_forward_cost/*.json --extra device=cuda   # issue 17

Runs in this process: each run's config is composed by Hydra from the package ``eval.conf``
(exactly what ``python -m eval KEY=VALUE ...`` composes) and handed to :func:`eval.runner.run`,
which writes ``samples.jsonl`` + ``summary.json`` into ``<out>/runs/<task>/<model>-<variant>-L<len>``
and caches the backbone, so the model loads once for the whole benchmark.  A rerun of the same
command resumes every run (the runner skips rows it already has).

Every sampler gets the same tasks, seed, example selection (``--limit``, first examples) and
generation lengths, and its own config defaults (no per-sampler tuning; ``--extra`` overrides are
applied to every run alike).  Runs:

- main: every ``--samplers`` entry x task x length;
- threshold sweep (issue 5): fast_dllm with ``sampler.threshold`` = each ``--threshold-sweep`` value;
- ablations (issue 6): asynclane with each mechanism (lane_batching, draft_reuse, cascade,
  compact_refresh) and speculation (speculate: the one-row path) switched off in turn;
- batch sweep (issue 19, ``--batch-sizes``, default ``1``: none): every ``--samplers`` entry x task
  x length x batch size (``batch_size``: prompts per generate call, left-padded), batch 1 always
  included (it is the main run).  A sampler whose class says ``can_batch = False`` decodes one
  prompt per call: its cells above batch 1 are not run, and the tables say so.  The main table,
  the threshold sweep and the ablations stay at batch 1.

A variant equal to a main run (fast_dllm at its default threshold, asynclane with everything on)
is that run, not a second one.  Tables (stdout and ``<out>/benchmark.md``, the command line on
top): per sampler x task x length accuracy, NFE per sample (sequential model calls), generated
tokens per model call, token-forwards per generated token (compute) and TPS; AsyncLane's ratio to
the best competitor on each metric (best in that metric's direction at the same task/length); the
fastest competitor per task/length by TPS and by NFE; the ablation table; the threshold table;
with a batch sweep, the batch table: per sampler x task x length x batch size accuracy, TPS, TPS over
the same sampler's at batch 1 and over the reference's at the same batch size, and how many
completions differ from batch 1 (at temperature 0 a batchable sampler should decode each prompt as
it does alone).  ``python -m eval.report`` outputs (markdown/LaTeX tables, CSV, plots; with a batch
sweep also ``tps_vs_batch.png``, TPS against batch size) go to ``<out>/report``.

Tasks are ``--tasks`` entries: a task's name, or ``NAME:KEY=VALUE[:KEY=VALUE]`` with task options
(``trace:dep_distance=7`` runs ``task=trace task.dep_distance=7``; its runs go under
``runs/trace-dep_distance7/``), shown as given in the tables.

``--long`` (issue 17) is the long-budget benchmark on the long proxy: by default ``trace`` at a strict
chain and at distant dependencies (``dep_distance`` 1 and 7, the largest every budget class allows),
budgets 256/512/1024, model ``tiny_long``, 50 examples, no threshold sweep, and of the ablations only
``speculate`` off, so asynclane appears twice (default and ``speculate=false``: what speculation gains
apart from asynchronous refinement); results into ``results/benchmark_long``; the projected GPU TPS
from ``results/gpu_forward_cost`` when those files exist.  Any of these can still be given.  With
``--traces`` (default on with ``--long``) asynclane's runs save their per-iteration traces, and the
tables gain, from them, how much of each answer a continuation lane produced while a refine lane to
its left was still open (``eval.timeline.lane_shares``), and a lane-timeline PNG of one answer at the
longest length (``<out>/timeline_*.png``).  With ``--long`` the tables end with issue 17's targets,
each judged on the table's numbers with by how much (:func:`long_targets`).

Runs go one after another (a run is every example of one cell), so load drift on the machine is
not spread evenly over cells; a batch sweep runs each task/length's batch sizes right after its
batch-1 runs.  At batch b the runner's warm-up (``warmup=1``) is the first generate call, b
examples: a cell needs ``--limit`` > b for a timed call.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

TARGET = "asynclane"
PREFERRED_ORDER = ["blockwise", "dream", "fast_dllm", "dparallel", "d3llm", "localleap", "adablock", "learn2pd", "dico",
                   "streaming_dllm", "window_diffusion", "freedave", "freedave_pp", "asynclane"]
ABLATION_SWITCHES = ("lane_batching", "draft_reuse", "cascade", "compact_refresh", "speculate")
DEFAULT_THRESHOLDS = "0.5,0.7,0.9,0.95"
SHORT_DEFAULTS = {"tasks": "arith,listops", "lengths": "64,128,256", "limit": "100", "model": "tiny",
                  "out": "results/benchmark", "threshold_sweep": DEFAULT_THRESHOLDS,
                  "ablation_switches": ",".join(ABLATION_SWITCHES)}
# --long (issue 17): every sampler on the long proxy at budgets 256/512/1024, a strict chain and distant
# dependencies (7: the farthest every budget class allows, so both distances run at every budget);
# asynclane twice (default, speculate=false): what speculation gains apart from asynchronous refinement
LONG_DEFAULTS = {"tasks": "trace:dep_distance=1,trace:dep_distance=7", "lengths": "256,512,1024", "limit": "50",
                 "model": "tiny_long", "out": "results/benchmark_long", "threshold_sweep": "none",
                 "ablation_switches": "speculate"}
LONG_GPU_COSTS = [Path("results/gpu_forward_cost/run1_iters10.json"), Path("results/gpu_forward_cost/run2_iters30.json")]
NO_BATCH = "n/a: decodes one prompt per call"  # a batch-sweep cell of a sampler with can_batch = False

# (key, column label, higher is better)
METRICS = [
    ("accuracy", "accuracy", True),
    ("nfe", "NFE/sample", False),
    ("tokens_per_call", "tokens/call", True),
    ("forwards_per_token", "token-fwd/token", False),
    ("tps", "TPS", True),
]
FMT = {"accuracy": ".3f", "nfe": ".1f", "tokens_per_call": ".2f", "forwards_per_token": ".1f", "tps": ".1f",
       "gpu_tps": ".0f"}
GPU_METRIC = ("gpu_tps", "proj. GPU TPS", True)  # added to METRICS when --gpu-costs is given


# ------------------------------------------------------------------ configs and the plan


def conf_dir() -> Path:
    spec = importlib.util.find_spec("eval.conf")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the package eval.conf is not importable; install the project (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0])


def registered_samplers() -> list[str]:
    """The sampler choices of the harness (every registered sampler), in a stable, readable order."""
    from eval.sampler_presets import sampler_names

    names = sampler_names()
    return [n for n in PREFERRED_ORDER if n in names] + [n for n in names if n not in PREFERRED_ORDER]


def sampler_defaults(name: str) -> dict:
    """The plain (non-interpolated) defaults of one sampler: its Config dataclass's."""
    from eval.sampler_presets import sampler_node

    return {k: v for k, v in sampler_node(name).items() if not (isinstance(v, str) and v.startswith("${"))}


def can_batch(name: str) -> bool:
    """Whether sampler ``name`` decodes several prompts per generate call: its class's ``can_batch``
    (the runner refuses ``batch_size`` > 1 otherwise)."""
    from asynclane.sampler import REGISTRY

    from eval.sampler_presets import sampler_names

    sampler_names()  # registers every sampler
    return bool(getattr(REGISTRY[name], "can_batch", True))


def parse_task_spec(spec: str) -> tuple[str, tuple]:
    """``--tasks`` entry ``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]`` (task options, e.g.
    ``trace:dep_distance=7``) -> (name, ((key, value), ...)); raises ValueError naming the fix."""
    name, *opts = spec.split(":")
    if not name:
        raise ValueError(f"--tasks: {spec!r} has no task name; give NAME or NAME:KEY=VALUE, e.g. trace:dep_distance=7")
    pairs = []
    for o in opts:
        k, eq, v = o.partition("=")
        if not eq or not k or not v:
            raise ValueError(f"--tasks: {spec!r}: task option {o!r} is not KEY=VALUE; e.g. trace:dep_distance=7")
        pairs.append((k, v))
    return name, tuple(pairs)


def task_dir(spec: str) -> str:
    """A task spec's folder name under ``runs/``: ``trace:dep_distance=7`` -> ``trace-dep_distance7``."""
    name, opts = parse_task_spec(spec)
    return "-".join([name] + [f"{k}{v}" for k, v in opts])


@dataclass(frozen=True)
class Run:
    sampler: str
    task: str  # a --tasks entry: the task's name, and its task options if any (parse_task_spec)
    length: int
    options: tuple = ()  # ((key, value), ...) sampler options that differ from the preset
    batch_size: int = 1  # prompts per generate call

    @property
    def variant(self) -> str:
        parts = [self.sampler]
        for k, v in self.options:
            parts.append(f"{k}{v}" if not isinstance(v, bool) else (k if v else f"no_{k}"))
        return "-".join(parts)

    def overrides(self, model: str, limit: Optional[int], seed: int, threads: Optional[int],
                  extra: Sequence[str]) -> list[str]:
        name, task_opts = parse_task_spec(self.task)
        ov = [f"model={model}", f"sampler={self.sampler}", f"task={name}", f"gen_length={self.length}",
              f"limit={'null' if limit is None else limit}", f"seed={seed}"]
        ov += [f"task.{k}={v}" for k, v in task_opts]
        if threads:
            ov.append(f"threads={threads}")
        if self.batch_size != 1:
            ov.append(f"batch_size={self.batch_size}")
        ov += [f"sampler.{k}={_ov_value(v)}" for k, v in self.options]
        return ov + list(extra)

    def run_dir(self, out: Path, model: str) -> Path:
        batch = f"-B{self.batch_size}" if self.batch_size != 1 else ""
        return Path(out) / "runs" / task_dir(self.task) / f"{model}-{self.variant}-L{self.length}{batch}"


def _ov_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


@dataclass
class Plan:
    main: list = field(default_factory=list)        # Run
    thresholds: dict = field(default_factory=dict)  # (task, L, threshold) -> Run
    ablations: dict = field(default_factory=dict)   # (task, L, switch or "full") -> Run
    batches: dict = field(default_factory=dict)     # (task, L, batch size, sampler) -> Run, None: cannot batch

    def runs(self) -> list[Run]:
        """Every distinct run, main ones first, each task/length's batch sweep right after its main
        runs (a variant equal to a main run appears once)."""
        sweep = [r for r in self.batches.values() if r is not None]
        keys = dict.fromkeys((r.task, r.length) for r in self.main)
        ordered = [r for key in keys for r in [*self.main, *sweep] if (r.task, r.length) == key]
        return list(dict.fromkeys([*ordered, *self.thresholds.values(), *self.ablations.values()]))

    def skipped(self) -> list[tuple]:
        """(task, L, batch size, sampler) of the batch-sweep cells not run: the sampler cannot batch."""
        return [k for k, r in self.batches.items() if r is None]


def _variant(sampler: str, task: str, L: int, opts: dict, defaults: dict) -> Run:
    """A Run whose options omit those equal to the preset: so equal configurations are equal Runs."""
    kept = tuple((k, v) for k, v in opts.items() if not (k in defaults and defaults[k] == v))
    return Run(sampler, task, L, kept)


def make_plan(samplers: Sequence[str], tasks: Sequence[str], lengths: Sequence[int], thresholds: Sequence[float],
              ablations: bool, defaults: Optional[dict] = None, batch_sizes: Sequence[int] = (1,),
              batchable=None, switches: Sequence[str] = ABLATION_SWITCHES) -> Plan:
    """The runs of one benchmark; ``defaults``: {sampler: preset defaults} (read from conf/ when None).

    ``batch_sizes`` other than just ``[1]`` add the batch sweep (every sampler x task x length x
    size; batch 1 is the main run); ``batchable(name) -> bool`` (default :func:`can_batch`) says
    which samplers may run above batch 1, the others' cells there are planned as None.  ``switches``:
    the ablations' mechanisms (each off in turn; default all of ABLATION_SWITCHES)."""
    defaults = defaults if defaults is not None else {}
    batchable = batchable or can_batch
    sweep = sorted(set(batch_sizes) | {1}) if set(batch_sizes) != {1} else []

    def d(name):
        if name not in defaults:
            defaults[name] = sampler_defaults(name)
        return defaults[name]

    plan = Plan()
    for task in tasks:
        for L in lengths:
            for s in samplers:
                plan.main.append(Run(s, task, L))
            for b in sweep:
                for s in samplers:
                    plan.batches[(task, L, b, s)] = Run(s, task, L, batch_size=b) if b == 1 or batchable(s) else None
            for t in thresholds:
                plan.thresholds[(task, L, t)] = _variant("fast_dllm", task, L, {"threshold": t}, d("fast_dllm"))
            if ablations:
                plan.ablations[(task, L, "full")] = Run(TARGET, task, L)
                for sw in switches:
                    plan.ablations[(task, L, sw)] = _variant(TARGET, task, L, {sw: False}, d(TARGET))
    return plan


def check_block_lengths(runs: Sequence[Run], defaults_of) -> list[str]:
    """Problems with block_length not dividing gen_length (the only constraint across samplers)."""
    bad = []
    for r in runs:
        b = dict(r.options).get("block_length", defaults_of(r.sampler).get("block_length"))
        if isinstance(b, int) and b > 0 and r.length % b:
            bad.append(f"{r.variant}: block_length {b} does not divide gen_length {r.length}")
    return sorted(set(bad))


# ------------------------------------------------------------------ metrics and tables (pure)


@dataclass(frozen=True)
class CallCost:
    """Per-call latency of an 8B-shape forward at batch 1: ``ms = base_ms + per_token_ms * tokens``.

    Fitted by least squares to ``scripts/bench_forward.py`` rows (every call kind, lane count and
    length; only the compiled rows when the file has any: the fastest forward a run can use) of one
    family: at batch 1 an 8B forward is bound by reading the weights, so the cost of a call grows
    only slowly with the query tokens it carries.  A run is charged, call by call, for the tokens
    each call carries (linear in tokens: the run's token-forwards over its NFE calls).
    """

    family: str
    base_ms: float
    per_token_ms: float
    device: str
    n_rows: int

    def ms(self, tokens: float) -> float:
        return self.base_ms + self.per_token_ms * tokens


def fit_call_cost(rows: Sequence[dict], family: str) -> CallCost:
    if any(r.get("compiled") for r in rows if r.get("family") == family):
        rows = [r for r in rows if r.get("compiled")]
    pts = [(float(r["query_tokens"]), float(r["ms"])) for r in rows if r.get("family") == family]
    if len(pts) < 2:
        raise ValueError(f"need at least two {family} rows to fit a call cost, got {len(pts)}")
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    device = next((r.get("device") for r in rows if r.get("family") == family), "?")
    return CallCost(family, my - slope * mx, slope, str(device), n)


def load_call_cost(paths: Sequence[Path], family: str) -> CallCost:
    """The cost model fitted to the rows of every file in ``paths`` (repeated runs pool their rows)."""
    import json

    rows = []
    for path in paths:
        try:
            rows += json.loads(Path(path).read_text()).get("rows", [])
        except FileNotFoundError:
            raise SystemExit(f"error: --gpu-costs {path}: no such file (write it with scripts/bench_forward.py)")
    families = sorted({str(r.get("family")) for r in rows})
    if family not in families:
        raise SystemExit(f"error: --gpu-costs {', '.join(map(str, paths))} has no rows for family {family!r}; "
                         f"it has {families}")
    return fit_call_cost(rows, family)


def projected_gpu_tps(nfe: Optional[float], forwards: Optional[float], gen_tokens: Optional[float],
                      cost: CallCost) -> Optional[float]:
    """Generated tokens per second if every model call of the run cost what it costs at 8B shape.

    nfe, forwards, gen_tokens: per-sample means (model calls, token-forwards, generated tokens).
    A call carries ``forwards / nfe`` tokens on average; sampler overhead outside calls is ignored.
    """
    if not nfe or forwards is None or gen_tokens is None:
        return None
    return gen_tokens / (nfe * cost.ms(forwards / nfe) / 1000.0)


def metrics(summary: dict, cost: Optional[CallCost] = None) -> dict:
    """The table metrics of one run's summary (``eval.rows.summarize`` + environment)."""
    def num(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    fwd, gen = num(summary.get("token_forwards_mean")), num(summary.get("gen_tokens_mean"))
    nfe = num(summary.get("nfe_mean"))
    out = {"accuracy": num(summary.get("accuracy")), "nfe": nfe,
           "tokens_per_call": num(summary.get("tokens_per_nfe")),
           "forwards_per_token": fwd / gen if fwd is not None and gen else None,
           "tps": num(summary.get("tps")), "n": summary.get("n"),
           "device_name": summary.get("device_name"), "device": summary.get("device")}
    if cost is not None:
        out["gpu_tps"] = projected_gpu_tps(nfe, fwd, gen, cost)
    return out


def active_metrics(results: dict) -> list:
    """METRICS, plus the projected GPU TPS when the results carry it."""
    return METRICS + ([GPU_METRIC] if any("gpu_tps" in m for m in results.values()) else [])


def best_competitor(cells: dict, metric: str, higher: bool, target: str = TARGET) -> Optional[tuple[str, float]]:
    """(sampler, value) of the competitor (any sampler but ``target``) with the best ``metric``.

    cells: {sampler: metrics}.  Best is the largest value when ``higher`` else the smallest;
    ties go to the first in ``cells`` order; samplers without the metric are skipped.
    """
    best = None
    for name, m in cells.items():
        v = m.get(metric)
        if name == target or v is None:
            continue
        if best is None or (v > best[1] if higher else v < best[1]):
            best = (name, v)
    return best


def tied_with(cells: dict, metric: str, best: Optional[tuple[str, float]], target: str = TARGET) -> list[str]:
    """Other competitors whose ``metric`` equals the best value."""
    if best is None:
        return []
    return [n for n, m in cells.items() if n not in (target, best[0]) and m.get(metric) == best[1]]


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _f(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _keys(results: dict) -> list[tuple[str, int]]:
    return list(dict.fromkeys((t, L) for t, L, _ in results))


def _cells(results: dict, task: str, L: int) -> dict:
    return {s: m for (t, l, s), m in results.items() if t == task and l == L}


def main_table(results: dict) -> str:
    """results: {(task, L, sampler): metrics}, in display order."""
    cols = active_metrics(results)
    header = ["task", "L", "sampler"] + [label for _, label, _ in cols]
    rows = [[t, L, s] + [_f(m.get(k), FMT[k]) for k, _, _ in cols] for (t, L, s), m in results.items()]
    return md_table(header, rows)


def ratio_rows(results: dict, target: str = TARGET) -> list[dict]:
    """Per task/length and metric: target's value, the best competitor and its value, the ratio."""
    out = []
    for task, L in _keys(results):
        cells = _cells(results, task, L)
        if target not in cells:
            continue
        for k, label, higher in active_metrics(results):
            best = best_competitor(cells, k, higher, target)
            mine = cells[target].get(k)
            out.append({"task": task, "L": L, "metric": k, "label": label, "higher": higher, "value": mine,
                        "best": best[0] if best else None, "tied": tied_with(cells, k, best, target),
                        "best_value": best[1] if best else None,
                        "ratio": ratio(mine, best[1]) if best else None})
    return out


def verdict(mine: Optional[float], best: Optional[float], higher: bool) -> Optional[str]:
    """"yes" when ``mine`` beats ``best`` in the metric's direction, "tie" when equal, else "no"."""
    if mine is None or best is None:
        return None
    if mine == best:
        return "tie"
    return "yes" if (mine > best) == higher else "no"


def ratio_table(results: dict, target: str = TARGET) -> str:
    rows = []
    for r in ratio_rows(results, target):
        better = verdict(r["value"], r["best_value"], r["higher"])
        rows.append([r["task"], r["L"], f"{r['label']} ({'higher' if r['higher'] else 'lower'} is better)",
                     _f(r["value"], FMT[r["metric"]]),
                     (r["best"] or "n/a") + (f" (tied: {', '.join(r['tied'])})" if r["tied"] else ""),
                     _f(r["best_value"], FMT[r["metric"]]),
                     _f(r["ratio"], ".2f") + ("x" if r["ratio"] is not None else ""), better or "n/a"])
    return md_table(["task", "L", "metric", target, "best competitor", "its value", f"{target} / best",
                     f"{target} better?"], rows)


def fastest_competitors(results: dict, target: str = TARGET) -> list[dict]:
    """Per task/length: the competitor with the highest TPS and the one with the fewest NFE."""
    out = []
    for task, L in _keys(results):
        cells = _cells(results, task, L)
        by_tps = best_competitor(cells, "tps", True, target)
        by_nfe = best_competitor(cells, "nfe", False, target)
        if by_tps is None and by_nfe is None:
            continue
        out.append({"task": task, "L": L, "by_tps": by_tps, "by_nfe": by_nfe})
    return out


def fastest_statements(results: dict, target: str = TARGET) -> list[str]:
    lines = []
    for r in fastest_competitors(results, target):
        tps = f"{r['by_tps'][0]} by TPS ({r['by_tps'][1]:.1f} tokens/s)" if r["by_tps"] else "none by TPS (n/a)"
        nfe = f"{r['by_nfe'][0]} by NFE ({r['by_nfe'][1]:.1f} model calls/sample)" if r["by_nfe"] else \
            "none by NFE (n/a)"
        lines.append(f"- {r['task']}, L={r['L']}: fastest competitor is {tps}; {nfe}")
    return lines


def ablation_table(ablations: dict) -> str:
    """ablations: {(task, L, switch or "full"): metrics}."""
    keys = ["accuracy", "nfe", "tokens_per_call", "forwards_per_token"]
    rows = []
    for (task, L, sw), m in ablations.items():
        name = f"{TARGET} (full)" if sw == "full" else f"{sw} off"
        rows.append([task, L, name] + [_f(m.get(k), FMT[k]) for k in keys])
    return md_table(["task", "L", "variant", "accuracy", "NFE/sample", "tokens/call", "token-fwd/token"], rows)


def long_targets(results: dict, target: str = TARGET) -> list[dict]:
    """Issue 17's targets for ``target`` on each task over its lengths (the longest is "the longest
    budget"): one dict per target with ``task``, ``target`` (its wording), ``measured`` (the numbers
    it is judged on) and ``met`` (True / False / None when a number is missing).

    - tokens per call >= 3x the best competitor's, at the longest length;
    - accuracy within 1 point of the best competitor's, at the longest length;
    - the fewest model calls (NFE) of all samplers at every length (a tie is not the fewest);
    - the gap growing with the length: the best competitor's NFE over ``target``'s rising from
      each length to the next."""
    out = []
    for task in dict.fromkeys(t for t, _, _ in results):
        lengths = sorted({L for t, L, _ in results if t == task})
        cells = {L: _cells(results, task, L) for L in lengths}
        if not all(target in c and len(c) > 1 for c in cells.values()):
            continue
        top = cells[lengths[-1]]
        mine = top[target]
        best_tpc = best_competitor(top, "tokens_per_call", True, target)
        r = ratio(mine.get("tokens_per_call"), best_tpc[1]) if best_tpc else None
        out.append({"task": task, "target": f"tokens/call >= 3x the best competitor's at L={lengths[-1]}",
                    "measured": f"{_f(mine.get('tokens_per_call'), '.2f')} vs {best_tpc[0] if best_tpc else 'n/a'} "
                                f"{_f(best_tpc[1] if best_tpc else None, '.2f')}: {_f(r, '.2f')}x",
                    "met": None if r is None else r >= 3})
        best_acc = best_competitor(top, "accuracy", True, target)
        gap = None if best_acc is None or mine.get("accuracy") is None else 100 * (best_acc[1] - mine["accuracy"])
        out.append({"task": task, "target": f"accuracy within 1 point of the best competitor's at L={lengths[-1]}",
                    "measured": f"{_f(mine.get('accuracy'), '.3f')} vs {best_acc[0] if best_acc else 'n/a'} "
                                f"{_f(best_acc[1] if best_acc else None, '.3f')}: {_f(gap, '+.1f')} points behind",
                    "met": None if gap is None else gap <= 1})
        gaps, fewest, parts = [], True, []
        for L in lengths:
            best_nfe = best_competitor(cells[L], "nfe", False, target)
            mine_nfe = cells[L][target].get("nfe")
            g = ratio(best_nfe[1], mine_nfe) if best_nfe else None
            gaps.append(g)
            fewest = fewest and g is not None and g > 1
            parts.append(f"L={L}: {_f(mine_nfe, '.1f')} vs {best_nfe[0] if best_nfe else 'n/a'} "
                         f"{_f(best_nfe[1] if best_nfe else None, '.1f')} ({_f(g, '.2f')}x)")
        known = None not in gaps
        out.append({"task": task, "target": "the fewest model calls of all samplers at every length",
                    "measured": "; ".join(parts), "met": fewest if known else None})
        rising = known and all(b > a for a, b in zip(gaps, gaps[1:]))
        out.append({"task": task, "target": "the NFE gap (best competitor's NFE / asynclane's) growing with the length",
                    "measured": " -> ".join(_f(g, ".2f") + "x" for g in gaps),
                    "met": (rising if len(gaps) > 1 else None) if known else None})
    return out


def targets_table(rows: list[dict]) -> str:
    return md_table(["task", "target", "measured", "met?"],
                    [[r["task"], r["target"], r["measured"], {True: "yes", False: "no", None: "n/a"}[r["met"]]]
                     for r in rows])


def lane_share_table(shares: dict) -> str:
    """shares: {(task, L, variant label): eval.timeline.run_lane_shares(...)} of the traced runs."""
    rows = []
    for (task, L, name), sh in shares.items():
        if sh is None:
            rows.append([task, L, name, "n/a (no lane records)", "", "", "", ""])
            continue
        rows.append([task, L, name, sh["examples"], sh["committed"], sh["gen"],
                     _f(sh["async_share"], ".3f"), _f(sh["overlap_share"], ".3f")])
    return md_table(["task", "L", "variant", "examples", "answer positions committed", "by continuation (GEN) lanes",
                     "async share", "overlap share"], rows)


LANE_SHARE_LEGEND = (
    "From the runs' per-iteration traces (`traces.jsonl`, `eval.timeline.lane_shares`): each answer position is "
    "credited to the lane that last committed it. async share: positions a continuation (GEN) lane committed while "
    "a refine lane opened before that call, starting left of the position, stayed open after it (decoding advanced "
    "past text whose refinement had not finished); overlap share: also counting those committed in the same call as "
    "such a refine lane's last step. Both over the answer positions (to the first EOS) a lane committed.")


def threshold_table(thresholds: dict) -> str:
    """thresholds: {(task, L, threshold): metrics}."""
    keys = ["accuracy", "nfe", "tokens_per_call", "forwards_per_token", "tps"]
    rows = [[task, L, t] + [_f(m.get(k), FMT[k]) for k in keys] for (task, L, t), m in thresholds.items()]
    return md_table(["task", "L", "fast_dllm threshold", "accuracy", "NFE/sample", "tokens/call", "token-fwd/token",
                     "TPS"], rows)


def count_differences(these: dict, batch1: dict) -> tuple[int, int]:
    """(examples whose completion differs, examples compared): ``{example_id: completion}`` of a run
    against the same sampler's batch-1 run, over the examples both hold."""
    common = [k for k in these if k in batch1]
    return sum(these[k] != batch1[k] for k in common), len(common)


def batch_rows(batches: dict, reference: Optional[str]) -> list[dict]:
    """One dict per batch-sweep cell: per task/length, each sampler (in ``batches`` order) at each size.

    batches: {(task, L, batch size, sampler): metrics, with ``differ`` = (differing, compared) from
    :func:`count_differences` above batch 1, or None for a sampler that cannot batch}.  ``vs_batch1``:
    TPS over the same sampler's at batch 1; ``vs_reference``: over ``reference``'s at the same size.
    """
    first = {k: i for i, k in enumerate(dict.fromkeys((t, L, s) for t, L, _, s in batches))}

    def display_order(item):
        (t, L, b, s), _ = item
        return first[(t, L, s)], b

    out = []
    for (task, L, b, s), m in sorted(batches.items(), key=display_order):
        if m is None:
            out.append({"task": task, "L": L, "batch": b, "sampler": s, "skipped": True})
            continue
        one, ref = batches.get((task, L, 1, s)), batches.get((task, L, b, reference))
        out.append({"task": task, "L": L, "batch": b, "sampler": s, "skipped": False, "accuracy": m.get("accuracy"),
                    "tps": m.get("tps"), "vs_batch1": ratio(m.get("tps"), one.get("tps")) if one else None,
                    "vs_reference": ratio(m.get("tps"), ref.get("tps")) if ref else None,
                    "differ": m.get("differ")})
    return out


def batch_table(batches: dict, reference: Optional[str]) -> str:
    """The batch sweep: accuracy, TPS and its ratios per task x length x sampler x batch size."""
    rows = []
    for r in batch_rows(batches, reference):
        head = [r["task"], r["L"], r["sampler"], r["batch"]]
        if r["skipped"]:
            rows.append(head + ["–", NO_BATCH, "–", "–", "–"])
            continue
        differ = "–" if r["batch"] == 1 else ("n/a" if r["differ"] is None else f"{r['differ'][0]}/{r['differ'][1]}")
        rows.append(head + [_f(r["accuracy"], FMT["accuracy"]), _f(r["tps"], FMT["tps"]),
                            _f(r["vs_batch1"], ".2f") + ("x" if r["vs_batch1"] is not None else ""),
                            _f(r["vs_reference"], ".2f") + ("x" if r["vs_reference"] is not None else ""), differ])
    return md_table(["task", "L", "sampler", "batch", "accuracy", "TPS", "TPS / batch 1",
                     f"TPS / {reference or 'reference'}", "completions ≠ batch 1"], rows)


def batch_section(batches: dict, reference: Optional[str]) -> list[str]:
    """The batch-sweep part of benchmark.md: legend, table and which samplers were not batched."""
    legend = ("batch: prompts per generate call (left-padded to the longest); TPS: generated tokens of every "
              "prompt per generate-second, the first generate call (batch examples) a warm-up; TPS / batch 1: "
              "over the same sampler's TPS at batch 1; "
              f"TPS / {reference or 'reference'}: over {reference or 'the reference'}'s at the same batch size; "
              "completions ≠ batch 1: examples whose completion differs from the batch-1 run's / examples "
              "compared (a sampler at temperature 0 should decode each prompt in a batch as it does alone).")
    parts = ["## Batch sweep", "", legend, "", batch_table(batches, reference), ""]
    alone = sorted({s for (_, _, b, s), m in batches.items() if m is None})
    if alone:
        parts += [f"Not run above batch 1, each decodes one prompt per call (its class sets "
                  f"`can_batch = False`): {', '.join(alone)}.", ""]
    return parts


def render(command: str, results: dict, ablations: dict, thresholds: dict, note: str = "",
           batches: Optional[dict] = None, reference: Optional[str] = None, shares: Optional[dict] = None,
           targets: bool = False) -> str:
    """The whole benchmark.md (also what is printed); ``batches``: see :func:`batch_rows`."""
    parts = ["# Benchmark", "", f"Command: `{command}`", ""]
    if note:
        parts += [note, ""]
    legend = ("NFE/sample: sequential model calls per generate call; tokens/call: generated tokens (to the "
              "first EOS, inclusive) per model call; token-fwd/token: token positions pushed through the model "
              "per generated token (compute); TPS: generated tokens per generate-second, warm-up excluded.")
    if batches:
        legend += " Every table but the batch sweep's is at batch 1 (one prompt per generate call)."
    if any("gpu_tps" in m for m in results.values()):
        legend += (" proj. GPU TPS: generated tokens per second if each of the run's model calls cost what an "
                   "8B-shape call carrying as many tokens costs on the GPU (cost model at the end).")
    parts += ["## Samplers side by side", "", legend, "", main_table(results), ""]
    if any(s == TARGET for _, _, s in results) and len({s for _, _, s in results}) > 1:
        parts += [f"## {TARGET} against the best competitor", "",
                  "Best = the competitor with the best value of that metric at the same task and length "
                  "(most accurate, fewest NFE, most tokens/call, fewest token-forwards/token, highest TPS).", "",
                  ratio_table(results), ""]
    rows = long_targets(results) if targets else []
    if rows:
        parts += [f"## Targets on the long proxy (issue 17), {TARGET}", "",
                  "Judged on this table's numbers: the best competitor per metric and length, as above; "
                  "the longest length run stands for the longest budget.", "", targets_table(rows), ""]
    fast = fastest_statements(results)
    if fast:
        parts += ["## Fastest competitor", "", *fast, ""]
    if batches:
        parts += batch_section(batches, reference)
    if ablations:
        parts += [f"## {TARGET} ablations (each mechanism off in turn)", "", ablation_table(ablations), ""]
    if shares:
        parts += [f"## {TARGET}: what continuation lanes produced while refinement was open", "", LANE_SHARE_LEGEND, "",
                  lane_share_table(shares), ""]
    if thresholds:
        parts += ["## fast_dllm threshold sweep", "", threshold_table(thresholds), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------ running


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_batch_sizes(text: str) -> list[int]:
    """``--batch-sizes``: a comma list of positive integers, returned sorted without repeats."""
    sizes = []
    for x in _csv(text):
        if not x.isdecimal() or int(x) < 1:
            raise ValueError(f"--batch-sizes: {x!r} is not a positive integer; give a comma list such as 1,4,16")
        sizes.append(int(x))
    if not sizes:
        raise ValueError(f"--batch-sizes: no batch size in {text!r}; give a comma list such as 1,4,16")
    return sorted(set(sizes))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", default=None, help="comma-separated (default: every registered sampler)")
    ap.add_argument("--long", action="store_true",
                    help="the long-budget benchmark (issue 17): its defaults are "
                         + "; ".join(f"--{k.replace('_', '-')} {v}" for k, v in LONG_DEFAULTS.items())
                         + "; asynclane traced (--traces)")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated NAME or NAME:KEY=VALUE[:KEY=VALUE] (task options, e.g. trace:dep_distance=7); "
                         "default: arith,listops")
    ap.add_argument("--lengths", default=None, help="gen_length values (default: 64,128,256)")
    ap.add_argument("--limit", default=None, help="examples per run, the first ones; 'null': whole pool (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="one seed for every run (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the harness's auto rule, threads=null)")
    ap.add_argument("--model", default=None, help="model preset (default tiny)")
    ap.add_argument("--out", type=Path, default=None, help="default results/benchmark")
    ap.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides passed to every run alike (e.g. device=cuda batch_size=1)")
    ap.add_argument("--threshold-sweep", default=None,
                    help=f"fast_dllm thresholds (default {DEFAULT_THRESHOLDS}); 'none' skips the sweep")
    ap.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True,
                    help="asynclane with each mechanism off in turn (default on; --no-ablations skips)")
    ap.add_argument("--ablation-switches", default=None, metavar="S,S,...",
                    help=f"which mechanisms the ablations switch off (default: {','.join(ABLATION_SWITCHES)})")
    ap.add_argument("--traces", action=argparse.BooleanOptionalAction, default=None,
                    help="asynclane runs (and its ablations) save per-iteration traces: the lane-share table and a "
                         "lane timeline PNG of one answer at the longest length (default: on with --long)")
    ap.add_argument("--gpu-costs", type=Path, nargs="+", default=None, metavar="FILE",
                    help="scripts/bench_forward.py output(s), rows pooled: add a projected GPU TPS at 8B shape")
    ap.add_argument("--gpu-family", default="llada", help="which family's rows of --gpu-costs to use (default llada)")
    ap.add_argument("--batch-sizes", default="1", metavar="B,B,...",
                    help="batch sweep: prompts per generate call, e.g. 1,4,16 (default 1: no sweep); every "
                         "sampler x task x length runs at each size, batch 1 always included; samplers whose class "
                         "sets can_batch = False are reported as n/a above batch 1")
    ap.add_argument("--reference", default=None,
                    help="eval.report's speedup reference, and the batch table's if a sampler name (default: "
                         "blockwise if run)")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs only")
    a = ap.parse_args(argv)
    preset = {**SHORT_DEFAULTS, **(LONG_DEFAULTS if a.long else {})}
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, Path(v) if k == "out" else v)
    if a.traces is None:
        a.traces = a.long
    if a.gpu_costs is None and a.long:
        a.gpu_costs = [p for p in LONG_GPU_COSTS if p.exists()] or None
    known = registered_samplers()
    a.samplers = _csv(a.samplers) if a.samplers else known
    bad = [s for s in a.samplers if s not in known]
    if bad:
        ap.error(f"unknown sampler(s) {bad}; registered: {', '.join(known)}")
    a.tasks = _csv(a.tasks)
    a.ablation_switches = _csv(a.ablation_switches)
    bad = [x for x in a.ablation_switches if x not in ABLATION_SWITCHES]
    if bad:
        ap.error(f"--ablation-switches: unknown {bad}; valid: {', '.join(ABLATION_SWITCHES)}")
    try:
        for t in a.tasks:
            parse_task_spec(t)
        a.lengths = [int(x) for x in _csv(a.lengths)]
        a.thresholds = [] if a.threshold_sweep.strip().lower() in ("", "none") else \
            [float(x) for x in _csv(a.threshold_sweep)]
        a.limit = None if str(a.limit).lower() in ("null", "none") else int(a.limit)
        a.batch_sizes = parse_batch_sizes(a.batch_sizes)
    except ValueError as e:
        ap.error(str(e))
    if not a.samplers or not a.tasks or not a.lengths:
        ap.error("need at least one sampler, task and length")
    if a.batch_sizes != [1] and any(e.split("=")[0].lstrip("+~") == "batch_size" for e in a.extra):
        ap.error("give batch sizes with --batch-sizes, not --extra batch_size=...")
    return a


def command_line(argv: Sequence[str], script: str = "scripts/benchmark.py") -> str:
    return shlex.join(["python", script, *argv])


def completions(run_dir: Path, fingerprint: Optional[str]) -> dict:
    """{example_id: completion} of one run's rows (those of its configuration: ``fingerprint``)."""
    from eval.rows import SAMPLES, read_rows

    out: dict = {}
    for r in read_rows(Path(run_dir) / SAMPLES):
        if r.get("fingerprint") == fingerprint:
            out.setdefault(r["example_id"], r.get("completion"))
    return out


def not_batched_line(plan: Plan) -> Optional[str]:
    skipped = sorted({s for _, _, _, s in plan.skipped()})
    if not skipped:
        return None
    return f"not run above batch 1 ({NO_BATCH}; can_batch = False): {', '.join(skipped)}"


def traced_runs(plan: Plan) -> dict:
    """{(task, L, variant label): Run} of the target's runs (the main one and its ablations) that
    ``--traces`` traces, in plan order."""
    out = {}
    for r in plan.main:
        if r.sampler == TARGET:
            out[(r.task, r.length, f"{TARGET} (full)")] = r
    for (task, L, sw), r in plan.ablations.items():
        if sw != "full":
            out[(task, L, f"{sw} off")] = r
    return out


def lane_shares_of(plan: Plan, out: Path, model: str) -> tuple[dict, Optional[Path]]:
    """The lane-share table's cells of the traced runs, and the lane timeline PNG of the first traced
    example of the target's full run at the longest length of the first task (None without one)."""
    from eval.timeline import load_trace, plot_lane_timeline, run_lane_shares

    shares, runs = {}, traced_runs(plan)
    for key, r in runs.items():
        try:
            shares[key] = run_lane_shares(r.run_dir(out, model))
        except FileNotFoundError:  # rows from an earlier, untraced run: nothing traced anew
            shares[key] = None
    full = [r for (_, _, name), r in runs.items() if name == f"{TARGET} (full)"]
    if not full:
        return shares, None
    first = full[0].task
    r = max((r for r in full if r.task == first), key=lambda r: r.length)
    try:
        ex, trace, _ = load_trace(r.run_dir(out, model))
        png = Path(out) / f"timeline_{task_dir(r.task)}-L{r.length}-{ex}.png"
        return shares, plot_lane_timeline(trace, png, title=f"{model} / {TARGET}, {r.task}, L={r.length}: {ex}")
    except (FileNotFoundError, KeyError, ValueError):
        return shares, None


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def main(argv=None) -> int:
    script = sys.argv[0] if argv is None and sys.argv[0].endswith(".py") else "scripts/benchmark.py"
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    cmd = command_line(argv, script)
    defaults: dict = {}
    plan = make_plan(a.samplers, a.tasks, a.lengths, a.thresholds, a.ablations, defaults, a.batch_sizes,
                     switches=a.ablation_switches)
    runs = plan.runs()
    skipped = not_batched_line(plan)

    def ov(r: Run) -> list[str]:
        traced = ["save_traces=true"] if a.traces and r.sampler == TARGET else []
        return r.overrides(a.model, a.limit, a.seed, a.threads, a.extra) + traced

    problems = check_block_lengths(runs, lambda s: defaults.setdefault(s, sampler_defaults(s)))
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if a.dry_run:
        print(f"# {cmd}\n# {len(runs)} runs into {a.out / 'runs'}; report into {a.out / 'report'}")
        if skipped:
            print(f"# {skipped}")
        for r in runs:
            print(shlex.join(["python", "-m", "eval", *ov(r), f"hydra.run.dir={r.run_dir(a.out, a.model)}"]))
        return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from asynclane import CheckpointNotFound

    from eval.runner import UsageError, run

    if skipped:
        print(skipped, file=sys.stderr, flush=True)
    summaries: dict[Run, dict] = {}
    t_all = time.perf_counter()
    for i, r in enumerate(runs, 1):
        t0 = time.perf_counter()
        name = r.variant + (f" batch={r.batch_size}" if r.batch_size != 1 else "")
        try:
            cfg = compose(ov(r))
            summaries[r] = run(cfg, r.run_dir(a.out, a.model))
        except (UsageError, CheckpointNotFound) as e:
            print(f"error: {name} {r.task} L={r.length}: {e}", file=sys.stderr)
            return 2
        s = summaries[r]
        print(f"[{i}/{len(runs)}] {r.task} L={r.length} {name}: n={s['n']} accuracy={_f(s['accuracy'], '.3f')} "
              f"NFE={_f(s.get('nfe_mean'), '.1f')} TPS={_f(s.get('tps'), '.1f')} ({time.perf_counter() - t0:.1f}s)",
              file=sys.stderr, flush=True)

    cost = load_call_cost(a.gpu_costs, a.gpu_family) if a.gpu_costs else None
    results = {(r.task, r.length, r.sampler): metrics(summaries[r], cost) for r in plan.main}
    ablations = {k: metrics(summaries[r]) for k, r in plan.ablations.items()}
    thresholds = {k: metrics(summaries[r]) for k, r in plan.thresholds.items()}
    batches = {}
    for (task, L, b, s_), r in plan.batches.items():
        batches[(task, L, b, s_)] = None if r is None else metrics(summaries[r])
        if r is not None and b != 1:
            one = Run(s_, task, L)
            batches[(task, L, b, s_)]["differ"] = count_differences(
                completions(r.run_dir(a.out, a.model), summaries[r].get("fingerprint")),
                completions(one.run_dir(a.out, a.model), summaries[one].get("fingerprint")))
    from eval.report import DEFAULT_REFERENCE, write_report

    default_ref = DEFAULT_REFERENCE if DEFAULT_REFERENCE in a.samplers else None  # eval.report's default, if run
    ref = a.reference or default_ref
    batch_ref = a.reference if a.reference in a.samplers else (default_ref or sorted(a.samplers)[0])
    first = summaries[runs[0]]
    note = (f"Model `{a.model}`, seed {a.seed}, the first {a.limit if a.limit is not None else 'all'} examples per "
            f"task, the same for every sampler; each sampler's preset defaults; overrides for all: "
            f"`{' '.join(a.extra) or 'none'}`. Device: {first.get('device_name')} ({first.get('device')}, "
            f"{first.get('threads', first.get('cpu_threads'))} CPU threads). {len(runs)} runs, {time.perf_counter() - t_all:.0f}s. "
            f"Run directories: `{a.out / 'runs'}`; eval.report outputs: `{a.out / 'report'}`.")
    shares, timeline = (lane_shares_of(plan, a.out, a.model) if a.traces else ({}, None))
    text = render(cmd, results, ablations, thresholds, note, batches, batch_ref, shares, targets=a.long)
    if timeline:
        text += f"\nLane timeline of one answer: `{timeline}`\n"
    if cost is not None:
        text += (f"\nCost model for proj. GPU TPS: `{' '.join(map(str, a.gpu_costs))}` ({cost.n_rows} {cost.family} rows, {cost.device}, "
                 f"random bf16 weights, batch 1), least-squares fit ms = {cost.base_ms:.2f} + "
                 f"{cost.per_token_ms:.4f} x tokens carried by the call.\n")

    files = write_report([r.run_dir(a.out, a.model) for r in runs], a.out / "report", ref, cmd)
    text += f"\neval.report outputs: {', '.join(f'`{v}`' for v in files.values())}\n"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "benchmark.md").write_text(text)
    print(text)
    print(f"wrote {a.out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
