"""Gather ``summary.json`` files under a directory into one markdown table (with the command).

    python scripts/summarize_runs.py RUNS_DIR --out results/table.md --command "how RUNS_DIR was made"
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("task", "sampler", "gen_length", "steps", "n", "accuracy", "accuracy_exact", "nfe_mean", "tokens_per_nfe",
           "gen_tokens_mean", "tps")


def rows(root: Path) -> list[dict]:
    out = []
    for f in sorted(root.rglob("summary.json")):
        s = json.loads(f.read_text())
        cfg = s.get("config", {})
        steps = cfg.get("sampler", {}).get("steps") or cfg.get("gen_length")
        out.append({**s, "steps": steps, "gen_length": cfg.get("gen_length"), "dir": str(f.parent.relative_to(root))})
    return out


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def table(rs: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in sorted(rs, key=lambda r: (r.get("task", ""), r.get("gen_length") or 0, -(r.get("steps") or 0))):
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--command", default="")
    a = ap.parse_args(argv)
    rs = rows(a.root)
    if not rs:
        raise SystemExit(f"no summary.json under {a.root}")
    text = (f"# {a.root.name}\n\nProduced by `{a.command}` (run directories under `{a.root}`).\n\n"
            f"`accuracy` is the task's primary score; `accuracy_exact` (arith) is exact match of the whole worked answer.\n\n"
            + table(rs) + "\n")
    a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
