"""``python -m eval.report``: tables and plots are group-bys of rows.

Synthetic rows (no model) check the numbers against hand-computed group-bys; one small real
sweep of the tiny model (two samplers, a Hydra multirun) checks the whole path, and that the
multirun loads the backbone once.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from eval.report import gather, group, latex_table, markdown_table, method_labels, pareto_front, write_report
from eval.rows import SAMPLES


def _rows(sampler, L, spec, options=None, task="arith", model="tiny"):
    """spec: (correct, gen_tokens, nfe, seconds, warmup) per example."""
    fp = f"{sampler}-{L}-{json.dumps(options, sort_keys=True)}"
    return [{"example_id": f"{task}-{i:04d}", "task": task, "task_version": f"{task}-v1", "sampler": sampler,
             "sampler_options": options or {}, "model": model, "gen_length": L, "seed": 0, "batch_size": 1,
             "fingerprint": fp, "completion": "", "answer": "1", "prediction": "1", "correct": c, "exact": c,
             "gen_tokens": t, "prompt_tokens": 10, "finished": True, "nfe": nfe, "token_forwards": nfe * 40,
             "seconds": s, "warmup": w, "batch": f"{fp}:{i}"}
            for i, (c, t, nfe, s, w) in enumerate(spec)]


# blockwise is the reference: TPS (warm-up row excluded) 32: 60/4 = 15, 64: 120/4 = 30
SPECS = {
    ("blockwise", 32): [(True, 32, 32, 9.0, True), (True, 10, 32, 1.0, False), (False, 20, 32, 1.0, False),
                        (True, 30, 32, 2.0, False)],
    ("blockwise", 64): [(True, 64, 64, 9.0, True), (True, 40, 64, 2.0, False), (True, 40, 64, 1.0, False),
                        (False, 40, 64, 1.0, False)],
    # fast_dllm: 32: 60/2 = 30 (2x), 64: 120/2 = 60 (2x); lower accuracy at 64
    ("fast_dllm", 32): [(True, 32, 8, 9.0, True), (True, 20, 10, 0.5, False), (True, 20, 10, 0.5, False),
                        (False, 20, 10, 1.0, False)],
    ("fast_dllm", 64): [(False, 64, 8, 9.0, True), (False, 40, 20, 0.5, False), (True, 40, 20, 0.5, False),
                        (False, 40, 20, 1.0, False)],
}


@pytest.fixture
def synthetic(tmp_path):
    root = tmp_path / "sweep"
    for (s, L), spec in SPECS.items():
        d = root / "arith" / f"tiny-{s}-L{L}-0"
        d.mkdir(parents=True)
        (d / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in _rows(s, L, spec)))
    return root


def test_grouped_values_are_group_bys_of_rows(synthetic):
    g = group(gather([synthetic])).set_index(["method", "gen_length"])
    assert len(g) == 4 and set(g["n"]) == {4} and set(g["n_timed"]) == {3}
    for (s, L), spec in SPECS.items():
        timed = [x for x in spec if not x[4]]
        c = g.loc[(s, L)]
        assert c["accuracy"] == sum(x[0] for x in spec) / 4
        assert c["tps"] == pytest.approx(sum(x[1] for x in timed) / sum(x[3] for x in timed))
        assert c["nfe_mean"] == sum(x[2] for x in spec) / 4
        assert c["tokens_per_nfe"] == pytest.approx(sum(x[1] for x in spec) / sum(x[2] for x in spec))
    assert g.loc[("blockwise", 32), "tps"] == pytest.approx(15) and g.loc[("blockwise", 64), "tps"] == pytest.approx(30)
    assert g.loc[("fast_dllm", 32), "speedup"] == pytest.approx(2.0)
    assert g.loc[("fast_dllm", 64), "speedup"] == pytest.approx(2.0)
    assert g.loc[("blockwise", 32), "speedup"] == pytest.approx(1.0)
    # the reference is a choice: relative to fast_dllm, blockwise runs at half speed
    g2 = group(gather([synthetic]), reference="fast_dllm").set_index(["method", "gen_length"])
    assert g2.loc[("blockwise", 64), "speedup"] == pytest.approx(0.5)
    with pytest.raises(SystemExit, match="not among"):
        group(gather([synthetic]), reference="no_such")


def test_pareto_front():
    # (tps, acc): (15, .75) (30, .75) (30, .75)-tie... dominated points are off the front
    assert pareto_front([15, 30, 30, 60], [0.75, 0.75, 0.5, 0.25]) == [False, True, False, True]
    assert pareto_front([1, 2, 3], [3, 2, 1]) == [True, True, True]
    assert pareto_front([1, 1], [1, 1]) == [True, True]  # equal points do not dominate each other
    assert pareto_front([float("nan"), 1], [1, 0]) == [False, True]


def test_front_in_grouped_frame(synthetic):
    g = group(gather([synthetic])).set_index(["method", "gen_length"])
    # blockwise 32: (15, 75%), 64: (30, 75%); fast_dllm 32: (30, 75%), 64: (60, 25%)
    assert g["pareto"].to_dict() == {("blockwise", 32): False, ("blockwise", 64): True,
                                     ("fast_dllm", 32): True, ("fast_dllm", 64): True}


def test_tables_show_the_grouped_numbers(synthetic):
    g = group(gather([synthetic]))
    md = markdown_table(g)
    lines = md.splitlines()
    assert lines[0] == "| Sampler | arith L=32 | arith L=64 |"
    assert lines[2] == "| blockwise | 75.0 / 15.0 (1.00×) / 32.0 | 75.0 / 30.0 (1.00×) / 64.0 |"
    assert lines[3] == "| fast_dllm | 75.0 / 30.0 (2.00×) / 9.5 | 25.0 / 60.0 (2.00×) / 17.0 |"
    tex = latex_table(g)
    assert r"\multicolumn{4}{c}{arith, $L=32$}" in tex and r"\cmidrule(lr){6-9}" in tex
    assert r"fast\_dllm & 75.0 & 30.0 & 2.00$\times$ & 9.5 & 25.0 & 60.0 & 2.00$\times$ & 17.0 \\" in tex


def test_variants_are_labelled_by_the_options_that_differ(tmp_path):
    rows = (_rows("fast_dllm", 32, SPECS[("fast_dllm", 32)], {"threshold": 0.9, "cache": "prefix"})
            + _rows("fast_dllm", 32, SPECS[("fast_dllm", 32)], {"threshold": 0.7, "cache": "prefix"})
            + _rows("blockwise", 32, SPECS[("blockwise", 32)], {"steps": None}))
    (tmp_path / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = gather([tmp_path / SAMPLES])
    assert sorted(df["method"].unique()) == ["blockwise", "fast_dllm (threshold=0.7)", "fast_dllm (threshold=0.9)"]
    assert list(method_labels(df)) == list(df["method"])
    g = group(df, reference="fast_dllm (threshold=0.9)")
    assert list(g["method"])[0] == "fast_dllm (threshold=0.9)"
    with pytest.raises(SystemExit, match="several variants"):
        group(df, reference="fast_dllm")


def test_ablation_variants_are_named_by_their_departure_from_the_usual_values(tmp_path):
    full = {"cascade": True, "draft_reuse": True, "threshold": 0.9}
    spec = SPECS[("fast_dllm", 32)]
    rows = (_rows("asynclane", 32, spec, full) + _rows("asynclane", 32, spec, {**full, "cascade": False})
            + _rows("asynclane", 32, spec, {**full, "draft_reuse": False}))
    (tmp_path / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = gather([tmp_path / SAMPLES])
    assert sorted(df["method"].unique()) == ["asynclane", "asynclane (cascade=False)", "asynclane (draft_reuse=False)"]
    # two variants, no usual value: both named in full, as a sweep is
    rows = (_rows("asynclane", 32, spec, full) + _rows("asynclane", 32, spec, {**full, "cascade": False}))
    (tmp_path / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sorted(gather([tmp_path / SAMPLES])["method"].unique()) == [
        "asynclane (cascade=False)", "asynclane (cascade=True)"]


def test_writes_every_output(synthetic, tmp_path):
    files = write_report([synthetic], out=tmp_path / "out")
    for key in ("csv", "md", "tex", "accuracy_vs_tps", "tps_vs_length"):
        assert os.path.getsize(files[key]) > 0, key
    with open(files["accuracy_vs_tps"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import pandas as pd

    csv = pd.read_csv(files["csv"])
    assert {"accuracy", "tps", "tps_budget", "speedup", "nfe_mean", "pareto", "n"} <= set(csv.columns)
    assert "75.0 / 15.0 (1.00×)" in open(files["md"]).read()


def test_duplicate_rows_count_once(synthetic):
    d = synthetic / "arith" / "tiny-blockwise-L32-0"
    copy = synthetic / "arith" / "copy"
    shutil.copytree(d, copy)  # the same rows twice (same fingerprint and example ids)
    g = group(gather([synthetic])).set_index(["method", "gen_length"])
    assert g.loc[("blockwise", 32), "n"] == 4


# ------------------------------------------------------------------ a real (tiny) sweep


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    from asynclane.loading import TINY_DIR

    model = tmp_path_factory.mktemp("model")  # a copy: the training job may re-export the tiny model
    for f in os.listdir(TINY_DIR):
        shutil.copy(os.path.join(TINY_DIR, f), model)
    sweep = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", "eval", "-m", "sampler=blockwise,fast_dllm", "gen_length=32",
                          "limit=2", "threads=1", f"model.path={model}", f"hydra.sweep.dir={sweep}"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path_factory.mktemp("cwd"))
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep, res


def test_multirun_loads_the_backbone_once(tiny_sweep):
    sweep, res = tiny_sweep
    runs = sorted(p.parent.relative_to(sweep).as_posix() for p in sweep.rglob(SAMPLES))
    assert runs == ["arith/tiny-blockwise-L32-0", "arith/tiny-fast_dllm-L32-1"]  # gathered by path
    log = res.stdout + res.stderr
    assert len(re.findall(r"\] - loading tiny from ", log)) == 1, log[-3000:]
    assert len(re.findall(r"\] - reusing the loaded tiny from ", log)) == 1


def test_report_over_a_real_sweep(tiny_sweep, tmp_path):
    sweep, _ = tiny_sweep
    res = subprocess.run([sys.executable, "-m", "eval.report", str(sweep), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    import pandas as pd

    g = pd.read_csv(tmp_path / "grouped.csv").set_index("method")
    assert sorted(g.index) == ["blockwise", "fast_dllm"] and set(g["n"]) == {2}
    for run in sweep.rglob("summary.json"):  # each cell equals its run's own summary (the same group-by)
        s = json.loads(run.read_text())
        c = g.loc[s["sampler"]]
        for k in ("accuracy", "nfe_mean", "tokens_per_nfe", "gen_tokens_mean", "tps"):
            assert math.isclose(c[k], s[k], rel_tol=1e-9), k
    assert g.loc["blockwise", "speedup"] == 1.0
    assert g.loc["fast_dllm", "nfe_mean"] < g.loc["blockwise", "nfe_mean"] == 32
    for f in ("table.md", "table.tex", "accuracy_vs_tps.png", "tps_vs_length.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "| blockwise |" in res.stdout


def test_default_reference_is_the_blockwise_variant_with_most_cells(tmp_path):
    rows = (_rows("blockwise", 32, SPECS[("blockwise", 32)], {"steps": None})
            + _rows("blockwise", 64, SPECS[("blockwise", 64)], {"steps": None})
            + _rows("blockwise", 64, SPECS[("blockwise", 32)], {"steps": 16})
            + _rows("fast_dllm", 64, SPECS[("fast_dllm", 64)]))
    (tmp_path / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    g = group(gather([tmp_path]))
    assert set(g["reference"]) == {"blockwise (steps=null)"}
    s = g.set_index(["method", "gen_length"])["speedup"]
    assert s[("blockwise (steps=16)", 64)] == pytest.approx(15 / 30)


def test_rows_without_sampler_options_take_them_from_the_run_config(tmp_path):
    for steps in (16, 32):
        d = tmp_path / f"run{steps}"
        (d / ".hydra").mkdir(parents=True)
        rows = _rows("blockwise", 32, SPECS[("blockwise", 32)], {"x": steps})
        for r in rows:
            del r["sampler_options"]
        (d / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / ".hydra" / "config.yaml").write_text(
            f"gen_length: 32\nsampler:\n  name: blockwise\n  gen_length: ${{gen_length}}\n  steps: {steps}\n")
    assert sorted(gather([tmp_path])["method"].unique()) == ["blockwise (steps=16)", "blockwise (steps=32)"]


# ------------------------------------------------------------------ a batch sweep (rows of several batch sizes)


def _batched(rows, size, seconds):
    """``rows`` as one run at ``size`` prompts per generate call: batches of consecutive rows share
    their batch key, fingerprint and ``seconds`` (one per batch); the first batch is the warm-up."""
    out = []
    for i, r in enumerate(rows):
        fp = f"{r['fingerprint']}-b{size}"
        out.append({**r, "batch_size": size, "fingerprint": fp, "batch": f"{fp}:{i // size}",
                    "seconds": seconds[i // size], "warmup": i < size})
    return out


@pytest.fixture
def batch_sweep(tmp_path):
    # batch 1: SPECS (blockwise 15 TPS, fast_dllm 30) and asynclane (batch 1 only, as a sampler that
    # cannot batch); batch 2, timed batch = examples 2-3: blockwise 50 tokens / 1.0 s = 50 TPS,
    # fast_dllm 40 / 0.5 = 80 TPS
    bw, fd = SPECS[("blockwise", 32)], SPECS[("fast_dllm", 32)]
    rows = (_rows("blockwise", 32, bw) + _rows("fast_dllm", 32, fd) + _rows("asynclane", 32, fd)
            + _batched(_rows("blockwise", 32, bw), 2, [9.0, 1.0]) + _batched(_rows("fast_dllm", 32, fd), 2, [9.0, 0.5]))
    (tmp_path / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_batch_sizes_are_kept_apart_and_compared_at_the_same_size(batch_sweep):
    df = gather([batch_sweep])
    assert sorted(df["method"].unique()) == ["asynclane [batch 1]", "blockwise [batch 1]", "blockwise [batch 2]",
                                             "fast_dllm [batch 1]", "fast_dllm [batch 2]"]
    g = group(df)
    assert list(g["method"]) == ["blockwise [batch 1]", "blockwise [batch 2]", "asynclane [batch 1]",
                                 "fast_dllm [batch 1]", "fast_dllm [batch 2]"]
    assert set(g["reference"]) == {"blockwise"} and set(g["n"]) == {4}
    c = g.set_index("method")
    assert c.loc["blockwise [batch 2]", "tps"] == pytest.approx(50.0)
    assert c.loc["fast_dllm [batch 2]", "tps"] == pytest.approx(80.0)
    # speedup: over blockwise at the same batch size; speedup_vs_batch1: over the same sampler at batch 1
    assert c.loc["fast_dllm [batch 1]", "speedup"] == pytest.approx(2.0)
    assert c.loc["fast_dllm [batch 2]", "speedup"] == pytest.approx(80 / 50)
    assert c.loc["blockwise [batch 2]", "speedup_vs_batch1"] == pytest.approx(50 / 15)
    assert c.loc["fast_dllm [batch 2]", "speedup_vs_batch1"] == pytest.approx(80 / 30)
    assert c.loc["asynclane [batch 1]", "speedup_vs_batch1"] == pytest.approx(1.0)
    assert c.loc["fast_dllm [batch 2]", "base_method"] == "fast_dllm" and c.loc["fast_dllm [batch 2]", "batch_size"] == 2
    md = markdown_table(g).splitlines()
    assert md[3] == "| blockwise [batch 2] | 75.0 / 50.0 (1.00×) / 32.0 |"
    assert md[6] == "| fast_dllm [batch 2] | 75.0 / 80.0 (1.60×) / 9.5 |"
    # an explicit reference is a label without the batch
    c = group(df, reference="fast_dllm").set_index("method")
    assert c.loc["blockwise [batch 2]", "speedup"] == pytest.approx(50 / 80)


def test_batch_sweep_report_adds_the_tps_vs_batch_plot(batch_sweep, synthetic, tmp_path):
    files = write_report([batch_sweep], out=tmp_path / "sweep")
    with open(files["tps_vs_batch"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(files["md"]).read()
    assert "Batch sweep (batch sizes 1, 2" in md and "| fast_dllm [batch 2] |" in md
    import pandas as pd

    csv = pd.read_csv(files["csv"])
    assert {"batch_size", "base_method", "speedup_vs_batch1"} <= set(csv.columns)
    # rows of one batch size: no batch labels, columns or plot (a batch-1 report is unchanged)
    files = write_report([synthetic], out=tmp_path / "plain")
    assert "tps_vs_batch" not in files and not (tmp_path / "plain" / "tps_vs_batch.png").exists()
    assert not {"batch_size", "base_method", "speedup_vs_batch1"} & set(pd.read_csv(files["csv"]).columns)
    assert "[batch" not in open(files["md"]).read() and "Batch sweep" not in open(files["md"]).read()


def test_task_variants_of_one_task_get_their_own_columns(tmp_path):
    spec = SPECS[("blockwise", 32)]
    rows = []
    for dep in (1, 7):
        rs = _rows("blockwise", 32, spec, task="trace")
        for r in rs:
            r.update(task_variant=f"dep_distance={dep}", fingerprint=f"{r['fingerprint']}-{dep}")
        rows += rs
    other = _rows("blockwise", 32, spec)  # arith: one variant, its name unchanged
    for r in other:
        r["task_variant"] = ""
    (tmp_path / SAMPLES).write_text("".join(json.dumps(r) + "\n" for r in rows + other))
    g = group(gather([tmp_path / SAMPLES]))
    assert sorted(g["task"]) == ["arith", "trace[dep_distance=1]", "trace[dep_distance=7]"]
    assert set(g["n"]) == {4}  # the two distances are not pooled into one cell
    assert r"trace[dep\_distance=7], $L=32$" in latex_table(g)
