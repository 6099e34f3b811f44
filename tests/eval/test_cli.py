"""End to end: ``python -m eval`` on the embedded tiny model, plus the runner's row/summary pieces.

The subprocess runs need the project installed (``pip install -e .``: the configs are the
package ``eval.conf``) and the tiny checkpoint in ``src/asynclane/tiny``.
"""
from __future__ import annotations

import importlib.util
import json
import os
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


def test_unbatchable_sampler_with_batch_size_fails_up_front(tmp_path):
    res = run_eval("sampler=asynclane", "batch_size=2", "limit=2", *FAST, f"hydra.run.dir={tmp_path}")
    assert res.returncode != 0
    assert "can_batch = False" in res.stderr and "batch_size=1" in res.stderr
    assert not (tmp_path / SAMPLES).exists()  # refused before any work


def test_save_traces_writes_one_record_per_generate_call(tmp_path):
    res = run_eval("sampler=asynclane", "limit=2", "save_traces=true", *FAST, f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert [r["example_ids"] for r in recs] == [["arith-0000"], ["arith-0001"]]
    rows = read_rows(tmp_path / SAMPLES)
    for rec, row in zip(recs, rows):
        assert isinstance(rec["trace"], list) and rec["trace"]
        assert len(rec["trace"]) == row["nfe"]  # AsyncLane: one batched model call per iteration
