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
    seen = []
    for rec in _records(run_dir):
        ids = rec["example_ids"]
        seen += ids
        if example_id is None or example_id in ids:
            per = _per_example(rec)
            if per is None:
                raise ValueError("the trace of a natively batched generate call covers every row: it cannot be "
                                 "drawn per example (rerun with batch_size=1)")
            return per[0 if example_id is None else ids.index(example_id)]
    raise KeyError(f"example {example_id!r} is not in {Path(run_dir) / 'traces.jsonl'}; traced examples: "
                   f"{', '.join(seen[:20])}")


def _records(run_dir: Path):
    """The records of ``run_dir``'s ``traces.jsonl`` (one per generate call), in order."""
    path = Path(run_dir) / "traces.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: rerun with save_traces=true")
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def _per_example(rec: dict) -> Optional[list]:
    """[(example_id, trace, info)] of one record: a single prompt's, or each row's of a pooled batch
    (:mod:`asynclane.rowpool`: ``info["rows"]``); None for a natively batched call, whose one trace
    covers every row."""
    ids, info = rec["example_ids"], rec.get("info") or {}
    if len(ids) == 1:
        return [(ids[0], rec["trace"], info)]
    rows = info.get("rows")
    if rows is None or not isinstance(rec["trace"], list) or len(rec["trace"]) != len(ids):
        return None
    return [(i, t or [], r) for i, t, r in zip(ids, rec["trace"], rows)]


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


def iter_traces(run_dir: Path):
    """Yield (example_id, trace, info) of every example traced in ``run_dir``'s ``traces.jsonl``
    (one trace per example: a single-prompt call's, or each row's of a pooled batch; a natively
    batched call's one trace, which covers every row, is skipped)."""
    for rec in _records(run_dir):
        yield from _per_example(rec) or []


def lane_shares(trace: list, answer_tokens: Optional[int] = None) -> dict:
    """How much of one answer a continuation lane produced while refinement to its left was open.

    Reads the lane records of an AsyncLane trace (``lanes`` with id/kind/block/committed, ``forks``
    naming the refine lane each fork opens, ``kills``).  A refine (REF) lane is open from the end of
    the iteration whose fork opened it to the last iteration it ran in (or was killed in).  Each
    answer position is credited to the last lane that committed it (a draft verified by a refine
    lane's row counts as that lane's; a position ``seeded`` from the call's lookahead when a GEN
    block advances, a GEN lane's); a position committed at iteration t by a GEN lane counts as

    - ``async``: some REF lane opened before t and starting left of the position is still open
      after t (decoding advanced past text whose refinement had not finished: asynchronous
      refinement in the strict sense);
    - ``overlap``: some REF lane opened before t and starting left of the position ran in
      iteration t or is still open after it (``async`` plus the continuation's tokens decoded in
      the same call as the refinement's last step, e.g. beside verified drafts).

    ``answer_tokens``: the answer's length (to its first EOS, inclusive: the trace info's
    ``stitched``); positions past it (EOS tail a lane committed before the cascade cut it) are not
    counted.  Returns counts of positions: ``committed`` (answer positions a lane committed),
    ``gen`` (those committed by GEN lanes), ``async`` and ``overlap``.  A trace without lane records
    (another sampler's) has every count 0.
    """
    born, last, starts = {}, {}, {}
    for rec in trace:
        it = rec["iteration"]
        for f in rec.get("forks", []) or []:
            if f.get("ref") is not None:
                born.setdefault(f["ref"], it)
        for lane in rec.get("lanes", []) or []:
            if lane["kind"] == "REF":
                last[lane["id"]], starts[lane["id"]] = it, lane["block"][0]
        for lid in rec.get("kills", []) or []:  # lane ids (LaneTree.cascade)
            if lid in born:
                last[lid] = max(last.get(lid, it), it)
    refs = [(starts[r], born[r], last.get(r, born[r])) for r in starts if r in born]
    credit = {}  # position -> (kind, iteration)
    for rec in trace:
        for lane in rec.get("lanes", []) or []:
            for p in lane.get("committed", []) or []:
                credit[p] = (lane["kind"], rec["iteration"])
        for p in rec.get("seeded", []) or []:  # a GEN block's advance, committed from this call's lookahead
            credit[p] = ("GEN", rec["iteration"])
    if answer_tokens is not None and credit:
        start = min(lane["block"][0] for rec in trace for lane in rec.get("lanes", []) or [])
        credit = {p: c for p, c in credit.items() if p < start + answer_tokens}
    out = {"committed": len(credit), "gen": 0, "async": 0, "overlap": 0}
    for p, (kind, t) in credit.items():
        if kind != "GEN":
            continue
        out["gen"] += 1
        left = [(b, e) for s, b, e in refs if s < p and b < t]
        out["async"] += any(e > t for _, e in left)
        out["overlap"] += any(e >= t for _, e in left)
    return out


def run_lane_shares(run_dir: Path) -> Optional[dict]:
    """:func:`lane_shares` summed over every traced example of a run (each cut at its answer's end
    where the trace info gives it), with the shares of the committed positions (``async_share``,
    ``overlap_share``) and the number of ``examples``; None when no trace holds lane records."""
    total = {"committed": 0, "gen": 0, "async": 0, "overlap": 0}
    n = 0
    for _, trace, info in iter_traces(run_dir):
        if not any(rec.get("lanes") for rec in trace):
            continue
        n += 1
        stitched = info.get("stitched")
        for k, v in lane_shares(trace, len(stitched) if stitched is not None else None).items():
            total[k] += v
    if not n:
        return None
    c = total["committed"]
    return {**total, "examples": n, "async_share": total["async"] / c if c else None,
            "overlap_share": total["overlap"] / c if c else None}
