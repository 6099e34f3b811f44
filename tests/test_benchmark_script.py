"""scripts/benchmark.py: the table/ratio logic on synthetic rows (no model), the plan and its
``--dry-run``, one tiny real invocation through the harness (tiny model, 2 examples, L=32), and
the batch sweep (``--batch-sizes``: validation, plan, table, one tiny real sweep in-process)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_script"] = mod
    spec.loader.exec_module(mod)
    return mod


def m(acc, nfe, tpc, fpt, tps):
    return {"accuracy": acc, "nfe": nfe, "tokens_per_call": tpc, "forwards_per_token": fpt, "tps": tps}


# one task/length; each competitor is best on a different metric, so every direction is exercised
CELLS = {
    "blockwise": m(0.90, 64.0, 0.9, 50.0, 100.0),   # most accurate
    "fast_dllm": m(0.80, 20.0, 2.5, 18.0, 300.0),   # fewest NFE, most tokens/call, highest TPS
    "d3llm": m(0.70, 25.0, 2.0, 12.0, 250.0),       # fewest token-forwards/token
    "asynclane": m(0.85, 16.0, 3.0, 15.0, 240.0),
}
RESULTS = {("arith", 64, s): v for s, v in CELLS.items()}


def test_metrics_from_a_summary(bench):
    got = bench.metrics({"accuracy": 0.5, "nfe_mean": 10.0, "tokens_per_nfe": 2.0, "token_forwards_mean": 300.0,
                         "gen_tokens_mean": 20.0, "tps": 123.0, "n": 4})
    assert got["accuracy"] == 0.5 and got["nfe"] == 10.0 and got["tokens_per_call"] == 2.0
    assert got["forwards_per_token"] == 15.0 and got["tps"] == 123.0
    assert bench.metrics({"accuracy": None, "tps": None, "gen_tokens_mean": 0.0})["forwards_per_token"] is None


def test_best_competitor_follows_each_metric_direction(bench):
    assert bench.best_competitor(CELLS, "accuracy", True) == ("blockwise", 0.90)
    assert bench.best_competitor(CELLS, "nfe", False) == ("fast_dllm", 20.0)
    assert bench.best_competitor(CELLS, "tokens_per_call", True) == ("fast_dllm", 2.5)
    assert bench.best_competitor(CELLS, "forwards_per_token", False) == ("d3llm", 12.0)
    assert bench.best_competitor(CELLS, "tps", True) == ("fast_dllm", 300.0)
    # asynclane itself is never its own competitor, even where it is best
    assert bench.best_competitor({"asynclane": m(1, 1, 9, 1, 999), "x": m(0, 5, 1, 5, 5)}, "nfe", False) == ("x", 5)
    # missing values are skipped; ties go to the first competitor in order
    cells = {"a": m(None, 10, 1, 1, None), "b": m(0.5, 10, 1, 1, 7.0), "asynclane": m(0.5, 9, 1, 1, 1)}
    assert bench.best_competitor(cells, "accuracy", True) == ("b", 0.5)
    assert bench.best_competitor(cells, "nfe", False) == ("a", 10)
    assert bench.tied_with(cells, "nfe", ("a", 10)) == ["b"]
    assert bench.best_competitor({"asynclane": m(1, 1, 1, 1, 1)}, "tps", True) is None


def test_ratio_rows_are_asynclane_over_the_best_competitor(bench):
    rows = {r["metric"]: r for r in bench.ratio_rows(RESULTS)}
    assert set(rows) == {"accuracy", "nfe", "tokens_per_call", "forwards_per_token", "tps"}
    assert rows["accuracy"]["best"] == "blockwise" and rows["accuracy"]["ratio"] == pytest.approx(0.85 / 0.90)
    assert rows["nfe"]["best"] == "fast_dllm" and rows["nfe"]["ratio"] == pytest.approx(16 / 20)
    assert rows["tokens_per_call"]["ratio"] == pytest.approx(3.0 / 2.5)
    fpt = rows["forwards_per_token"]
    assert fpt["best"] == "d3llm" and fpt["ratio"] == pytest.approx(15 / 12)
    assert rows["tps"]["best"] == "fast_dllm" and rows["tps"]["ratio"] == pytest.approx(0.8)
    assert bench.verdict(16, 20, higher=False) == "yes" and bench.verdict(240, 300, higher=True) == "no"
    assert bench.verdict(0.0, 0.0, higher=True) == "tie" and bench.verdict(None, 1.0, True) is None
    table = bench.ratio_table(RESULTS)
    assert "| arith | 64 | NFE/sample (lower is better) | 16.0 | fast_dllm | 20.0 | 0.80x | yes |" in table
    assert "| arith | 64 | TPS (higher is better) | 240.0 | fast_dllm | 300.0 | 0.80x | no |" in table
    assert "| arith | 64 | token-fwd/token (lower is better) | 15.0 | d3llm | 12.0 | 1.25x | no |" in table
    # no asynclane at a task/length: no ratio rows there
    assert bench.ratio_rows({("arith", 64, "blockwise"): CELLS["blockwise"]}) == []


def test_fastest_competitor_per_task_and_length(bench):
    results = dict(RESULTS)
    # at 128 the TPS winner and the NFE winner differ, and asynclane (fastest overall) is excluded
    results.update({("arith", 128, "blockwise"): m(0.9, 128, 1, 50, 400.0),
                    ("arith", 128, "fast_dllm"): m(0.8, 30, 3, 18, 350.0),
                    ("arith", 128, "asynclane"): m(0.8, 10, 9, 10, 999.0)})
    fast = bench.fastest_competitors(results)
    assert [(r["L"], r["by_tps"][0], r["by_nfe"][0]) for r in fast] == [(64, "fast_dllm", "fast_dllm"),
                                                                      (128, "blockwise", "fast_dllm")]
    lines = bench.fastest_statements(results)
    assert lines[1] == ("- arith, L=128: fastest competitor is blockwise by TPS (400.0 tokens/s); "
                        "fast_dllm by NFE (30.0 model calls/sample)")


def test_render_has_command_and_every_table(bench):
    abl = {("arith", 64, "full"): CELLS["asynclane"], ("arith", 64, "cascade"): m(0.85, 18, 2.7, 16, 200)}
    thr = {("arith", 64, 0.5): m(0.6, 12, 4, 10, 400), ("arith", 64, 0.9): CELLS["fast_dllm"]}
    text = bench.render("python scripts/benchmark.py --x", RESULTS, abl, thr)
    assert text.splitlines()[2] == "Command: `python scripts/benchmark.py --x`"
    for heading in ("## Samplers side by side", "## asynclane against the best competitor", "## Fastest competitor",
                    "## asynclane ablations", "## fast_dllm threshold sweep"):
        assert heading in text
    assert "| arith | 64 | asynclane | 0.850 | 16.0 | 3.00 | 15.0 | 240.0 |" in text
    assert "| arith | 64 | cascade off | 0.850 | 18.0 | 2.70 | 16.0 |" in text
    assert "| arith | 64 | 0.5 | 0.600 | 12.0 | 4.00 | 10.0 | 400.0 |" in text


def test_plan_shares_equal_configurations(bench):
    plan = bench.make_plan(["blockwise", "fast_dllm", "asynclane"], ["arith", "listops"], [64, 128],
                           [0.5, 0.9], ablations=True)
    runs = plan.runs()
    # per task x length: 3 main + 1 new threshold (0.9 is fast_dllm's default) + 5 ablations (full = main)
    assert len(runs) == 2 * 2 * (3 + 1 + 5)
    assert plan.thresholds[("arith", 64, 0.9)] == bench.Run("fast_dllm", "arith", 64)
    assert plan.ablations[("listops", 128, "full")] == bench.Run("asynclane", "listops", 128)
    assert plan.ablations[("arith", 64, "cascade")].options == (("cascade", False),)
    assert plan.thresholds[("arith", 64, 0.5)].variant == "fast_dllm-threshold0.5"
    # the same tasks, lengths and seed for every sampler
    assert {(r.task, r.length) for r in runs if r.sampler == "blockwise"} == \
        {(r.task, r.length) for r in runs if r.sampler == "asynclane"}
    ov = plan.ablations[("arith", 64, "draft_reuse")].overrides("tiny", 100, 0, 1, ["device=cpu"])
    assert ov == ["model=tiny", "sampler=asynclane", "task=arith", "gen_length=64", "limit=100", "seed=0",
                  "threads=1", "sampler.draft_reuse=false", "device=cpu"]


def test_registered_samplers_default(bench):
    names = bench.registered_samplers()
    assert set(names) >= {"blockwise", "dream", "fast_dllm", "dparallel", "d3llm", "asynclane"}


def test_dry_run_lists_the_expected_runs(bench, capsys, tmp_path):
    rc = bench.main(["--dry-run", "--samplers", "blockwise,asynclane", "--tasks", "arith", "--lengths", "64,128",
                     "--limit", "5", "--threshold-sweep", "0.5", "--out", str(tmp_path)])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("python -m eval")]
    # per length: blockwise, asynclane, fast_dllm@0.5, asynclane x 5 switches off
    assert len(lines) == 2 * 8
    assert lines[0] == (f"python -m eval model=tiny sampler=blockwise task=arith gen_length=64 limit=5 seed=0 "
                        f"hydra.run.dir={tmp_path}/runs/arith/tiny-blockwise-L64")
    assert any("sampler=fast_dllm" in ln and "sampler.threshold=0.5" in ln and "gen_length=128" in ln for ln in lines)
    assert sum("sampler.compact_refresh=false" in ln for ln in lines) == 2
    assert not (tmp_path / "runs").exists()  # nothing ran

    rc = bench.main(["--dry-run", "--samplers", "blockwise", "--lengths", "48", "--threshold-sweep", "none",
                     "--no-ablations"])
    assert rc == 2 and "block_length 32 does not divide gen_length 48" in capsys.readouterr().err


def test_tiny_real_invocation_writes_benchmark_md(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["--samplers", "blockwise,fast_dllm,asynclane", "--tasks", "arith", "--lengths", "32", "--limit", "2",
            "--threads", "1", "--out", str(out)]
    res = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (out / "benchmark.md").read_text()
    assert md.startswith("# Benchmark") and f"Command: `python {SCRIPT} {' '.join(args)}`" in md
    for s in ("blockwise", "fast_dllm", "asynclane"):
        assert f"| arith | 32 | {s} |" in md
    assert "## asynclane against the best competitor" in md and "fastest competitor is" in md
    assert "| arith | 32 | compact_refresh off |" in md and "| arith | 32 | 0.95 |" in md
    assert "| arith | 32 | speculate off |" in md
    assert (out / "report" / "table.md").exists() and (out / "report" / "grouped.csv").exists()
    assert len(list((out / "runs" / "arith").glob("*/summary.json"))) == 11
    assert md.strip() in res.stdout


def test_call_cost_fit_and_projected_gpu_tps(bench, tmp_path):
    rows = [{"family": "llada", "query_tokens": q, "ms": 20.0 + 0.01 * q, "device": "GPU"} for q in (32, 64, 512)]
    rows.append({"family": "dream", "query_tokens": 32, "ms": 99.0})
    cost = bench.fit_call_cost(rows, "llada")
    assert cost.base_ms == pytest.approx(20.0) and cost.per_token_ms == pytest.approx(0.01) and cost.n_rows == 3
    # 10 calls of 32 tokens each (20.32 ms) producing 40 tokens
    assert bench.projected_gpu_tps(10.0, 320.0, 40.0, cost) == pytest.approx(40 / (10 * 0.02032))
    assert bench.projected_gpu_tps(0.0, 0.0, 0.0, cost) is None
    with pytest.raises(ValueError, match="at least two dream rows"):
        bench.fit_call_cost(rows, "dream")
    # the column appears in the tables (and in the ratio rows) only when a cost model was given
    summary = {"accuracy": 1.0, "nfe_mean": 10.0, "tokens_per_nfe": 4.0, "token_forwards_mean": 320.0,
               "gen_tokens_mean": 40.0, "tps": 5.0, "n": 2}
    with_gpu = {("arith", 64, "fast_dllm"): bench.metrics(summary, cost),
                ("arith", 64, "asynclane"): bench.metrics({**summary, "nfe_mean": 5.0}, cost)}
    assert "proj. GPU TPS" in bench.main_table(with_gpu) and "proj. GPU TPS" not in bench.main_table(RESULTS)
    gpu = [r for r in bench.ratio_rows(with_gpu) if r["metric"] == "gpu_tps"]
    assert len(gpu) == 1 and gpu[0]["ratio"] > 1
    path = tmp_path / "costs.json"
    path.write_text(__import__("json").dumps({"rows": rows}))
    assert bench.load_call_cost([path], "llada") == cost
    assert bench.load_call_cost([path, path], "llada").n_rows == 6  # repeated runs pool their rows
    with pytest.raises(SystemExit, match="no rows for family 'qwen'"):
        bench.load_call_cost([path], "qwen")
    with pytest.raises(SystemExit, match="no such file"):
        bench.load_call_cost([tmp_path / "missing.json"], "llada")


# ------------------------------------------------------------------ the batch sweep (--batch-sizes)


@pytest.mark.parametrize("bad, message", [("0", "'0' is not a positive integer"), ("-2", "'-2' is not a positive"),
                                          ("1.5", "'1.5' is not a positive"), ("4,x", "'x' is not a positive"),
                                          (",", "no batch size in ','")])
def test_batch_sizes_must_be_positive_integers(bench, capsys, bad, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args([f"--batch-sizes={bad}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "such as 1,4,16" in err


def test_batch_sizes_parsing_and_the_batch_size_override(bench, capsys):
    assert bench.parse_args([]).batch_sizes == [1]
    assert bench.parse_args(["--batch-sizes", "16, 4,4,1"]).batch_sizes == [1, 4, 16]
    # --extra batch_size=... alone is the old way (every run at that size); with a sweep it is ambiguous
    assert bench.parse_args(["--extra", "batch_size=4"]).extra == ["batch_size=4"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-sizes", "1,4", "--extra", "batch_size=4"])
    assert "not --extra batch_size" in capsys.readouterr().err


def test_batch_plan_reads_can_batch_and_keeps_batch_one_as_the_main_run(bench):
    # the default (batch 1 only) plans no sweep: the same runs as before the flag existed
    assert bench.make_plan(["blockwise"], ["arith"], [64], [], False).batches == {}
    alone = {"asynclane"}
    plan = bench.make_plan(["blockwise", "asynclane"], ["arith", "listops"], [64], [], False,
                           batch_sizes=[4], batchable=lambda s: s not in alone)
    # batch 1 is always in the sweep (the ratio base): it is the main run, planned once
    assert plan.batches[("arith", 64, 1, "asynclane")] == bench.Run("asynclane", "arith", 64)
    assert plan.batches[("arith", 64, 4, "blockwise")] == bench.Run("blockwise", "arith", 64, batch_size=4)
    assert plan.batches[("arith", 64, 4, "asynclane")] is None
    assert plan.skipped() == [("arith", 64, 4, "asynclane"), ("listops", 64, 4, "asynclane")]
    # each task/length's larger batches run right after its batch-1 runs
    assert [(r.task, r.sampler, r.batch_size) for r in plan.runs()] == [
        ("arith", "blockwise", 1), ("arith", "asynclane", 1), ("arith", "blockwise", 4),
        ("listops", "blockwise", 1), ("listops", "asynclane", 1), ("listops", "blockwise", 4)]
    r = plan.batches[("arith", 64, 4, "blockwise")]
    assert r.overrides("tiny", 8, 0, 1, ["device=cpu"]) == ["model=tiny", "sampler=blockwise", "task=arith",
                                                           "gen_length=64", "limit=8", "seed=0", "threads=1",
                                                           "batch_size=4", "device=cpu"]
    assert r.run_dir(Path("out"), "tiny") == Path("out/runs/arith/tiny-blockwise-L64-B4")
    assert bench.Run("blockwise", "arith", 64).run_dir(Path("out"), "tiny") == Path("out/runs/arith/tiny-blockwise-L64")
    # the default reads the sampler class's can_batch
    assert bench.can_batch("blockwise") is True


def test_batch_table_ratios_and_the_note_for_a_sampler_that_cannot_batch(bench):
    def cell(acc, tps, differ=None):
        return {**m(acc, 10, 1, 1, tps), **({"differ": differ} if differ else {})}

    batches = {("arith", 64, 1, "blockwise"): cell(0.5, 100.0), ("arith", 64, 1, "fast_dllm"): cell(0.5, 400.0),
               ("arith", 64, 1, "asynclane"): cell(0.6, 500.0),
               ("arith", 64, 4, "blockwise"): cell(0.5, 300.0, (0, 8)),
               ("arith", 64, 4, "fast_dllm"): cell(0.4, 600.0, (1, 8)), ("arith", 64, 4, "asynclane"): None}
    rows = {(r["sampler"], r["batch"]): r for r in bench.batch_rows(batches, "blockwise")}
    assert rows[("fast_dllm", 4)]["vs_batch1"] == pytest.approx(1.5)
    assert rows[("fast_dllm", 4)]["vs_reference"] == pytest.approx(2.0)
    assert rows[("blockwise", 4)]["vs_batch1"] == pytest.approx(3.0) and rows[("asynclane", 4)]["skipped"]
    # listed per sampler, each sampler's batch sizes together
    assert [k for k in rows] == [("blockwise", 1), ("blockwise", 4), ("fast_dllm", 1), ("fast_dllm", 4),
                                 ("asynclane", 1), ("asynclane", 4)]
    table = bench.batch_table(batches, "blockwise")
    assert "| arith | 64 | fast_dllm | 4 | 0.400 | 600.0 | 1.50x | 2.00x | 1/8 |" in table
    assert "| arith | 64 | asynclane | 1 | 0.600 | 500.0 | 1.00x | 5.00x | – |" in table
    assert f"| arith | 64 | asynclane | 4 | – | {bench.NO_BATCH} | – | – | – |" in table
    text = bench.render("cmd", RESULTS, {}, {}, batches=batches, reference="blockwise")
    assert "## Batch sweep" in text and "can_batch = False`): asynclane." in text
    assert "## Batch sweep" not in bench.render("cmd", RESULTS, {}, {})
    assert bench.count_differences({"a": "x", "b": "y", "c": "z"}, {"a": "x", "b": "q"}) == (1, 2)


def test_tiny_batch_sweep_writes_the_table_plot_and_skip_note(bench, capsys, tmp_path, monkeypatch):
    from asynclane.sampler import REGISTRY

    # fast_dllm stands in for a sampler that cannot batch (whichever samplers can, the plan asks the class)
    monkeypatch.setattr(REGISTRY["fast_dllm"], "can_batch", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "bench"
    rc = bench.main(["--samplers", "blockwise,fast_dllm", "--tasks", "arith", "--lengths", "32", "--limit", "4",
                     "--threads", "1", "--batch-sizes", "1,2", "--threshold-sweep", "none", "--no-ablations",
                     "--out", str(out)])
    assert rc == 0
    md = (out / "benchmark.md").read_text()
    assert "--batch-sizes 1,2" in md and "## Batch sweep" in md
    # batch 2 of blockwise: one warm-up call (examples 0-1), one timed; same completions as at batch 1
    assert re.search(r"\| arith \| 32 \| blockwise \| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+x \| 1\.00x \| 0/4 \|", md), md
    assert f"| arith | 32 | fast_dllm | 2 | – | {bench.NO_BATCH} | – | – | – |" in md
    assert "can_batch = False`): fast_dllm." in md
    assert "can_batch = False): fast_dllm" in capsys.readouterr().err
    runs = sorted(p.name for p in (out / "runs" / "arith").iterdir())
    assert runs == ["tiny-blockwise-L32", "tiny-blockwise-L32-B2", "tiny-fast_dllm-L32"]
    report = out / "report"
    assert (report / "tps_vs_batch.png").stat().st_size > 0 and "| blockwise [batch 2] |" in (report / "table.md").read_text()
    import pandas as pd

    g = pd.read_csv(report / "grouped.csv")
    assert sorted(zip(g["base_method"], g["batch_size"])) == [("blockwise", 1), ("blockwise", 2), ("fast_dllm", 1)]


# ------------------------------------------------------------------ --long (issue 17): task options, traces


def test_task_specs_carry_task_options_into_overrides_and_folders(bench):
    assert bench.parse_task_spec("arith") == ("arith", ())
    assert bench.parse_task_spec("trace:dep_distance=7") == ("trace", (("dep_distance", "7"),))
    for bad, msg in (("trace:dep_distance", "not KEY=VALUE"), (":x=1", "no task name"), ("trace:=3", "not KEY=VALUE")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_task_spec(bad)
    r = bench.Run("asynclane", "trace:dep_distance=7", 512, (("speculate", False),))
    assert r.overrides("tiny_long", 50, 0, None, []) == [
        "model=tiny_long", "sampler=asynclane", "task=trace", "gen_length=512", "limit=50", "seed=0",
        "task.dep_distance=7", "sampler.speculate=false"]
    assert r.run_dir(Path("o"), "tiny_long") == Path("o/runs/trace-dep_distance7/tiny_long-asynclane-no_speculate-L512")
    assert bench.Run("d3llm", "arith", 64).run_dir(Path("o"), "tiny") == Path("o/runs/arith/tiny-d3llm-L64")


def test_long_defaults_and_the_ablation_switches(bench, capsys):
    a = bench.parse_args(["--long"])
    assert (a.tasks, a.lengths, a.model, a.limit, a.thresholds, a.ablation_switches, a.traces) == (
        ["trace:dep_distance=1", "trace:dep_distance=7"], [256, 512, 1024], "tiny_long", 50, [], ["speculate"], True)
    assert a.out == Path("results/benchmark_long")
    a = bench.parse_args(["--long", "--lengths", "256", "--model", "x", "--no-traces"])
    assert (a.lengths, a.model, a.traces, a.tasks[1]) == ([256], "x", False, "trace:dep_distance=7")
    a = bench.parse_args([])
    assert (a.tasks, a.model, a.traces, len(a.ablation_switches)) == (["arith", "listops"], "tiny", False, 5)
    with pytest.raises(SystemExit):
        bench.parse_args(["--ablation-switches", "speculate,warp"])
    assert "unknown ['warp']; valid: lane_batching" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--tasks", "trace:dep_distance"])
    assert "task option 'dep_distance' is not KEY=VALUE" in capsys.readouterr().err
    plan = bench.make_plan(["d3llm", "asynclane"], ["trace:dep_distance=1"], [256], [], True, switches=["speculate"])
    assert [r.variant for r in plan.runs()] == ["d3llm", "asynclane", "asynclane-no_speculate"]
    assert list(bench.traced_runs(plan)) == [("trace:dep_distance=1", 256, "asynclane (full)"),
                                             ("trace:dep_distance=1", 256, "speculate off")]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """The tiny checkpoint stretched to the long proxy's lengths (max_length 1600, a trained-context
    record covering trace's budgets): the mechanics of --long without the tiny_long weights."""
    import json
    import shutil

    from asynclane.loading import TINY_DIR

    ckpt = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(TINY_DIR, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "max_sequence_length": 1600}))
    meta = json.loads((ckpt / "training.json").read_text())
    meta["trained_context"] = {"max_length": 1600, "prompt_tokens": 532, "gen_lengths": [256, 512, 1024],
                               "tokens": 1556, "tasks": ["trace"]}
    (ckpt / "training.json").write_text(json.dumps(meta))
    return ckpt


def test_long_invocation_traces_asynclane_and_writes_the_lane_share_table(bench, long_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "long"
    rc = bench.main(["--long", "--samplers", "d3llm,asynclane", "--lengths", "256", "--limit", "1", "--threads", "1",
                     "--out", str(out), "--extra", f"model.path={long_model}"])
    assert rc == 0
    md = (out / "benchmark.md").read_text()
    for task in ("trace:dep_distance=1", "trace:dep_distance=7"):
        for s in ("d3llm", "asynclane"):
            assert f"| {task} | 256 | {s} |" in md
        assert f"| {task} | 256 | speculate off |" in md
        assert re.search(rf"\| {task} \| 256 \| asynclane \(full\) \| 1 \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \|", md), md
    assert "## asynclane: what continuation lanes produced while refinement was open" in md
    assert "## Targets on the long proxy (issue 17), asynclane" in md
    assert "fast_dllm threshold" not in md and "compact_refresh off" not in md
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["trace-dep_distance1", "trace-dep_distance7"]
    assert (out / "runs" / "trace-dep_distance7" / "tiny_long-asynclane-no_speculate-L256" / "traces.jsonl").exists()
    assert not (out / "runs" / "trace-dep_distance7" / "tiny_long-d3llm-L256" / "traces.jsonl").exists()
    png = out / "timeline_trace-dep_distance1-L256-trace-0000.png"
    assert png.stat().st_size > 5000 and f"`{png}`" in md
    table = (out / "report" / "table.md").read_text()  # eval.report keeps the two distances apart
    assert "trace[dep_distance=1] L=256 | trace[dep_distance=7] L=256" in table


def test_tiny_long_without_its_weights_is_one_line(tmp_path):
    from asynclane.loading import TINY_LONG_DIR

    if (TINY_LONG_DIR / "config.json").exists():
        pytest.skip("the tiny_long weights are committed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "eval", "model=tiny_long", "task=trace", "gen_length=256", "limit=1",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode != 0
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: model=tiny_long: its embedded weights are not in this checkout")
    assert "model.path=" in err[0] and not list(tmp_path.glob("*.jsonl"))


def test_long_targets_judge_each_target_and_say_by_how_much(bench):
    def cell(acc, nfe, tpc):
        return {"accuracy": acc, "nfe": nfe, "tokens_per_call": tpc}

    t = "trace:dep_distance=1"
    results = {(t, 256, "d3llm"): cell(0.90, 20.0, 10.0), (t, 256, "asynclane"): cell(0.90, 10.0, 20.0),
               (t, 512, "d3llm"): cell(0.90, 40.0, 10.0), (t, 512, "asynclane"): cell(0.89, 15.0, 27.0),
               (t, 1024, "d3llm"): cell(0.92, 80.0, 10.0), (t, 1024, "asynclane"): cell(0.90, 25.0, 32.0),
               (t, 1024, "blockwise"): cell(0.95, 1024.0, 1.0)}
    rows = bench.long_targets(results)
    assert [r["met"] for r in rows] == [True, False, True, True]
    assert rows[0]["measured"] == "32.00 vs d3llm 10.00: 3.20x"
    assert rows[1]["measured"] == "0.900 vs blockwise 0.950: +5.0 points behind"
    assert rows[3]["measured"] == "2.00x -> 2.67x -> 3.20x"
    results[(t, 512, "asynclane")] = cell(0.89, 45.0, 9.0)  # more calls than d3llm at 512
    rows = bench.long_targets(results)
    assert [r["met"] for r in rows] == [True, False, False, False]
    assert "L=512: 45.0 vs d3llm 40.0 (0.89x)" in rows[2]["measured"]
    text = bench.render("cmd", results, {}, {}, targets=True)
    assert "## Targets on the long proxy (issue 17), asynclane" in text and "| trace:dep_distance=1 | tokens/call" in text
    assert "## Targets" not in bench.render("cmd", results, {}, {})
    assert bench.long_targets({(t, 256, "asynclane"): cell(1, 1, 1)}) == []  # nothing to compare with
