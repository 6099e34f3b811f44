"""End to end: ``python -m eval`` on the embedded tiny model, plus the runner's row/summary pieces.

The subprocess runs need the project installed (``pip install -e .``: the configs are the
package ``eval.conf``) and the tiny checkpoint in ``src/asynclane/tiny``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from eval.runner import SAMPLES, SUMMARY, _appender, read_rows, summarize

ROW_FIELDS = {"example_id", "task", "task_version", "sampler", "sampler_options", "model", "gen_length", "seed",
              "completion", "answer", "correct", "gen_tokens", "nfe", "token_forwards", "seconds", "warmup"}
SUMMARY_FIELDS = {"n", "accuracy", "tps", "tps_budget", "nfe_mean", "tokens_per_nfe", "seconds_mean",
                  "gen_tokens_mean", "device", "device_name", "dtype", "torch_version", "transformers_version",
                  "git_commit", "config"}
# small and single-threaded: the machine is shared with a training job
FAST = ["gen_length=32", "threads=1", "seed=0"]


def run_eval(*overrides: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("eval.conf") is None:
        pytest.fail("the project is not installed (the configs are the package eval.conf): pip install -e .")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "eval", *overrides], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cwd = tmp_path_factory.mktemp("elsewhere")  # configs come from the package, not the cwd
    res = run_eval("limit=3", *FAST, f"hydra.run.dir={out}", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res, (out / SAMPLES).read_text()


def test_run_writes_rows_and_summary(first_run):
    out, res, _ = first_run
    rows = read_rows(out / SAMPLES)
    assert [r["example_id"] for r in rows] == ["arith-0000", "arith-0001", "arith-0002"]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert (r["task"], r["sampler"], r["model"], r["gen_length"]) == ("arith", "blockwise", "tiny", 32)
        assert r["task_version"] == "arith-v1"
        assert 1 <= r["gen_tokens"] <= 32 and r["nfe"] == 32  # blockwise default: steps == gen_length
        assert r["token_forwards"] >= r["nfe"] * 32 and r["seconds"] > 0
        assert isinstance(r["correct"], bool) and isinstance(r["completion"], str)
        assert "<|" not in r["completion"]  # EOS excluded, special tokens dropped
    assert [r["warmup"] for r in rows] == [True, False, False]

    s = json.loads((out / SUMMARY).read_text())
    assert SUMMARY_FIELDS <= set(s), SUMMARY_FIELDS - set(s)
    assert s["n"] == 3 and s["n_timed"] == 2 and s["nfe_mean"] == 32
    assert s["accuracy"] == sum(r["correct"] for r in rows) / 3
    timed = rows[1:]
    secs = sum(r["seconds"] for r in timed)
    assert s["tps"] == pytest.approx(sum(r["gen_tokens"] for r in timed) / secs)
    assert s["tps_budget"] == pytest.approx(32 * 2 / secs)
    assert s["config"]["sampler"]["gen_length"] == 32 and s["dtype"] == "float32"
    assert (out / ".hydra" / "config.yaml").exists()
    assert "accuracy" in res.stdout and "TPS" in res.stdout


def test_rerun_resumes_without_duplicates(first_run):
    out, _, before = first_run
    res = run_eval("limit=4", *FAST, f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    after = (out / SAMPLES).read_text()
    assert after.startswith(before)  # earlier rows untouched
    ids = [r["example_id"] for r in read_rows(out / SAMPLES)]
    assert ids == ["arith-0000", "arith-0001", "arith-0002", "arith-0003"]
    assert json.loads((out / SUMMARY).read_text())["n"] == 4


@pytest.mark.parametrize("override, valid", [("sampler=no_such_sampler", "blockwise"),
                                             ("task=no_such_task", "listops"),
                                             ("model=no_such_model", "llada")])
def test_unknown_choice_names_valid_choices(tmp_path, override, valid):
    res = run_eval(override, f"hydra.run.dir={tmp_path}")
    assert res.returncode != 0
    assert override.split("=")[1] in res.stderr and valid in res.stderr


@pytest.mark.parametrize("override, says", [("+sampler.no_such_option=1", "valid options"),
                                            ("limit_mode=sideways", "valid choices: first, random")])
def test_bad_option_fails_cleanly(tmp_path, override, says):
    res = run_eval(override, f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and says in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_checkpoint_is_actionable(tmp_path):
    res = run_eval("model=llada", f"model.path={tmp_path / 'no_llada_here'}", f"hydra.run.dir={tmp_path}",
                   env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "no_llada_here" in res.stderr and "model.path=" in res.stderr


# the runner's pieces, in process (no model)

def _row(i, batch, seconds, gen_tokens, correct, warmup=False, nfe=8):
    return {"example_id": f"x-{i}", "batch": batch, "seconds": seconds, "gen_tokens": gen_tokens, "nfe": nfe,
            "token_forwards": nfe * 40, "gen_length": 16, "correct": correct, "exact": correct,
            "finished": True, "warmup": warmup}


def test_summary_counts_each_batch_once_and_skips_warmup():
    rows = [_row(0, "a", 9.0, 5, True, warmup=True),
            _row(1, "b", 2.0, 4, True), _row(2, "b", 2.0, 6, False),  # one batch of two
            _row(3, "c", 1.0, 10, False)]
    s = summarize(rows)
    assert s["n"] == 4 and s["n_timed"] == 3 and s["accuracy"] == 0.5 and s["accuracy_exact"] == 0.5
    assert s["tps"] == pytest.approx((4 + 6 + 10) / 3.0)
    assert s["tps_budget"] == pytest.approx(3 * 16 / 3.0)
    assert s["tokens_per_nfe"] == pytest.approx(25 / 32)
    assert summarize([_row(0, "a", 1.0, 3, True, warmup=True)])["tps"] is None
    assert summarize([])["n"] == 0


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
    path = tmp_path / SAMPLES
    path.write_text(json.dumps({"example_id": "a"}) + "\n" + '{"example_id": "b", "compl')
    assert [r["example_id"] for r in read_rows(path)] == ["a"]
    with _appender(path) as f:
        f.write(json.dumps({"example_id": "c"}) + "\n")
    assert [r["example_id"] for r in read_rows(path)] == ["a", "c"]
    assert path.read_text() == '{"example_id": "a"}\n{"example_id": "c"}\n'  # the torn tail is cut off


def test_progress_reports_accuracy_and_tps(first_run):
    out, _, _ = first_run
    log = (out / "eval.log").read_text()
    assert "3/3 done, accuracy so far" in log and "TPS" in log


def test_unbatchable_sampler_with_batch_size_fails_up_front(tmp_path, monkeypatch):
    """A sampler that declares can_batch = False (none registered here does: a third-party one may)."""
    from asynclane.sampler import REGISTRY

    monkeypatch.setattr(REGISTRY["blockwise"], "can_batch", False)
    line = run_error_line(tmp_path, "sampler=blockwise", "batch_size=2", "limit=2")
    assert "can_batch = False" in line and "batch_size=1" in line
    assert not (tmp_path / "out" / SAMPLES).exists()  # refused before any work


def test_pooled_sampler_runs_batched(tmp_path):
    """AsyncLane at batch_size 2 (row pooling): the rows of a one-by-one run, one generate call per batch."""
    one = run_eval("sampler=asynclane", "limit=3", *FAST, f"hydra.run.dir={tmp_path / 'one'}")
    two = run_eval("sampler=asynclane", "batch_size=2", "limit=3", *FAST, f"hydra.run.dir={tmp_path / 'two'}")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    rows = [read_rows(tmp_path / d / SAMPLES) for d in ("one", "two")]
    assert [r["completion"] for r in rows[0]] == [r["completion"] for r in rows[1]]
    b = [r["batch"] for r in rows[1]]
    assert b[0] == b[1] != b[2] and rows[1][0]["nfe"] == rows[1][1]["nfe"]


def test_save_traces_writes_one_record_per_generate_call(tmp_path):
    res = run_eval("sampler=asynclane", "limit=2", "save_traces=true", *FAST, f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert [r["example_ids"] for r in recs] == [["arith-0000"], ["arith-0001"]]
    rows = read_rows(tmp_path / SAMPLES)
    for rec, row in zip(recs, rows):
        assert isinstance(rec["trace"], list) and rec["trace"]
        assert len(rec["trace"]) == row["nfe"]  # AsyncLane: one batched model call per iteration


# ------------------------------------------------ every bad input: one `error:` line, exit status 2

def one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    return lines[0]


def _bad_dirs(tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "rows_dir" / SAMPLES).mkdir(parents=True)
    return {"sys": "/sys/asynclane_eval_out", "file_parent": tmp_path / "a_file" / "out", "rows_dir": tmp_path / "rows_dir"}


@pytest.mark.parametrize("case, says", [
    ("sys", "cannot write the output directory /sys/asynclane_eval_out ("),
    ("file_parent", "a_file is a file"),
    ("rows_dir", f"{SAMPLES} (Is a directory)"),
])
def test_unwritable_output_directory_is_one_line(tmp_path, case, says):
    if case == "sys" and not os.path.isdir("/sys"):
        pytest.skip("no /sys here")
    out = _bad_dirs(tmp_path)[case]
    line = one_error_line(run_eval("limit=1", *FAST, f"hydra.run.dir={out}"))
    assert says in line and "hydra.run.dir=DIR" in line


@pytest.mark.parametrize("override, says", [
    ("+gen_lenght=64", "unknown config key gen_lenght (did you mean gen_length?)"),
    ("gen_lenght=64", "unknown config key gen_lenght (did you mean gen_length?)"),
    ("++model.revision=main", "unknown config key model.revision"),
    ("device=tpu", "unknown device 'tpu'; valid choices: auto, cpu, cuda, cuda:N"),
])
def test_bad_key_or_value_is_one_line(tmp_path, override, says):
    out = tmp_path / "out"
    line = one_error_line(run_eval(override, "limit=1", *FAST, f"hydra.run.dir={out}"))
    assert says in line
    if "device" not in override:  # refused before Hydra makes the output directory, and nothing ran
        assert "valid keys" in line and "+gen_lenght" not in line and not out.exists()


def compose_cfg(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        return compose(config_name="config", overrides=["limit=1", *FAST, *overrides])


def run_error_line(tmp_path, *overrides) -> str:
    """In process: the runner's error for ``overrides`` and the one line the command line prints for it."""
    from eval.cli import error_line
    from eval.runner import run

    with pytest.raises(Exception) as e:
        run(compose_cfg(*overrides), tmp_path / "out")
    line = error_line(e.value)
    assert line is not None and "\n" not in line, repr(e.value)
    return line


def test_device_cuda_without_cuda_is_one_line(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = run_error_line(tmp_path, "device=cuda")
    assert "device 'cuda' is not available" in line and "valid here: auto, cpu" in line


def test_corrupted_checkpoint_is_one_line(tmp_path):
    from asynclane.loading import TINY_DIR

    model = tmp_path / "model"
    shutil.copytree(TINY_DIR, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    line = run_error_line(tmp_path, f"model.path={model}")
    assert line.startswith(f"model=tiny: {weights} is not a readable safetensors file")
    assert "truncated or corrupted" in line


def test_non_integer_sampler_option_names_the_key(tmp_path):
    line = run_error_line(tmp_path, "sampler.block_length=abc")
    assert "block_length must be an integer, got 'abc'" in line


def test_missing_dream_checkpoint_suggests_dream(tmp_path):
    line = run_error_line(tmp_path, "model=dream", f"model.path={tmp_path / 'nope'}")
    assert line.startswith("model=dream: ") and "nope" in line and "model.path=DIR" in line
    assert "hf download Dream-org/Dream-v0-Instruct-7B" in line and "LLaDA" not in line


def test_altered_data_file_is_one_line_pointing_into_the_repository(tmp_path, monkeypatch):
    from eval.tasks import datafiles

    sha, count = datafiles.FILES["gsm8k/test.jsonl"]
    monkeypatch.setitem(datafiles.FILES, "gsm8k/test.jsonl", ("0" * 64, count))
    datafiles._load.cache_clear()
    try:
        line = run_error_line(tmp_path, "task=gsm8k")
    finally:
        datafiles._load.cache_clear()
    assert "test.jsonl: sha256 " in line and "does not match the recorded" in line
    assert "git checkout -- src/eval/data/gsm8k/test.jsonl" in line and "shared/" not in line


def test_tps_na_for_a_warmup_only_run_says_why():
    from eval.__main__ import tps_note

    note = tps_note({"n": 1, "n_timed": 0, "tps": None, "config": {"warmup": 1}})
    assert "every row is a warm-up row" in note and "warmup=1" in note and "warmup=0" in note


# ------------------------------------------------ threads and progress

def test_rows_and_summary_record_threads(first_run):
    out, res, _ = first_run
    assert {r["threads"] for r in read_rows(out / SAMPLES)} == {1}
    assert json.loads((out / SUMMARY).read_text())["threads"] == 1
    assert "1 CPU thread(s)" in res.stdout
    assert "3/3 done" in res.stdout  # progress reaches the console when it is not a terminal


def test_auto_threads_one_for_a_small_model_on_cpu():
    import torch

    from eval.runner import TORCH_THREADS, choose_threads

    class Fake:
        def __init__(self, n_in, device="cpu"):
            self.model = torch.nn.Linear(n_in, 10_000, bias=False, device="meta")
            self.device = torch.device(device)

    assert choose_threads(None, Fake(350)) == 1  # 3.5M parameters: the tiny model's size
    assert choose_threads(3, Fake(350)) == 3  # an explicit count wins
    assert choose_threads(None, Fake(20_000)) == TORCH_THREADS  # 200M: torch's default


def test_resume_with_other_threads_is_not_blended_into_one_tps():
    rows = [_row(0, "a", 1.0, 10, True, warmup=True), _row(1, "b", 1.0, 10, True), _row(2, "c", 1.0, 20, True),
            _row(3, "d", 5.0, 10, True, warmup=True), _row(4, "e", 5.0, 10, True)]
    for r in rows:
        r["threads"] = 1 if r["batch"] in "abc" else 2
    s = summarize(rows)
    assert s["threads"] == 1 and s["n_timed"] == 2
    assert s["tps"] == pytest.approx(30 / 2.0)  # the threads=1 rows alone, not (30 + 10) / 7
    assert s["tps_by_threads"] == {"1": pytest.approx(15.0), "2": pytest.approx(2.0)}
    assert "tps_by_threads" not in summarize(rows[:3])


def test_progress_line_after_the_first_batch_each_tenth_and_each_minute():
    from eval.runner import PROGRESS_SECONDS, progress_due

    assert progress_due(1, 0, 50, 0.0)  # the first example: the user sees the pace at once
    assert [d for d in range(2, 51) if progress_due(d, d - 1, 50, 0.0)] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert progress_due(7, 6, 50, PROGRESS_SECONDS)  # a slow run still prints once a minute
