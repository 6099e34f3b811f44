"""scripts/bench_forward.py at a tiny shape on the CPU: every call kind runs, is sync-free, is
counted, lands in the JSON and the plot, and feeds benchmark.py's cost fit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from asynclane.testing import import_file

ROOT = Path(__file__).resolve().parents[1]
BF = import_file("bench_forward_script", ROOT / "scripts" / "bench_forward.py")
BENCH = import_file("benchmark_script", ROOT / "scripts" / "benchmark.py")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf")
    argv = ["--shape", "llada-tiny32,dream-tiny28", "--device", "cpu", "--dtype", "fp32", "--prompts", "16",
            "--gens", "32", "--block", "8", "--lanes", "1,2", "--warmup", "0", "--iters", "1",
            "--out", str(out / "bf.json"), "--plot", str(out / "bf.png")]
    rows = BF.main(argv)
    return rows, out


def test_every_call_kind_is_measured_sync_free(bench):
    rows, out = bench
    modes = {"full", "prefix", "dual", "subset", "lanes=1", "lanes=2"}
    for shape in ("llada-tiny32", "dream-tiny28"):
        got = {r["mode"]: r for r in rows if r["shape"] == shape}
        assert set(got) == modes
        for r in got.values():
            assert r["syncs"] == 0 and r["ms"] > 0 and r["x_floor"] > 0
        # prompt 16 + gen 32; the prefix step starts at the middle block (column 32)
        assert {m: r["query_tokens"] for m, r in got.items()} == {
            "full": 48, "prefix": 16, "dual": 8, "subset": 8, "lanes=1": 32, "lanes=2": 64}
        # a cached step costs about as many kernels per layer as a full forward: no per-layer sync, mask
        # or copy of the cache (the counts are exact: the same aten ops every run)
        assert got["dual"]["kernels_per_layer"] <= got["full"]["kernels_per_layer"] + 1.5
    saved = json.loads((out / "bf.json").read_text())
    assert saved["command"].startswith("python scripts/bench_forward.py") and len(saved["rows"]) == len(rows)
    assert (out / "bf.png").stat().st_size > 0


def test_benchmark_fits_its_cost_model_to_the_rows(bench):
    _, out = bench
    cost = BENCH.load_call_cost([out / "bf.json"], "dream")
    assert cost.n_rows == 6 and cost.device == "cpu"


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="unknown shape 'llada-9b'; valid choices: llada-8b"):
        BF.main(["--shape", "llada-9b"])
