"""Result rows: the ``samples.jsonl`` format, its reader/appender, and the one aggregation of rows.

Light on purpose (json + pandas, no torch): the runner writes rows through it and
``python -m eval.report`` reads and aggregates them through the same functions, so a table cell
and a run's ``summary.json`` are the same group-by of the same rows.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

SAMPLES, SUMMARY, TRACES = "samples.jsonl", "summary.json", "traces.jsonl"


def rank_file(name: str, rank: int) -> str:
    """The file rank ``rank`` of a data-parallel run appends to instead of ``name``:
    ``samples.rank<k>.jsonl`` for ``samples.jsonl`` (``traces.rank<k>.jsonl`` for traces)."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.rank{rank}{dot}{ext}"


def rank_files(out_dir: Path, name: str = SAMPLES) -> list[Path]:
    """The per-rank files of ``name`` in ``out_dir`` (any world size's), in rank order."""
    stem, dot, ext = name.rpartition(".")
    pattern = re.compile(rf"{re.escape(stem)}\.rank(\d+){re.escape(dot + ext)}")
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob(f"{stem}.rank*{dot}{ext}")
             if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


CONVENTIONS = {
    "gen_tokens": "generated tokens up to and including the first EOS-like token, prompt excluded",
    "tps": "sum gen_tokens / sum generate seconds over non-warm-up rows (each batch once) of one torch "
           "thread count (`threads`; with rows of several, the most common, each in `tps_by_threads`); "
           "per process: in a data-parallel run, all ranks' rows (per-GPU throughput)",
    "tps_wall": "data-parallel runs (`data_parallel`): the tokens all ranks generated in this invocation / the "
                "slowest rank's generation-loop seconds (warm-up included, model loading excluded)",
    "tps_budget": "gen_length tokens per example / the same seconds (all-budget convention)",
    "nfe": "model forward calls per generate call (batch value on each row)",
    "tokens_per_nfe": "sum gen_tokens / sum nfe",
}


def whole_lines(path: Path, data: bytes) -> bytes:
    """``data`` (the bytes of ``path``) without a torn last line (bytes after the last newline: a row
    whose write a kill interrupted), which is cut off with a warning: that example reruns."""
    if not data or data.endswith(b"\n"):
        return data
    keep = data.rfind(b"\n") + 1
    log.warning("%s ends in a torn line (killed run?): cutting %d bytes; that example reruns", path, len(data) - keep)
    return data[:keep]


class Appender:
    """Append mode that first repairs a last line cut short by a killed run.

    The torn tail (bytes after the last newline: a row whose write was interrupted) is cut off
    with a warning; its example is absent from the file, so the resumed run regenerates it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self):
        if self.path.exists() and self.path.stat().st_size:
            data = self.path.read_bytes()
            keep = len(whole_lines(self.path, data))
            if keep < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
        self.f = open(self.path, "a", encoding="utf-8")
        return self.f

    def __exit__(self, *exc):
        self.f.close()


def read_rows(path: Path) -> list[dict]:
    """Rows of a ``samples.jsonl``; a torn line (killed run) is skipped with a warning."""
    if not Path(path).exists():
        return []
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d is not a complete JSON row (killed run?); ignored", path, n)
    return rows


def merge_rank_files(out_dir: Path, fingerprint: str, example_ids: Sequence[str]) -> int:
    """Fold the per-rank row files of a data-parallel run into ``samples.jsonl``; returns the rows added.

    ``samples.jsonl`` keeps its rows byte for byte (a torn last line, from a kill, is cut off with a
    warning); each rank-file row not already in it (the same ``fingerprint`` and ``example_id``) is
    appended once: the rows of ``fingerprint`` in the order of ``example_ids``, then any others (rows
    of another configuration run into the same directory) in file order.  The new file replaces the old
    in one rename, and only then are the rank files removed, so a kill at any point loses no row (a
    kill between the two leaves rows in both places, which the next merge does not add twice).
    Torn lines in a rank file (a rank killed mid-write) are skipped: those examples run again.
    """
    out_dir = Path(out_dir)
    files = rank_files(out_dir)
    if not files:
        return 0
    samples = out_dir / SAMPLES
    kept = whole_lines(samples, samples.read_bytes() if samples.exists() else b"")
    seen = {(r.get("fingerprint"), r.get("example_id")) for r in read_rows(samples)}
    new = []
    for f in files:
        for r in read_rows(f):
            key = (r.get("fingerprint"), r.get("example_id"))
            if key not in seen:
                seen.add(key)
                new.append(r)
    position = {eid: i for i, eid in enumerate(example_ids)}
    new.sort(key=lambda r: (0, position.get(r.get("example_id"), len(position)))
             if r.get("fingerprint") == fingerprint else (1, 0))  # stable: the rest keep file order
    tmp = samples.with_name(samples.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(kept + "".join(json.dumps(r) + "\n" for r in new).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, samples)
    for f in files:
        f.unlink()
    log.info("merged %d row(s) from %s into %s", len(new), ", ".join(f.name for f in files), samples)
    return len(new)


def merge_rank_traces(out_dir: Path) -> None:
    """Append the per-rank trace files of a data-parallel run (``save_traces=true``) to ``traces.jsonl``,
    in rank order and whole lines only, then remove them."""
    files = rank_files(out_dir, TRACES)
    if not files:
        return
    with Appender(Path(out_dir) / TRACES) as out:
        for f in files:
            data = f.read_text(encoding="utf-8")
            out.write(data[: data.rfind("\n") + 1])
    for f in files:
        f.unlink()


def summarize(rows: list[dict]) -> dict:
    """Aggregates of result rows (a group-by, nothing measured here).

    tps: generated tokens (to the first EOS, inclusive) / generate seconds, warm-up rows
    excluded, each batch's seconds counted once.  tps_budget: the all-budget convention some
    papers use, ``gen_length`` tokens per example over the same seconds; labelled, never mixed.
    Timing never blends processes with different torch thread counts (a resume with another
    ``threads``): the timing aggregates use the rows of one count, ``threads`` (the one with the
    most timed rows, ties to the latest), and ``tps_by_threads`` gives each count's tps.
    """
    import pandas as pd

    if not rows:
        return {"n": 0, "accuracy": None}
    df = pd.DataFrame(rows)
    timed = df[~df["warmup"].astype(bool)]
    threads, by_threads = None, {}
    if "threads" in df and len(timed):
        label = timed["threads"].map(lambda v: "unrecorded" if pd.isna(v) else str(int(v)))
        groups = dict(list(timed.groupby(label, sort=False)))
        pick = max(groups, key=lambda k: (len(groups[k]), groups[k].index.max()))
        if len(groups) > 1:
            by_threads = {k: _rate(g, "gen_tokens") for k, g in sorted(groups.items())}
            log.warning("timed rows come from processes with different torch thread counts (%s): tps is over "
                        "the %d rows at threads=%s; tps_by_threads has each",
                        ", ".join(f"{k}: {len(g)} rows" for k, g in sorted(groups.items())), len(groups[pick]), pick)
        timed, threads = groups[pick], None if pick == "unrecorded" else int(pick)
    flags = [c for c in df.columns if df[c].dtype == bool and c not in ("warmup", "finished")]
    out: dict[str, Any] = {
        "n": int(len(df)), "n_timed": int(len(timed)), "accuracy": float(df["correct"].mean()),
        **{f"accuracy_{c}": float(df[c].mean()) for c in flags if c != "correct"},
        "finished_rate": float(df["finished"].mean()),
        "tps": _rate(timed, "gen_tokens"),
        "tps_budget": _rate(timed, "gen_length"),
        "threads": threads,
        **({"tps_by_threads": by_threads} if by_threads else {}),
        "nfe_mean": float(df["nfe"].mean()),
        "token_forwards_mean": float(df["token_forwards"].mean()),
        "tokens_per_nfe": float(df["gen_tokens"].sum() / df["nfe"].sum()) if df["nfe"].sum() else None,
        "seconds_mean": float(timed["seconds"].mean()) if len(timed) else None,
        "gen_tokens_mean": float(df["gen_tokens"].mean()),
        "conventions": dict(CONVENTIONS),
    }
    if "sandbox" in df.columns:  # code tasks: the sandbox layers the programs actually ran under
        out["sandbox"] = sorted(str(v) for v in df["sandbox"].dropna().unique())
    if not len(timed):
        log.warning("every row is a warm-up row: no timing aggregates (raise limit or set warmup=0)")
    return out


def _rate(timed, tokens: str):
    """Sum ``tokens`` / sum seconds (each batch once), or None without timed seconds."""
    secs = timed.drop_duplicates("batch")["seconds"].sum() if len(timed) else 0.0
    return float(timed[tokens].sum() / secs) if secs > 0 else None


def write_rows(f, rows: list[dict]) -> None:
    """Append whole rows in one write and flush: a kill leaves complete lines plus at most a torn tail."""
    f.write("".join(json.dumps(r) + "\n" for r in rows))
    f.flush()
