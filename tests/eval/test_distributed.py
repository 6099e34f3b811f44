"""Data-parallel evaluation: ``torchrun --nproc_per_node 2 -m eval`` on the CPU (gloo), tiny model.

Two ranks give the rows and summary of one process (timing aside) in one ``samples.jsonl``, in one
output directory even when the directory's name holds the start time; a rank that died loses no other
rank's rows, and a rerun at any world size completes only the missing examples.  ``fast_dllm`` at
``batch_size=2`` because its ``nfe`` is the max over a batch's rows: equal rows mean equal batches.
The test with a real SIGKILL of one rank is ``slow`` (``python -m pytest -q -m slow
tests/eval/test_distributed.py``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.cli import UsageError
from eval.distributed import World, env_world
from eval.rows import SAMPLES, SUMMARY, merge_rank_files, rank_file, rank_files, read_rows

LIMIT = 7  # batches of two: [0 1] [2 3] [4 5] [6]; rank 0 gets the 1st and 3rd, rank 1 the 2nd and 4th
OVERRIDES = [f"limit={LIMIT}", "gen_length=64", "batch_size=2", "sampler=fast_dllm", "sampler.block_length=8",
             "threads=1", "seed=0"]
ROW_KEYS = ("example_id", "completion", "prediction", "correct", "exact", "gen_tokens", "prompt_tokens", "finished",
            "nfe", "token_forwards", "fingerprint", "sampler_options", "batch")
SUMMARY_KEYS = ("n", "accuracy", "accuracy_exact", "finished_rate", "nfe_mean", "token_forwards_mean",
                "tokens_per_nfe", "gen_tokens_mean", "fingerprint")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def eval_command(model_dir, out, torchrun: bool) -> list[str]:
    return [*(TORCHRUN if torchrun else [sys.executable]), "-m", "eval", *OVERRIDES, f"model.path={model_dir}",
            f"hydra.run.dir={out}"]


def run(cmd, cwd=None) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res


def content(rows):
    """What decides a row, in example order (a resumed run appends the examples it completes)."""
    return [{k: r.get(k) for k in ROW_KEYS} for r in sorted(rows, key=lambda r: r["example_id"])]


def summary_content(out: Path) -> dict:
    s = json.loads((out / SUMMARY).read_text())
    return {k: s.get(k) for k in SUMMARY_KEYS}


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """One process."""
    out = tmp_path_factory.mktemp("single")
    run(eval_command(model_dir, out, torchrun=False))
    return out


@pytest.fixture(scope="module")
def parallel(model_dir, tmp_path_factory):
    """Two ranks, into a directory named by the start time to the microsecond (two processes never
    resolve that alike on their own)."""
    cwd = tmp_path_factory.mktemp("parallel")
    res = run(eval_command(model_dir, "runs/${now:%H-%M-%S-%f}", torchrun=True), cwd=cwd)
    dirs = list((cwd / "runs").iterdir())
    assert len(dirs) == 1, f"the ranks wrote into {len(dirs)} directories: {dirs}"
    return dirs[0], res


def test_two_ranks_give_one_process_rows_and_summary(single, parallel):
    out, res = parallel
    rows = read_rows(out / SAMPLES)
    assert [r["example_id"] for r in rows] == [f"arith-{i:04d}" for i in range(LIMIT)]  # merged in example order
    assert content(rows) == content(read_rows(single / SAMPLES))
    assert summary_content(out) == summary_content(single)
    # the batches were shared out in turn, and each row says by which rank
    assert [(r["rank"], r["world_size"]) for r in rows] == [(i // 2 % 2, 2) for i in range(LIMIT)]
    assert {(r["rank"], r["world_size"]) for r in read_rows(single / SAMPLES)} == {(0, 1)}
    assert not rank_files(out) and (out / "eval.log").exists()
    s = json.loads((out / SUMMARY).read_text())
    dp = s["data_parallel"]
    assert dp["world_size"] == 2 and [r["rank"] for r in dp["ranks"]] == [0, 1]
    assert dp["gen_tokens"] == sum(r["gen_tokens"] for r in rows) and dp["tps_wall"] > 0
    assert "data_parallel" not in json.loads((single / SUMMARY).read_text())
    assert res.stdout.count("\n  accuracy ") == 1 and "TPS, all ranks" in res.stdout  # rank 0 alone prints
    log = (out / "eval.log").read_text()
    assert "[rank 0/2]" in log and "[rank 1/2]" in log  # both ranks' lines, labelled, in the one log


def _dead_rank_state(parallel_rows, out: Path) -> list[dict]:
    """What rank 1 dying mid-write leaves: rank 0's rows whole, rank 1's first row and half of its next
    (no samples.jsonl, no summary yet).  Returns the rows that were complete."""
    out.mkdir()
    lines = {k: [json.dumps(r) + "\n" for r in parallel_rows if r["rank"] == k] for k in (0, 1)}
    (out / rank_file(SAMPLES, 0)).write_text("".join(lines[0]))
    (out / rank_file(SAMPLES, 1)).write_text(lines[1][0] + lines[1][1][: len(lines[1][1]) // 2])
    return [json.loads(line) for line in lines[0] + lines[1][:1]]


def test_a_dead_rank_loses_no_other_rows_and_the_rerun_completes_it(model_dir, single, parallel, tmp_path):
    out = tmp_path / "dead"
    before = _dead_rank_state(read_rows(parallel[0] / SAMPLES), out)
    run(eval_command(model_dir, out, torchrun=True))
    after = read_rows(out / SAMPLES)
    assert content(after) == content(read_rows(single / SAMPLES))
    assert summary_content(out) == summary_content(single)
    by_id = {r["example_id"]: r for r in after}
    assert all(by_id[r["example_id"]] == r for r in before)  # kept as written (same seconds: not rerun)
    assert len(before) < LIMIT and not rank_files(out)


def test_one_process_resumes_what_two_ranks_left(model_dir, single, parallel, tmp_path, run_in_process):
    """A rerun at world size 1 folds the rank files into samples.jsonl, then runs only the missing examples."""
    from hydra import compose, initialize_config_module

    out = tmp_path / "resume1"
    before = _dead_rank_state(read_rows(parallel[0] / SAMPLES), out)
    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*OVERRIDES, f"model.path={model_dir}"])
    run_in_process(cfg, out)
    after = read_rows(out / SAMPLES)
    assert [r["example_id"] for r in after[:len(before)]] == sorted(r["example_id"] for r in before)
    assert content(after) == content(read_rows(single / SAMPLES))
    assert summary_content(out) == summary_content(single)
    assert {r["world_size"] for r in after[len(before):]} == {1} and not rank_files(out)


# a real kill (the test above starts from what one leaves behind); slow, because it must land while both
# ranks are generating, which a busy machine can miss
@pytest.mark.slow
def test_killed_rank_resumes_to_the_uninterrupted_result(model_dir, single, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(eval_command(model_dir, out, torchrun=True), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    victim, deadline = None, time.monotonic() + 240
    try:
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            if (out / rank_file(SAMPLES, 1)).exists() and (out / rank_file(SAMPLES, 1)).read_bytes().count(b"\n"):
                victim = _rank_pid(proc.pid, 1)
            time.sleep(0.02)
        assert victim is not None, "rank 1 wrote no row before the run ended"
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kept = [r for f in rank_files(out) for r in read_rows(f)]
    assert kept and len(kept) < LIMIT and not (out / SUMMARY).exists()
    run(eval_command(model_dir, out, torchrun=True))
    after = read_rows(out / SAMPLES)
    assert content(after) == content(read_rows(single / SAMPLES))
    by_id = {r["example_id"]: r for r in after}
    assert all(by_id[r["example_id"]] == r for r in kept)


def _rank_pid(torchrun_pid: int, rank: int):
    """The pid of torchrun's worker with RANK=rank (Linux /proc), or None."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0") if ppid == torchrun_pid else []
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


# ------------------------------------------------ the pieces, no model


def _row(eid: str, fingerprint: str = "fp", **kw) -> dict:
    return {"example_id": eid, "fingerprint": fingerprint, **kw}


def _lines(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_merge_keeps_samples_and_appends_new_rows_in_example_order(tmp_path):
    samples = tmp_path / SAMPLES
    old = _lines(_row("e1", v="old"), _row("e9", "other"))
    samples.write_text(old + '{"example_id": "e')  # a torn tail: cut off
    (tmp_path / rank_file(SAMPLES, 0)).write_text(_lines(_row("e2"), _row("e0")))
    (tmp_path / rank_file(SAMPLES, 10)).write_text(_lines(_row("e4", "other")) + '{"exa')
    (tmp_path / rank_file(SAMPLES, 1)).write_text(_lines(_row("e1", v="dup"), _row("e3"), _row("e2", v="dup")))
    assert [f.name for f in rank_files(tmp_path)] == [f"samples.rank{k}.jsonl" for k in (0, 1, 10)]
    assert merge_rank_files(tmp_path, "fp", ["e0", "e1", "e2", "e3"]) == 4
    text = samples.read_text()
    assert text.startswith(old)  # the existing rows, byte for byte
    assert [(r["example_id"], r["fingerprint"]) for r in read_rows(samples)] == [
        ("e1", "fp"), ("e9", "other"), ("e0", "fp"), ("e2", "fp"), ("e3", "fp"), ("e4", "other")]
    assert "dup" not in text and not rank_files(tmp_path) and not list(tmp_path.glob("*.tmp"))
    assert merge_rank_files(tmp_path, "fp", ["e0"]) == 0 and samples.read_text() == text  # nothing to fold


def test_merge_after_a_kill_between_rename_and_removal_adds_nothing_twice(tmp_path):
    (tmp_path / SAMPLES).write_text(_lines(_row("e0"), _row("e1")))
    (tmp_path / rank_file(SAMPLES, 1)).write_text(_lines(_row("e1")))
    assert merge_rank_files(tmp_path, "fp", ["e0", "e1"]) == 0
    assert [r["example_id"] for r in read_rows(tmp_path / SAMPLES)] == ["e0", "e1"]


@pytest.mark.parametrize("env, says", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "0 <= RANK < WORLD_SIZE"),
])
def test_a_bad_torchrun_environment_is_a_usage_error(monkeypatch, env, says):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env_world() == World(0, 1, 0)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match=says.replace("(", r"\(")):
        env_world()
