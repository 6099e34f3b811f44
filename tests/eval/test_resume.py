"""Resume and determinism of ``python -m eval`` on the tiny model (CPU, temperature 0).

A run killed at any moment (SIGKILL, possibly mid-write) and restarted into the same directory
loses no finished example, duplicates none, and ends with the rows and summary of an
uninterrupted run, timing aside, also at ``batch_size`` > 1.  The same config run twice gives the
same completions.  The test with a real SIGKILL is ``slow``
(``python -m pytest -q -m slow tests/eval/test_resume.py``).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from eval.rows import SAMPLES, SUMMARY, read_rows

LIMIT = 6
# what decides a row's content; timing (seconds, warmup, batch) may differ between processes
ROW_KEYS = ("example_id", "completion", "prediction", "correct", "exact", "gen_tokens", "prompt_tokens", "finished",
            "nfe", "token_forwards", "fingerprint", "sampler_options")
SUMMARY_KEYS = ("n", "accuracy", "accuracy_exact", "finished_rate", "nfe_mean", "token_forwards_mean",
                "tokens_per_nfe", "gen_tokens_mean", "fingerprint")


def overrides(model_dir):
    return [f"limit={LIMIT}", "gen_length=32", "threads=1", "seed=0", f"model.path={model_dir}"]


def command(model_dir, out):
    return [sys.executable, "-m", "eval", *overrides(model_dir), f"hydra.run.dir={out}"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    res = subprocess.run(command(model_dir, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def content(rows):
    return sorted(({k: r.get(k) for k in ROW_KEYS} for r in rows), key=lambda r: r["example_id"])


def same_summary(a_dir, b_dir):
    a, b = (json.loads((d / SUMMARY).read_text()) for d in (a_dir, b_dir))
    return {k: a.get(k) for k in SUMMARY_KEYS} == {k: b.get(k) for k in SUMMARY_KEYS}


# slow (two more CLI processes, ~10 s, and it must kill between the first and the last row, which
# a busy machine can miss): test_torn_last_line_reruns_that_example starts from what a SIGKILL
# leaves behind (finished rows, a torn last row, no summary) and checks the same final rows and
# summary, and tests/eval/test_cli.py::test_rerun_resumes_without_duplicates reruns into a directory
@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(model_dir, reference, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(model_dir, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / SAMPLES
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if samples.exists() and samples.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = read_rows(samples)
    assert 1 <= len(before) < LIMIT, f"the kill came too late or too early ({len(before)} rows)"

    res = subprocess.run(command(model_dir, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    after = read_rows(samples)
    ids = [r["example_id"] for r in after]
    assert len(ids) == len(set(ids)) == LIMIT  # nothing lost, nothing twice
    assert content(after[:len(before)]) == content(before)  # finished rows kept as they were
    assert content(after) == content(read_rows(reference / SAMPLES))
    assert same_summary(out, reference)


def test_torn_last_line_reruns_that_example(model_dir, reference, tmp_path, caplog, run_in_process):
    """A kill mid-write leaves half a row: it is cut off with a warning and its example regenerated."""
    from hydra import compose, initialize_config_module

    lines = (reference / SAMPLES).read_text().splitlines(keepends=True)
    out = tmp_path / "torn"
    out.mkdir()
    (out / SAMPLES).write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(model_dir))
    with caplog.at_level(logging.WARNING):
        run_in_process(cfg, out)
    assert any("torn" in m or "not a complete JSON row" in m for m in caplog.messages)
    text = (out / SAMPLES).read_text()
    assert text.startswith("".join(lines[:3])) and text.endswith("\n")
    after = read_rows(out / SAMPLES)
    assert len(after) == LIMIT and content(after) == content(read_rows(reference / SAMPLES))
    assert same_summary(out, reference)


def test_same_config_twice_gives_identical_completions(model_dir, reference, tmp_path, run_in_process):
    """In process, twice (the backbone is loaded once for both), and across processes."""
    from hydra import compose, initialize_config_module

    from eval import runner

    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(model_dir))
    run_in_process(cfg, tmp_path / "a")
    loads = runner.LOADS
    run_in_process(cfg, tmp_path / "b")
    assert runner.LOADS == loads  # the second run reused the cached backbone
    a, b = (read_rows(tmp_path / d / SAMPLES) for d in ("a", "b"))
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert content(a) == content(b) == content(read_rows(reference / SAMPLES))
    assert same_summary(tmp_path / "a", tmp_path / "b") and same_summary(tmp_path / "a", reference)


def test_torn_resume_at_batch_size_2_equals_the_uninterrupted_run(model_dir, tmp_path, run_in_process):
    """A kill mid-batch: the batch is regenerated whole (same prompts, same generator), so its rows,
    their batch-level nfe included, and the summary equal the uninterrupted run's."""
    import torch
    from hydra import compose, initialize_config_module

    run = run_in_process
    # fast_dllm's nfe per call depends on which prompts share the call (the max over its rows)
    ov = overrides(model_dir) + ["batch_size=2", "sampler=fast_dllm", "gen_length=64", "sampler.block_length=8",
                                 "threads=2"]
    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=ov)
    threads = torch.get_num_threads()
    run(cfg, tmp_path / "whole")
    lines = (tmp_path / "whole" / SAMPLES).read_text().splitlines(keepends=True)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / SAMPLES).write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # batch 2 cut short
    run(cfg, torn)
    after = read_rows(torn / SAMPLES)
    assert len(after) == LIMIT and content(after) == content(read_rows(tmp_path / "whole" / SAMPLES))
    assert same_summary(torn, tmp_path / "whole")
    assert torch.get_num_threads() == threads  # the runs' threads=2 did not outlive them
