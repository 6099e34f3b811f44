"""Lane timeline: a picture of one generation's per-iteration trace (AsyncLane's lane tree).

Reads ``traces.jsonl`` (written by the runner with ``save_traces=true``) and draws, for one
example, iteration on the x axis and answer position on the y axis: each lane's working block
as a translucent bar in the lane's colour (GEN solid, REF hatched), the positions it committed
at that iteration as dots, forks as stars, and cascade kills as crosses.  Any sampler whose
trace records carry ``lanes`` entries with ``id``/``kind``/``block``/``committed`` can be drawn.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def load_trace(run_dir: Path, example_id: Optional[str] = None) -> tuple[str, list, dict]:
    """(example_id, trace, info) of ``example_id`` (default: the first traced example).

    A record of a batch holds one trace per example when the sampler pooled its rows
    (:mod:`asynclane.rowpool`: ``info["rows"]``); a natively batched call's one trace covers every
    row and cannot be drawn per example."""
    path = Path(run_dir) / "traces.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: rerun with save_traces=true")
    seen = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        seen += rec["example_ids"]
        ids = rec["example_ids"]
        if example_id is None or example_id in ids:
            i = 0 if example_id is None else ids.index(example_id)
            if len(ids) == 1:
                return ids[0], rec["trace"], rec.get("info", {})
            rows = rec.get("info", {}).get("rows")
            if rows is None or not isinstance(rec["trace"], list) or len(rec["trace"]) != len(ids):
                raise ValueError("the trace of a natively batched generate call covers every row: it cannot be "
                                 "drawn per example (rerun with batch_size=1)")
            return ids[i], rec["trace"][i] or [], rows[i]
    raise KeyError(f"example {example_id!r} is not in {path}; traced examples: {', '.join(seen[:20])}")


def plot_lane_timeline(trace: list, out_png: Path, title: str = "", prompt_length: int = 0) -> Path:
    """Write the timeline PNG of one trace; positions are shown relative to ``prompt_length``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not trace or not any(rec.get("lanes") for rec in trace):
        raise ValueError("the trace has no lane records (is this an AsyncLane trace?)")
    if not prompt_length:  # the first block of the root lane starts right after the prompt
        prompt_length = min(lane["block"][0] for rec in trace for lane in rec.get("lanes", []))
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(trace) + 3), 5.5), constrained_layout=True)
    kinds_seen = {}
    for rec in trace:
        it = rec["iteration"]
        for lane in rec["lanes"]:
            color = cmap(lane["id"] % 10)
            lo, hi = (b - prompt_length for b in lane["block"])
            ax.bar(it, hi - lo, bottom=lo, width=0.9, color=color, alpha=0.25,
                   hatch="//" if lane["kind"] == "REF" else None, edgecolor=color, linewidth=0)
            if lane["committed"]:  # hollow: drafts a refine lane's row verified (speculative lanes)
                ax.scatter([it] * len(lane["committed"]), [p - prompt_length for p in lane["committed"]],
                           s=28 if lane.get("accepted") else 9, zorder=3,
                           facecolors="none" if lane.get("accepted") else color, edgecolors=color)
            kinds_seen.setdefault(lane["id"], (lane["kind"], color))
        for f in rec.get("forks", []):
            ax.scatter([it], [f["at"] - prompt_length], marker="*", s=120, color="black", zorder=4)
        for _ in rec.get("kills", []) or []:
            ax.axvline(it, color="crimson", linestyle=":", linewidth=1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.5, hatch="//" if k == "REF" else None)
               for k, c in kinds_seen.values()]
    labels = [f"lane {i} ({k})" for i, (k, _) in kinds_seen.items()]
    handles += [plt.Line2D([], [], marker="*", color="black", linestyle="", markersize=10),
                plt.Line2D([], [], color="crimson", linestyle=":")]
    labels += ["fork (delimiter)", "cascade kill"]
    if any(lane.get("accepted") for rec in trace for lane in rec.get("lanes", [])):
        handles.append(plt.Line2D([], [], marker="o", color="gray", markerfacecolor="none", linestyle=""))
        labels.append("draft verified")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_xlabel("iteration (one model call each with lane batching)")
    ax.set_ylabel("answer position (tokens after the prompt)")
    ax.set_title(title or "AsyncLane lane timeline", fontsize=10)
    ax.set_xlim(-0.8, len(trace) - 0.2)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=130)
    plt.close(fig)
    return out_png
