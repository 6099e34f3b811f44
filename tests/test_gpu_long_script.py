"""scripts/gpu_long.sh end to end on the CPU with a very small model (slow: about a minute): a
window trains a chunk on a compact state, evaluates through the harness (with the fp16 parity
runs) and leaves at most 8 files; a second window resumes from the carried state; unpack restores
the state, the export and the window's results; promote writes fp16 weights that load; a window
whose evaluation never ran (no rest.tar.gz) still unpacks; bench runs the long benchmark and the
oracle floor on the promoted model and brings them back, and a bench cut off by its time limit says
so and still packs what it has."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_long.sh"


def _run(args, env, timeout=600):
    res = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res.stdout + res.stderr


@pytest.mark.slow
def test_windows_unpack_and_promote_on_a_small_cpu_model(tmp_path):
    env = {**os.environ, "PY": sys.executable, "STATE": str(tmp_path / "state"), "DEVICE": "cpu", "AMP": "",
           "WORKERS": "0", "THREADS": "1", "BATCH_TOKENS": "2048", "TRAIN_SECONDS": "4", "TOTAL_SECONDS": "30",
           "QUALITY_N": "2", "LENGTHS": "256", "PARITY": "1", "HF_HUB_OFFLINE": "1",
           "MODEL": "--d-model 32 --layers 1 --heads 2 --mlp 64 --max-length 600",
           "RECIPE": "--tasks trace --gen-lengths 256 --lr 1e-3 --warmup 5 --probe-every 100000 --save-every 1000"}
    out = tmp_path / "out"
    out.mkdir()
    first = _run(["window"], {**env, "OUT": str(out)})
    assert "resumed" not in first and "fp16 weights, blockwise-L256: 2/2 completions equal fp32's" in first
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and (out / "rest.tar.gz").exists() and (out / "state" / "state-index.pt").exists()
    assert not (out / "work").exists()
    out2 = tmp_path / "out2"
    out2.mkdir()
    second = _run(["window"], {**env, "OUT": str(out2), "PARITY": "0"})  # the state stayed in STATE: carried
    assert "fresh optimizer moments, lr re-warmed" in second and "fp16 weights" not in second
    here = {**env, "STATE": str(tmp_path / "here"), "EXPORT": str(tmp_path / "export"),
            "RESULTS": str(tmp_path / "results"), "PROMOTED": str(tmp_path / "promoted")}
    _run(["unpack", str(out2)], here)
    step = json.loads((tmp_path / "export" / "training.json").read_text())["step"]
    window = tmp_path / "results" / f"step{step}"
    assert {p.name for p in window.iterdir()} == {"quality", "train.out", "training.json"}
    assert len(list(window.rglob("summary.json"))) == 4  # 256 one token per step, 4 and 8 per step, fast_dllm
    assert (tmp_path / "results" / "log.jsonl").read_text() == (out2 / "state" / "log.jsonl").read_text()
    _run(["promote"], here)
    from asynclane.loading import load_backbone, read_state_dict

    assert {t.dtype for t in read_state_dict(tmp_path / "promoted").values()} == {__import__("torch").float16}
    assert load_backbone(tmp_path / "promoted").spec.max_length == 600
    (out2 / "rest.tar.gz").unlink()  # the evaluation ran out of time: the state alone still unpacks
    _run(["unpack", str(out2)], here)

    # bench on the promoted model: the long benchmark (two samplers, L=256) and the oracle floor
    bench = {**here, "BENCH_OUT": str(tmp_path / "b" / "benchmark_long"), "ORACLE": "1",
             "BENCH_ARGS": f"--samplers d3llm,asynclane --lengths 256 --limit 1 --threads 1 "
                           f"--extra model.path={tmp_path / 'promoted'}",
             "ORACLE_ARGS": f"--model-path {tmp_path / 'promoted'} --lengths 256 --limit 1"}
    out3 = tmp_path / "out3"
    out3.mkdir()
    said = _run(["bench"], {**bench, "OUT": str(out3)})
    assert "oracle tokens/call" in said and [p.name for p in out3.iterdir()] == ["bench.tar.gz"]
    _run(["unpack-bench", str(out3)], {**bench, "BENCH_OUT": str(tmp_path / "u" / "benchmark_long")})
    got = tmp_path / "u" / "benchmark_long"
    assert "## Targets on the long proxy (issue 17)" in (got / "benchmark.md").read_text()
    assert "| trace:dep_distance=7 | 256 |" in (got / "oracle_floor.md").read_text()
    cut = _run(["bench"], {**bench, "OUT": str(out3), "BENCH_SECONDS": "1", "ORACLE": "0",
                           "BENCH_OUT": str(tmp_path / "c" / "benchmark_long")})
    assert "benchmark stopped (time limit or error above): a bench window resumes it" in cut
    assert (out3 / "bench.tar.gz").exists()
