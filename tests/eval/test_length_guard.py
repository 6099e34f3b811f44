"""The length guard: a run longer than the model's ``max_length`` is one error line before any
work; one past the context the model was trained for runs, and says so in the log and in
``summary.json``'s ``warnings``.  The trainer writes that record into every checkpoint."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asynclane.loading import TINY_DIR, CheckpointError, context_limits, load_backbone
from eval.cli import UsageError, error_line
from eval.rows import SAMPLES

ROOT = Path(__file__).resolve().parents[2]
FAST = ["limit=1", "warmup=0", "threads=1", "seed=0"]


def compose_cfg(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*FAST, *overrides])


def run(tmp_path, *overrides) -> dict:
    from eval.runner import run as run_eval

    return run_eval(compose_cfg(*overrides), tmp_path / "out")


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    """The tiny checkpoint with max_length 160 (RoPE is computed, so the weights still fit) and a
    trained-context record of prompts <= 30 tokens, answers of 32: at most 62 tokens."""
    ckpt = tmp_path_factory.mktemp("short") / "model"
    shutil.copytree(TINY_DIR, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "max_sequence_length": 160}))
    meta = json.loads((ckpt / "training.json").read_text())
    meta["trained_context"] = {"max_length": 160, "prompt_tokens": 30, "gen_lengths": [32], "tokens": 62}
    (ckpt / "training.json").write_text(json.dumps(meta))
    return ckpt


def test_context_limits_read_without_loading_weights(short_model):
    limits = context_limits(short_model)
    assert limits.max_length == 160 and limits.trained["gen_lengths"] == [32] and limits.directory == short_model
    shipped = context_limits()
    assert shipped.max_length == 512
    assert {k: shipped.trained[k] for k in ("prompt_tokens", "gen_lengths", "tokens")} == {
        "prompt_tokens": 30, "gen_lengths": [64, 128, 256], "tokens": 286}


def test_within_the_trained_context_no_warning(tmp_path, short_model, caplog):
    with caplog.at_level(logging.WARNING, logger="eval.runner"):
        summary = run(tmp_path, f"model.path={short_model}", "gen_length=32")
    assert summary["n"] == 1 and "warnings" not in summary
    assert "TRAINED CONTEXT" not in caplog.text


def test_beyond_the_trained_context_warns_in_log_and_summary(tmp_path, short_model, caplog):
    with caplog.at_level(logging.WARNING, logger="eval.runner"):
        summary = run(tmp_path, f"model.path={short_model}", "gen_length=64")
    assert summary["n"] == 1  # the run goes on
    [warning] = summary["warnings"]
    assert warning.startswith("BEYOND THE TRAINED CONTEXT: model=tiny: gen_length=64 > its largest trained "
                              "answer budget (trained on 32)")
    assert "> its longest trained sequence (62)" in warning and "within max_length 160" in warning
    assert warning in caplog.text
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"] == [warning]


def test_beyond_max_length_fails_before_any_work(tmp_path, short_model, monkeypatch):
    import eval.runner as runner

    def no_loading(*a, **k):
        raise AssertionError("the weights were loaded before the length check")

    monkeypatch.setattr(runner, "cached_backbone", no_loading)
    with pytest.raises(UsageError) as e:
        run(tmp_path, f"model.path={short_model}", "gen_length=160")
    line = error_line(e.value)
    assert line == ("model=tiny: the longest prompt of task=arith (24 tokens) + gen_length=160 = 184 tokens exceeds "
                    "the model's max_length 160 (its config.json); valid here: gen_length <= 136")
    assert not (tmp_path / "out" / SAMPLES).exists()


def test_embedded_model_warns_past_its_training(tmp_path):
    # gen_length 384 (prompt 24 + 384 = 408 <= 512): within max_length, past the trained 256 / 286
    summary = run(tmp_path, "gen_length=384", "sampler.steps=12")
    [warning] = summary["warnings"]
    assert "gen_length=384 > its largest trained answer budget (trained on 64/128/256)" in warning
    assert "prompt + gen_length = 408 tokens > its longest trained sequence (286)" in warning


def test_embedded_model_beyond_max_length_is_one_error_line(tmp_path):
    # 512 + any prompt exceeds the embedded model's 512 positions: refused, exit status 2, nothing run
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", "eval", "gen_length=512", "limit=1", f"hydra.run.dir={out}"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        "error: model=tiny: the longest prompt of task=arith (24 tokens) + gen_length=512 = 536 tokens exceeds "
        "the model's max_length 512 (its config.json); valid here: gen_length <= 488"]
    assert not (out / SAMPLES).exists()


def test_trace_prompts_past_the_trained_prompts_warn(tmp_path, short_model, monkeypatch):
    import eval.runner as runner

    monkeypatch.setattr(runner, "_generate_all", lambda *a, **k: None)  # the guard only
    summary = run(tmp_path, "task=trace", "gen_length=256")
    assert "task=trace's longest prompt (" in summary["warnings"][0] and "longest trained prompt (30)" in summary["warnings"][0]
    with pytest.raises(UsageError, match=r"task=trace \(\d+ tokens\) \+ gen_length=256 = \d+ tokens exceeds the "
                                         r"model's max_length 160"):
        run(tmp_path, f"model.path={short_model}", "task=trace", "gen_length=256")


def test_model_preset_record_overrides_and_is_checked(tmp_path, short_model, monkeypatch):
    import eval.runner as runner

    monkeypatch.setattr(runner, "_generate_all", lambda *a, **k: None)
    summary = run(tmp_path, f"model.path={short_model}", "gen_length=32", "model.trained_context=40")
    assert summary["warnings"] == [
        "BEYOND THE TRAINED CONTEXT: model=tiny: prompt + gen_length = 56 tokens > its longest trained sequence "
        "(40) (from model.trained_context). The run goes on, within max_length 160, but the model never saw such "
        "lengths: its outputs there are unreliable"]
    with pytest.raises(UsageError, match=r"model.trained_context must be a positive integer .* got 'abc'"):
        run(tmp_path, "model.trained_context=abc")
    # the 8B presets: LLaDA trained for its 4096 positions, Dream for 2048 of its 131072
    presets = {m: compose_cfg(f"model={m}").model.trained_context for m in ("llada", "dream", "tiny")}
    assert presets == {"llada": 4096, "dream": 2048, "tiny": None}


def test_malformed_record_is_one_line(tmp_path, short_model):
    bad = tmp_path / "bad"
    shutil.copytree(short_model, bad)
    (bad / "training.json").write_text(json.dumps({"trained_context": {"gen_lengths": "64", "tokens": 0}}))
    with pytest.raises(CheckpointError, match=r"trained_context is malformed \(gen_lengths, tokens\)"):
        context_limits(bad)
    with pytest.raises(UsageError) as e:
        run(tmp_path, f"model.path={bad}")
    assert error_line(e.value).startswith(f"model=tiny: {bad / 'training.json'}: trained_context is malformed")


def test_fingerprint_ignores_the_record_key():
    from omegaconf import OmegaConf

    from eval.runner import _fingerprint

    conf = OmegaConf.to_container(compose_cfg(), resolve=True)
    without = {**conf, "model": {k: v for k, v in conf["model"].items() if k != "trained_context"}}
    assert _fingerprint(conf) == _fingerprint(without)  # rows written before the key existed still resume


# ------------------------------------------------------------------- the trainer writes the record

def test_trainer_writes_the_record_into_every_checkpoint(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_tiny_record", ROOT / "scripts" / "train_tiny.py")
    trainer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = trainer
    path = list(sys.path)  # the script puts src/ first on sys.path
    try:
        spec.loader.exec_module(trainer)
        argv = ["--tasks", "arith,trace", "--gen-lengths", "64,256", "--max-length", "512", "--d-model", "32",
                "--layers", "1", "--heads", "2", "--mlp", "64", "--threads", "1", "--batch-tokens", "1024",
                "--save-every", "1", "--shard-mib", "0.02", "--state", str(tmp_path / "state"),
                "--out", str(tmp_path / "out"), "--log", str(tmp_path / "log.jsonl")]
        with torch.random.fork_rng(devices=[]):
            trainer.main([*argv, "--steps", "2"])
            first = json.loads((tmp_path / "out" / "training.json").read_text())["trained_context"]
            trainer.main([*argv, "--steps", "4"])  # resumes from the sharded state
            record = json.loads((tmp_path / "out" / "training.json").read_text())["trained_context"]
            trainer.main([*argv, "--steps", "50", "--chunk-seconds", "0"])  # a chunk: one step, saved, stopped
    finally:
        sys.modules.pop(spec.name, None)
        sys.path[:] = path
    out = capsys.readouterr().out
    assert "resumed at step 2" in out and "resumed at step 4" in out and "stopped at step 5" in out
    meta = json.loads((tmp_path / "out" / "training.json").read_text())
    assert meta["step"] == 5 and meta["trained_context"]["tokens"] >= record["tokens"]
    record = meta["trained_context"]
    assert record["max_length"] == 512 and set(record["gen_lengths"]) <= {64, 256}
    assert first["tokens"] <= record["tokens"] <= 256 + 164 and record["prompt_tokens"] <= 164
    assert set(record["tasks"]) <= {"arith", "trace"} and record["tokens"] > record["prompt_tokens"]
    shards = sorted((tmp_path / "out").glob("*.safetensors")) + sorted((tmp_path / "state").glob("state-*.pt"))
    assert len(shards) > 4 and all(f.stat().st_size <= 0.02 * 2 ** 20 + 4096 for f in shards)
    assert not (tmp_path / "state" / "state.pt").exists()
    limits = context_limits(tmp_path / "out")  # the evaluator reads what the trainer wrote
    assert limits.trained == record and limits.max_length == 512
    assert load_backbone(tmp_path / "out").spec.max_length == 512


def test_trainer_compact_state_drops_the_moments_and_rewarms_on_resume(tmp_path, capsys):
    """--compact-state (a state small enough to travel to a GPU machine and back): weights, step and
    schedule without AdamW's moments; a resume starts fresh moments under a re-warmed lr."""
    spec = importlib.util.spec_from_file_location("train_tiny_compact", ROOT / "scripts" / "train_tiny.py")
    trainer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = trainer
    path = list(sys.path)
    try:
        spec.loader.exec_module(trainer)
        argv = ["--tasks", "trace", "--gen-lengths", "256", "--max-length", "512", "--d-model", "32",
                "--layers", "1", "--heads", "2", "--mlp", "64", "--threads", "1", "--batch-tokens", "1024",
                "--save-every", "1", "--warmup", "1", "--rewarm", "4", "--state", str(tmp_path / "full"),
                "--out", str(tmp_path / "out"), "--log", str(tmp_path / "log.jsonl")]
        with torch.random.fork_rng(devices=[]):
            trainer.main([*argv, "--steps", "2"])
            compact = [a if a != str(tmp_path / "full") else str(tmp_path / "compact") for a in argv]
            trainer.main([*compact, "--steps", "2", "--compact-state"])
            full, small = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("full", "compact"))
            assert small["opt"] is None and full["opt"]["state"] and small["step"] == full["step"] == 2
            size = {d: (tmp_path / d / "state.pt").stat().st_size for d in ("full", "compact")}
            assert size["compact"] < 0.4 * size["full"]
            trainer.main([*compact, "--steps", "3", "--compact-state"])  # resumes: fresh moments
            assert torch.load(tmp_path / "compact" / "state.pt", weights_only=False)["step"] == 3
            again = [a if a != str(tmp_path / "out") else str(tmp_path / "again") for a in compact]
            trainer.main([*again, "--export-only"])  # the export, rebuilt from the state alone
            half = [a if a != str(tmp_path / "again") else str(tmp_path / "half") for a in again]
            trainer.main([*half, "--export-only", "--export-dtype", "fp16"])
            with pytest.raises(SystemExit, match="--export-only: no state"):
                trainer.main([*again[:-6], "--state", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"),
                              "--export-only"])
    finally:
        sys.modules.pop(spec.name, None)
        sys.path[:] = path
    assert "resumed at step 2 (" in capsys.readouterr().out.split("fresh optimizer moments")[0]
    assert (tmp_path / "again" / "training.json").read_text() == (tmp_path / "out" / "training.json").read_text()
    a, b = load_backbone(tmp_path / "out"), load_backbone(tmp_path / "again")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    from asynclane.loading import read_state_dict

    full, half = read_state_dict(tmp_path / "again"), read_state_dict(tmp_path / "half")
    assert {t.dtype for t in half.values()} == {torch.float16} and {t.dtype for t in full.values()} == {torch.float32}
    assert all(torch.equal(full[k].half(), half[k]) for k in full)
    assert json.loads((tmp_path / "half" / "training.json").read_text())["weights_dtype"] == "fp16"
    assert load_backbone(tmp_path / "half").model.embed.weight.dtype == torch.float32  # cast on load
    args = trainer.parse_args(["--lr", "1.0", "--warmup", "0", "--steps", "100", "--rewarm", "4"])
    assert trainer.lr_at(10, args, rewarm_from=10) == pytest.approx(trainer.lr_at(10, args) / 4)
    assert trainer.lr_at(13, args, rewarm_from=10) == trainer.lr_at(13, args)
