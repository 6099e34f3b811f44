"""Result rows: the ``samples.jsonl`` format, its reader/appender, and the one aggregation of rows.

Light on purpose (json + pandas, no torch): the runner writes rows through it and
``python -m eval.report`` reads and aggregates them through the same functions, so a table cell
and a run's ``summary.json`` are the same group-by of the same rows.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLES, SUMMARY, TRACES = "samples.jsonl", "summary.json", "traces.jsonl"

CONVENTIONS = {
    "gen_tokens": "generated tokens up to and including the first EOS-like token, prompt excluded",
    "tps": "sum gen_tokens / sum generate seconds over non-warm-up rows (each batch once) of one torch "
           "thread count (`threads`; with rows of several, the most common, each in `tps_by_threads`)",
    "tps_budget": "gen_length tokens per example / the same seconds (all-budget convention)",
    "nfe": "model forward calls per generate call (batch value on each row)",
    "tokens_per_nfe": "sum gen_tokens / sum nfe",
}


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
            if not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                log.warning("%s ends in a torn line (killed run?): cutting %d bytes; that example reruns",
                            self.path, len(data) - keep)
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
