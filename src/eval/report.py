"""`python -m eval.report RUN_OR_SWEEP_DIR... [--reference SAMPLER] [--out DIR]`: tables and plots from rows.

Gathers every ``samples.jsonl`` under the given paths (recursively) into one pandas frame of rows,
groups it by (model, sampler variant, task, gen_length) and aggregates each group with
:func:`eval.rows.summarize`, the very function that writes a run's ``summary.json``: a table
cell is a group-by of rows, never a number computed elsewhere.  Writes into ``--out`` (default
``<first path>/report/``):

- ``table.md``  markdown: rows = samplers, one column per task x generation length, each cell
  ``accuracy % / TPS (speedup over the reference) / NFE``;
- ``table.tex`` the same in the papers' layout (booktabs; column groups task x length with
  sub-columns Acc, TPS, Speedup, NFE);
- ``grouped.csv`` the whole grouped frame (n, accuracy and the task's other scores, tps,
  tps_budget, nfe_mean, tokens_per_nfe, gen_tokens_mean, seconds_mean, speedup, pareto, ...);
- ``accuracy_vs_tps.png`` one point per sampler per length, one panel per (model, task), the
  Pareto front (higher accuracy and higher TPS) ringed and joined;
- ``tps_vs_length.png`` TPS against generation length, one line per sampler.

Batch sweeps: when the gathered rows hold more than one ``batch_size`` (prompts per generate
call), each (sampler variant, batch size) is its own method, labelled ``blockwise [batch 4]``,
in every table and plot above; ``speedup`` is over the reference at the same batch size, and
grouped.csv gains ``batch_size``, ``base_method`` (the label without the batch) and
``speedup_vs_batch1`` (TPS over the same variant's at batch 1).  One more plot:
``tps_vs_batch.png``, TPS against batch size (log2 axis), one line per sampler variant, one
panel per (model, task, generation length).  Rows of a single batch size read as before.

Sampler variants: runs of one sampler with different options (``sampler.threshold=0.7,0.9``)
are told apart by the options that differ among the gathered rows, e.g.
``fast_dllm (threshold=0.7)``; where one value of an option is the usual one among the variants
(an ablation), only the departures are named (``asynclane (cascade=False)``, and the variant with
the usual values is plain ``asynclane``).  Rows are deduplicated by (fingerprint, example_id); rows of
every fingerprint in a file count (a run's ``summary.json`` covers only its current
``limit``), so point the report at directories holding the runs you mean to compare.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from .rows import SAMPLES, SUMMARY, read_rows, summarize

log = logging.getLogger(__name__)

GROUP = ["model", "method", "task", "gen_length"]
DEFAULT_REFERENCE = "blockwise"


# ------------------------------------------------------------------ gathering


def gather(paths: Sequence[Path]) -> pd.DataFrame:
    """Rows of every ``samples.jsonl`` under ``paths`` (files or directories), one frame.

    Adds ``run_dir`` and ``method`` (the sampler, plus the options that tell its variants apart);
    rows lacking ``sampler_options`` (older runs) take them from the run's ``.hydra/config.yaml``.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob(SAMPLES)))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    rows = []
    for f in dict.fromkeys(f.resolve() for f in files):
        fallback = None
        for r in read_rows(f):
            if "sampler_options" not in r:
                if fallback is None:
                    fallback = _options_from_config(f.parent)
                r["sampler_options"] = fallback
            r["run_dir"] = str(f.parent)
            rows.append(r)
    if not rows:
        raise SystemExit(f"no rows: no {SAMPLES} under {', '.join(map(str, paths))}")
    df = pd.DataFrame(rows)
    key = ["fingerprint", "example_id"] if "fingerprint" in df else ["run_dir", "example_id"]
    dups = df.duplicated(key)
    if dups.any():
        log.warning("%d duplicate rows (same fingerprint and example) ignored", int(dups.sum()))
        df = df[~dups]
    df["method"] = method_labels(df)
    df["task"] = task_labels(df)
    # a row's batch size (rows older than the field were batch 1); a sweep of several sizes keeps
    # each size apart: the batch joins the method label, the label without it is base_method
    sizes = df["batch_size"].fillna(1).astype(int) if "batch_size" in df else pd.Series(1, index=df.index)
    if sizes.nunique() > 1:
        df["batch_size"] = sizes
        df["base_method"] = df["method"]
        df["method"] = [batch_label(m, b) for m, b in zip(df["base_method"], sizes)]
    return df.reset_index(drop=True)


def task_labels(df: pd.DataFrame) -> pd.Series:
    """The task column: the task's name, and ``name[variant]`` for a task whose rows hold several
    ``task_variant`` values (e.g. ``trace[dep_distance=1]`` and ``trace[dep_distance=7]``), so
    different example sets never share a cell."""
    if "task_variant" not in df:
        return df["task"]
    variants = df["task_variant"].fillna("").astype(str)
    several = {t for t, g in variants.groupby(df["task"]) if g.nunique() > 1}
    return pd.Series([f"{t}[{v}]" if t in several and v else t for t, v in zip(df["task"], variants)],
                     index=df.index)


def batch_label(method: str, batch_size: int) -> str:
    """The method label of one batch size in a batch sweep: ``blockwise [batch 4]``."""
    return f"{method} [batch {int(batch_size)}]"


def is_batch_sweep(frame: pd.DataFrame) -> bool:
    """Whether a gathered or grouped frame holds several batch sizes (see :func:`gather`)."""
    return "base_method" in frame


def _options_from_config(run_dir: Path) -> dict:
    for name in (".hydra/config.yaml", SUMMARY):
        p = run_dir / name
        if p.exists():
            if name == SUMMARY:
                cfg = json.loads(p.read_text()).get("config", {})
            else:
                from omegaconf import OmegaConf

                try:
                    cfg = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
                except Exception:  # an unresolvable interpolation: fall through to the summary
                    continue
            opts = dict(cfg.get("sampler") or {})
            return {k: v for k, v in opts.items() if k not in ("name", "gen_length")}
    return {}


def method_labels(df: pd.DataFrame) -> pd.Series:
    """``sampler`` plus ``(k=v, ...)`` for the options that vary among that sampler's rows."""
    opts = df["sampler_options"].map(lambda o: o if isinstance(o, dict) else {})
    labels = pd.Series(df["sampler"].astype(str).values, index=df.index)
    for name in df["sampler"].unique():
        sel = df["sampler"] == name
        seen = [json.dumps(o, sort_keys=True, default=str) for o in opts[sel]]
        if len(set(seen)) < 2:
            continue
        keys = sorted({k for o in opts[sel] for k in o})
        # an option varies when two variants that both have it disagree (a key missing from some
        # rows, say one that a newer version added, is no difference by itself)
        varying = [k for k in keys if len({json.dumps(o[k], default=str) for o in opts[sel] if k in o}) > 1]
        if not varying:
            continue
        variants = {json.dumps(o, sort_keys=True, default=str): o for o in opts[sel]}.values()
        usual = {k: _unique_mode([json.dumps(v.get(k), default=str) for v in variants]) for k in varying}

        def label(o, keys):
            shown = [k for k in keys if usual[k] is None or json.dumps(o.get(k), default=str) != usual[k]]
            return name + (" (" + ", ".join(f"{k}={_fmt_opt(o.get(k))}" for k in shown) + ")" if shown else "")

        # name each variant by where it departs from the usual value (an ablation: "cascade=False");
        # keys without a unique usual value (a sweep) are always shown; if two variants would then
        # read alike, show every varying option
        short = {json.dumps(o, sort_keys=True, default=str): label(o, varying) for o in variants}
        if len(set(short.values())) < len(short):
            usual = {k: None for k in varying}
        labels[sel] = [label(o, varying) for o in opts[sel]]
    return labels


def _unique_mode(values: list):
    """The most common value when it is strictly the most common, else None."""
    counts = pd.Series(values).value_counts()
    return counts.index[0] if len(counts) == 1 or counts.iloc[0] > counts.iloc[1] else None


def _fmt_opt(v) -> str:
    return "null" if v is None else str(v)


# ------------------------------------------------------------------ the grouped frame


def group(df: pd.DataFrame, reference: Optional[str] = None) -> pd.DataFrame:
    """One row per (model, method, task, gen_length): :func:`summarize` of its rows, plus
    ``speedup`` (tps over the reference method's tps in the same model/task/gen_length) and
    ``pareto`` (on the accuracy-TPS front of its model/task).

    A batch sweep (:func:`is_batch_sweep`): the reference is resolved among the labels without
    the batch, ``speedup`` compares methods at the same batch size, and ``speedup_vs_batch1`` is
    each method's TPS over its own at batch 1."""
    sweep = is_batch_sweep(df)
    out = []
    for key, g in df.groupby(GROUP, sort=True):
        g = g.dropna(axis=1, how="all")  # another task's score columns
        s = summarize(g.to_dict("records"))
        s.pop("conventions", None)
        extra = {"base_method": g["base_method"].iloc[0], "batch_size": int(g["batch_size"].iloc[0])} if sweep else {}
        out.append({**dict(zip(GROUP, key)), "sampler": g["sampler"].iloc[0], **extra, **s})
    grouped = pd.DataFrame(out)
    base = "base_method" if sweep else "method"
    ref = resolve_reference(grouped.assign(method=grouped[base]), reference)
    grouped["reference"] = ref
    cell = ["model", "task", "gen_length"] + (["batch_size"] if sweep else [])
    grouped["speedup"] = _tps_ratio(grouped, grouped[grouped[base] == ref], cell)
    if sweep:
        grouped["speedup_vs_batch1"] = _tps_ratio(grouped, grouped[grouped["batch_size"] == 1],
                                                  ["model", "base_method", "task", "gen_length"])
    grouped["pareto"] = False
    for _, g in grouped.groupby(["model", "task"]):
        grouped.loc[g.index, "pareto"] = pareto_front(g["tps"].tolist(), g["accuracy"].tolist())
    order = method_order(grouped[base].unique().tolist(), ref)
    grouped["_o"] = grouped[base].map(order.index)
    grouped = grouped.sort_values(["model", "task", "gen_length", "_o"] + (["batch_size"] if sweep else []))
    return grouped.drop(columns="_o").reset_index(drop=True)


def _tps_ratio(grouped: pd.DataFrame, base: pd.DataFrame, keys: list[str]) -> list[float]:
    """Each row's tps over the tps of the ``base`` row with the same ``keys`` (NaN when either is missing)."""
    base_tps = base.set_index(keys)["tps"]
    out = []
    for k, t in zip(grouped[keys].itertuples(index=False, name=None), grouped["tps"]):
        b = base_tps.get(k)
        out.append(t / b if not _nan(t) and not _nan(b) and b != 0 else float("nan"))
    return out


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def resolve_reference(grouped: pd.DataFrame, reference: Optional[str]) -> Optional[str]:
    """The reference method: an exact method label, or a sampler name.

    A sampler name with several variants: named explicitly, it is an error (name one); by default
    (``blockwise``, else the alphabetically first sampler) the variant present in the most
    (model, task, gen_length) cells wins, ties going to the first label alphabetically.
    """
    methods = sorted(grouped["method"].unique())
    want = reference or (DEFAULT_REFERENCE if DEFAULT_REFERENCE in set(grouped["sampler"])
                         else sorted(grouped["sampler"].unique())[0])
    if want in methods:
        return want
    variants = sorted(set(grouped.loc[grouped["sampler"] == want, "method"]))
    if len(variants) == 1 or (variants and reference is None):
        cells = grouped[grouped["method"].isin(variants)].groupby("method").size()
        return sorted(variants, key=lambda m: (-cells[m], m))[0]
    if variants:
        raise SystemExit(f"--reference {reference!r} has several variants; name one of: " + "; ".join(variants))
    raise SystemExit(f"--reference {reference!r} is not among the gathered samplers: " + "; ".join(methods))


def method_order(methods: list[str], reference: Optional[str]) -> list[str]:
    """The reference first, then by label with numbers in numeric order (steps=16 before steps=128)."""
    def natural(m: str):
        return [(0, float(p), "") if re.fullmatch(r"\d+(\.\d+)?", p) else (1, 0.0, p)
                for p in re.split(r"(\d+(?:\.\d+)?)", m) if p]
    return sorted(methods, key=lambda m: (m != reference, natural(m)))


def grouped_method_order(grouped: pd.DataFrame) -> list[str]:
    """The method labels of a grouped frame in display order: :func:`method_order`, and in a batch
    sweep each variant's batch sizes together, smallest first (the reference's first)."""
    ref = grouped["reference"].iloc[0]
    if not is_batch_sweep(grouped):
        return method_order(grouped["method"].unique().tolist(), ref)
    order = method_order(grouped["base_method"].unique().tolist(), ref)
    pairs = {(order.index(b), int(n), m) for b, n, m in zip(grouped["base_method"], grouped["batch_size"],
                                                             grouped["method"])}
    return [m for _, _, m in sorted(pairs)]


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[bool]:
    """True where no other point has x >= and y >= with one of them strictly greater (missing x: False)."""
    pts = [(a, b) for a, b in zip(x, y)]
    front = []
    for i, (a, b) in enumerate(pts):
        if _nan(a) or _nan(b):
            front.append(False)
            continue
        dominated = any(not (_nan(c) or _nan(d)) and c >= a and d >= b and (c > a or d > b)
                        for j, (c, d) in enumerate(pts) if j != i)
        front.append(not dominated)
    return front


# ------------------------------------------------------------------ tables


def _row_label(grouped: pd.DataFrame, model: str, method: str) -> str:
    return f"{model} / {method}" if grouped["model"].nunique() > 1 else method


def _columns(grouped: pd.DataFrame) -> list[tuple[str, int]]:
    return sorted({(t, int(L)) for t, L in zip(grouped["task"], grouped["gen_length"])})


def _rows(grouped: pd.DataFrame) -> list[tuple[str, str]]:
    order = grouped_method_order(grouped)
    pairs = {(m, meth) for m, meth in zip(grouped["model"], grouped["method"])}
    return sorted(pairs, key=lambda p: (p[0], order.index(p[1])))


def _cell(grouped, model, method, task, L) -> Optional[pd.Series]:
    sel = grouped[(grouped["model"] == model) & (grouped["method"] == method) & (grouped["task"] == task)
                  & (grouped["gen_length"] == L)]
    return None if sel.empty else sel.iloc[0]


def _f(v, spec: str, suffix: str = "") -> str:
    return "–" if _nan(v) else format(v, spec) + suffix


def markdown_table(grouped: pd.DataFrame) -> str:
    cols = _columns(grouped)
    lines = ["| Sampler | " + " | ".join(f"{t} L={L}" for t, L in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for model, method in _rows(grouped):
        cells = []
        for t, L in cols:
            c = _cell(grouped, model, method, t, L)
            cells.append("" if c is None else
                         f"{_f(100 * c['accuracy'], '.1f')} / {_f(c['tps'], '.1f')} "
                         f"({_f(c['speedup'], '.2f', '×')}) / {_f(c['nfe_mean'], '.1f')}")
        lines.append(f"| {_row_label(grouped, model, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tex(s: str) -> str:
    table = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(table.get(ch, ch) for ch in s)


def latex_table(grouped: pd.DataFrame, caption: str = "") -> str:
    cols = _columns(grouped)
    sub = ["Acc", "TPS", "Speedup", "NFE"]
    spec = "l" + " ".join("r" * len(sub) for _ in cols)
    head1 = " & ".join(rf"\multicolumn{{{len(sub)}}}{{c}}{{{_tex(t)}, $L={L}$}}" for t, L in cols)
    rules = " ".join(rf"\cmidrule(lr){{{2 + i * len(sub)}-{1 + (i + 1) * len(sub)}}}" for i in range(len(cols)))
    head2 = " & ".join(" & ".join(sub) for _ in cols)
    out = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        out.append(rf"\caption{{{_tex(caption)}}}")
    out += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", rf" & {head1} \\", rules, rf"Sampler & {head2} \\",
            r"\midrule"]
    for model, method in _rows(grouped):
        cells = []
        for t, L in cols:
            c = _cell(grouped, model, method, t, L)
            if c is None:
                cells += ["--"] * len(sub)
            else:
                cells += [_f(100 * c["accuracy"], ".1f").replace("–", "--"), _f(c["tps"], ".1f").replace("–", "--"),
                          _f(c["speedup"], ".2f", r"$\times$").replace("–", "--"),
                          _f(c["nfe_mean"], ".1f").replace("–", "--")]
        out.append(f"{_tex(_row_label(grouped, model, method))} & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ plots


def _panels(grouped: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted({(m, t) for m, t in zip(grouped["model"], grouped["task"])})


def _styles(grouped: pd.DataFrame):
    import matplotlib

    methods = grouped_method_order(grouped)
    if len(methods) <= 10:
        cmap, n = matplotlib.colormaps["tab10"], 10
    else:  # distinct colours up to 20 methods (dark/light pairs), then they repeat
        cmap, n = matplotlib.colormaps["tab20"], 20
    colors = {m: cmap(i % n) for i, m in enumerate(methods)}
    lengths = sorted(int(L) for L in grouped["gen_length"].unique())
    marks = "osD^vP*Xh<>"
    markers = {L: marks[i % len(marks)] for i, L in enumerate(lengths)}
    return methods, colors, lengths, markers


def _wrap(label: str, width: int = 38) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width, subsequent_indent="  ", break_on_hyphens=False)) or label


def _figsize(n_panels: int, labels: list[str], extra_entries: int = 5) -> tuple[float, float]:
    lines = [line for lab in labels for line in _wrap(lab).splitlines()]
    longest = max((len(line) for line in lines), default=10)
    # tall enough for the legend: its lines plus the length markers and the front
    return 4.6 * n_panels + 0.6 + 0.075 * longest, max(4.2, 0.24 * (len(lines) + extra_entries) + 0.6)


def _panel_figure(grouped: pd.DataFrame):
    """pyplot, the figure, its (1, n) axes, the (model, task) panels and the method/length styles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(grouped)
    styles = _styles(grouped)
    fig, axes = plt.subplots(1, len(panels), figsize=_figsize(len(panels), styles[0]), squeeze=False,
                             constrained_layout=True)
    return plt, fig, axes, panels, styles


def plot_accuracy_vs_tps(grouped: pd.DataFrame, path: Path) -> None:
    from matplotlib.lines import Line2D

    plt, fig, axes, panels, (methods, colors, lengths, markers) = _panel_figure(grouped)
    for ax, (model, task) in zip(axes[0], panels):
        g = grouped[(grouped["model"] == model) & (grouped["task"] == task)].dropna(subset=["tps"])
        for _, r in g.iterrows():
            ax.scatter(r["tps"], 100 * r["accuracy"], color=colors[r["method"]], marker=markers[int(r["gen_length"])],
                       s=55, zorder=3, edgecolors="white", linewidths=0.6, clip_on=False)
        front = g[g["pareto"]].sort_values("tps")
        if len(front):
            ax.plot(front["tps"], 100 * front["accuracy"], color="0.4", lw=1, ls="--", zorder=2, clip_on=False)
            ax.scatter(front["tps"], 100 * front["accuracy"], s=170, facecolors="none", edgecolors="0.2",
                       linewidths=1.1, zorder=4, clip_on=False)
        if len(g) and g["tps"].max() / max(g["tps"].min(), 1e-9) > 20:
            ax.set_xscale("log")
        ax.margins(x=0.12)
        ax.set_title(f"{model} · {task}")
        ax.set_xlabel("tokens per second (to first EOS)")
        ax.set_ylabel("accuracy (%)")
        lo, hi = (100 * g["accuracy"].min(), 100 * g["accuracy"].max()) if len(g) else (0, 100)
        pad = max(5.0, 0.1 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))  # points on 0 or 100 %: clip_on=False
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colors[m], marker="o", ls="", markersize=7, label=_wrap(m)) for m in methods]
    handles += [Line2D([], [], color="0.3", marker=markers[L], ls="", markersize=7, label=f"L = {L}") for L in lengths]
    handles.append(Line2D([], [], color="0.4", ls="--", marker="o", markerfacecolor="none", markersize=10,
                          label="Pareto front"))
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=9)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_tps_vs_length(grouped: pd.DataFrame, path: Path) -> None:
    plt, fig, axes, panels, (methods, colors, lengths, _) = _panel_figure(grouped)
    for ax, (model, task) in zip(axes[0], panels):
        g = grouped[(grouped["model"] == model) & (grouped["task"] == task)]
        for m in methods:
            line = g[g["method"] == m].dropna(subset=["tps"]).sort_values("gen_length")
            if len(line):
                ax.plot(line["gen_length"], line["tps"], marker="o", color=colors[m], label=_wrap(m))
        ax.set_xscale("log", base=2)
        ax.margins(x=0.08)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(L) for L in lengths])
        ax.minorticks_off()
        if len(lengths) == 1:
            ax.set_xlim(lengths[0] / 1.5, lengths[0] * 1.5)
        ax.set_title(f"{model} · {task}")
        ax.set_xlabel("generation length (tokens)")
        ax.set_ylabel("tokens per second (to first EOS)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize=9)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_tps_vs_batch(grouped: pd.DataFrame, path: Path) -> None:
    """TPS against batch size (log2 axis), one line per sampler variant (the label without the
    batch), one panel per (model, task) row and generation-length column; a batch sweep only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = grouped["reference"].iloc[0]
    methods = method_order(grouped["base_method"].unique().tolist(), ref)
    cmap, n = (matplotlib.colormaps["tab10"], 10) if len(methods) <= 10 else (matplotlib.colormaps["tab20"], 20)
    colors = {m: cmap(i % n) for i, m in enumerate(methods)}
    rows, lengths = _panels(grouped), sorted(int(L) for L in grouped["gen_length"].unique())
    sizes = sorted(int(b) for b in grouped["batch_size"].unique())
    width, height = _figsize(len(lengths), methods, extra_entries=0)
    fig, axes = plt.subplots(len(rows), len(lengths), squeeze=False, constrained_layout=True,
                             figsize=(width, max(height, 3.8 * len(rows))))
    drawn = {}
    for (model, task), row in zip(rows, axes):
        for L, ax in zip(lengths, row):
            g = grouped[(grouped["model"] == model) & (grouped["task"] == task) & (grouped["gen_length"] == L)]
            if g.empty:
                ax.set_axis_off()
                continue
            for m in methods:
                line = g[g["base_method"] == m].dropna(subset=["tps"]).sort_values("batch_size")
                if len(line):
                    drawn[m] = ax.plot(line["batch_size"], line["tps"], marker="o", color=colors[m],
                                       label=_wrap(m))[0]
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(b) for b in sizes])
            ax.minorticks_off()
            ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
            ax.set_title(f"{model} · {task} · L = {L}")
            ax.set_xlabel("batch size (prompts per generate call)")
            ax.set_ylabel("tokens per second (to first EOS)")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
    handles, labels = [], []
    for m in (m for m in methods if m in drawn):
        # a variant measured at one batch size only (a sampler that decodes one prompt per call) says so
        measured = sorted({int(b) for b in grouped.loc[grouped["base_method"] == m, "batch_size"]})
        handles.append(drawn[m])
        labels.append(drawn[m].get_label() + (f"\n  (batch {measured[0]} only)" if len(measured) == 1 else ""))
    fig.legend(handles, labels, loc="outside right upper", frameon=False, fontsize=9)
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ------------------------------------------------------------------ the command


def environment_note(df: pd.DataFrame) -> str:
    seen = {}
    for d in df["run_dir"].unique():
        p = Path(d) / SUMMARY
        if p.exists():
            s = json.loads(p.read_text())
            seen[(s.get("device_name"), s.get("dtype"), s.get("torch_version"))] = True
    return "; ".join(f"{n} ({dt}, torch {tv})" for n, dt, tv in seen) or "unknown (no summary.json)"


def write_report(paths: Sequence[Path], out: Optional[Path] = None, reference: Optional[str] = None,
                 command: str = "") -> dict:
    """Gather, group and write every output; returns {name: path} of what was written."""
    paths = [Path(p) for p in paths]
    out = Path(out) if out else paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    df = gather(paths)
    grouped = group(df, reference)
    ref = grouped["reference"].iloc[0]
    files = {"csv": out / "grouped.csv", "md": out / "table.md", "tex": out / "table.tex",
             "accuracy_vs_tps": out / "accuracy_vs_tps.png", "tps_vs_length": out / "tps_vs_length.png"}
    grouped.to_csv(files["csv"], index=False)
    ns = sorted(set(int(n) for n in grouped["n"]))
    n_text = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]} to {ns[-1]}"
    caption = (f"Accuracy (%), tokens per second and speedup over {ref}, and NFE per generate call; "
               f"{n_text} examples per cell.")
    notes = (f"Each cell: accuracy % / TPS (speedup over `{ref}`) / NFE per generate call; {n_text} examples "
             f"per cell. TPS counts generated tokens up to and including the first EOS over `generate` "
             f"seconds, warm-up rows excluded (`tps_budget` in grouped.csv: all `gen_length` tokens). "
             f"Hardware: {environment_note(df)}.\n\nRows: {len(df)} from "
             f"{df['run_dir'].nunique()} run directories under {', '.join(f'`{p}`' for p in paths)}.")
    if is_batch_sweep(grouped):
        sizes = ", ".join(str(int(b)) for b in sorted(grouped["batch_size"].unique()))
        notes += (f"\n\nBatch sweep (batch sizes {sizes}: prompts per generate call): each row is one "
                  f"sampler at one batch size, `[batch b]`; the speedup is over `{ref}` at the same batch "
                  f"size (grouped.csv: `speedup_vs_batch1`, over the same sampler at batch 1); "
                  f"TPS against batch size: `tps_vs_batch.png`.")
        caption += " Speedups are over the same batch size."
        files["tps_vs_batch"] = out / "tps_vs_batch.png"
    made = f"Runs produced by `{command}`. " if command else ""
    files["md"].write_text(f"# Results\n\n{made}{notes}\n\n{markdown_table(grouped)}\n")
    files["tex"].write_text(latex_table(grouped, caption))
    plot_accuracy_vs_tps(grouped, files["accuracy_vs_tps"])
    plot_tps_vs_length(grouped, files["tps_vs_length"])
    if "tps_vs_batch" in files:
        plot_tps_vs_batch(grouped, files["tps_vs_batch"])
    return {k: str(v) for k, v in files.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m eval.report",
                                 description="Tables (markdown, LaTeX, CSV) and plots from the samples.jsonl "
                                             "rows under run or sweep directories.")
    ap.add_argument("paths", nargs="+", type=Path, help="run directories, sweep directories or samples.jsonl files")
    ap.add_argument("--reference", default=None,
                    help=f"the sampler speedups are relative to (a sampler name or a full variant label; "
                         f"default: {DEFAULT_REFERENCE} when present)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: <first path>/report)")
    ap.add_argument("--command", default="", help="how the runs were made, quoted in table.md")
    ap.add_argument("--timeline", metavar="EXAMPLE_ID", nargs="?", const="", default=None,
                    help="also draw the lane timeline PNG of one example (default: the first traced one) "
                         "from the first path's traces.jsonl (runs made with save_traces=true)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        files = write_report(a.paths, a.out, a.reference, a.command)
        if a.timeline is not None:
            from .timeline import load_trace, plot_lane_timeline

            ex, trace, _ = load_trace(a.paths[0], a.timeline or None)
            out = Path(files["md"]).parent / f"timeline_{ex}.png"
            files["timeline"] = str(plot_lane_timeline(trace, out, title=f"{a.paths[0].name}: {ex}"))
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(Path(files["md"]).read_text())
    print("wrote " + ", ".join(files.values()))


if __name__ == "__main__":
    main()
