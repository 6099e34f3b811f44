"""Print the measured parity / cache errors of the native backbone as a table.

    PYTHONPATH=src python scripts/parity_report.py [--markdown]

Runs every measured comparison of tests/asynclane/test_backbone_parity.py (native vs
transformers' Llama / Qwen2 with the same weights) and tests/asynclane/test_cache.py (every
KV-cache path vs an exact reference), for both families, on tiny random fp32 models on the CPU.
Each number is max|ours - ref| / max|ref| over finite entries (NaN rows of Dream must match
exactly); the tests assert <= 1e-5.  Takes a few seconds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from asynclane.testing import import_file as _load  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tests = ROOT / "tests" / "asynclane"
    parity = _load("_asynclane_parity_helpers", tests / "test_backbone_parity.py")
    cache = _load("_asynclane_cache_checks", tests / "test_cache.py")

    import transformers

    rows = []
    for group, mod in (("parity", parity), ("cache", cache)):
        for check, fn in mod.CHECKS.items():
            rows.append((group, check, *(fn(f) for f in parity.FAMILIES)))
    tol = parity.TOL
    head = ("group", "check", *parity.FAMILIES)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, fp32 CPU, "
          f"max relative error (tolerance {tol:.0e})")
    w = max(len(r[1]) for r in rows)
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for g, c, *e in rows:
            print(f"| {g} | {c} | " + " | ".join(f"{x:.1e}" for x in e) + " |")
    else:
        print(f"{head[0]:7s} {head[1]:{w}s} " + " ".join(f"{h:>9s}" for h in head[2:]))
        for g, c, *e in rows:
            print(f"{g:7s} {c:{w}s} " + " ".join(f"{x:9.1e}" for x in e))
    worst = max(x for r in rows for x in r[2:])
    print(f"worst {worst:.1e}: {'PASS' if worst <= tol else 'FAIL'}")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
