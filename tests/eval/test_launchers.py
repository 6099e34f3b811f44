"""The launcher presets (conf/hydra/launcher/) and the GPU pin behind ``joblib`` (eval.launch).

The pin's logic runs here with a fake GPU list.  The sweeps need Hydra's launcher plugins (the
``cluster`` extra) and skip without them: a 2 x 2 sweep on the embedded model under ``joblib``
(joblib, two workers pinned to two fake GPUs, run on the CPU) and under ``submitit_local`` (submitit,
one process per job) gives the same rows as under the basic launcher; the ``submitit_slurm`` preset, which
needs a cluster, is run up to ``sbatch`` (a stand-in that keeps the script it is given).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eval import launch
from eval.cli import error_line
from eval.rows import SAMPLES

INSTALL = 'pip install -e ".[cluster]"'


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # not even the namespace package hydra_plugins (no plugin at all)
        return False


needs_joblib = pytest.mark.skipif(not _installed("hydra_plugins.hydra_joblib_launcher"),
                                  reason=f"the Hydra plugin hydra-joblib-launcher is not installed: {INSTALL}")
needs_submitit = pytest.mark.skipif(not _installed("hydra_plugins.hydra_submitit_launcher"),
                                    reason=f"the Hydra plugin hydra-submitit-launcher is not installed: {INSTALL}")
# the 2 x 2 sweep every launcher runs: small, single-threaded, on the CPU
SWEEP = ["sampler=fast_dllm,blockwise", "gen_length=32,64", "limit=2", "threads=1", "device=cpu", "seed=0"]
JOB_DIRS = ["tiny-fast_dllm-L32-0", "tiny-fast_dllm-L64-1", "tiny-blockwise-L32-2", "tiny-blockwise-L64-3"]


# ------------------------------------------------------------------ the GPU pin, with fake GPUs

def test_visible_gpus_follow_cuda_visible_devices_else_the_driver():
    def asked():
        raise AssertionError("CUDA_VISIBLE_DEVICES is set: the driver must not be asked")

    assert launch.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}, asked) == ["2", "5"]
    assert launch.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-a1,MIG-b2"}, asked) == ["GPU-a1", "MIG-b2"]
    assert launch.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, asked) == []  # set and empty: no GPU
    assert launch.visible_gpus({}, lambda: ["0", "1", "2"]) == ["0", "1", "2"]
    assert launch.visible_gpus({}, lambda: []) == []


def test_gpu_count_resolver_counts_visible_gpus(monkeypatch):
    import eval.conf  # noqa: F401  (registers ${eval.gpu_count:})

    node = OmegaConf.create({"n_jobs": "${eval.gpu_count:}"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert node.n_jobs == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert node.n_jobs == 1  # no GPU: one worker unless n_jobs is given


def test_slots_are_claimed_lowest_free_first_and_freed_on_close(tmp_path):
    a, fa = launch.claim_slot(tmp_path / "slots")
    b, fb = launch.claim_slot(tmp_path / "slots")
    assert (a, b) == (0, 1)
    fa.close()  # a worker exits: its slot is free again
    c, fc = launch.claim_slot(tmp_path / "slots")
    assert c == 0
    fb.close()
    fc.close()


def test_slots_go_round_the_gpus():
    assert [launch.slot_gpu(s, ["3", "5"]) for s in range(5)] == ["3", "5", "3", "5", "3"]


def test_each_worker_pins_its_own_gpu_once(tmp_path, monkeypatch):
    slots, gpus = tmp_path / "slots", lambda: ["4", "6"]
    held = []
    try:
        for expect in ("4", "6", "4"):  # three workers on two GPUs
            monkeypatch.setattr(launch, "_pinned", None)  # a fresh worker process
            env = {}
            assert launch.pin_process_gpu(slots, env, gpus) == expect
            assert env == {"CUDA_VISIBLE_DEVICES": expect}
            assert launch.pin_process_gpu(slots, {}, lambda: ["9"]) == expect  # its later jobs keep it
            held.append(launch._pinned[2])
        monkeypatch.setattr(launch, "_pinned", None)
        env = {}
        assert launch.pin_process_gpu(slots, env, lambda: []) is None and env == {}  # no GPU: nothing to pin
    finally:
        for fh in held:
            fh.close()


def test_pin_acts_only_under_the_joblib_launcher(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_pinned", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    basic = OmegaConf.create({"hydra": {"launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher."
                                                                  "BasicLauncher"}, "sweep": {"dir": str(tmp_path)}}})
    launch.PinGPUs().on_job_start(basic)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3" and not (tmp_path / launch.SLOTS_DIR).exists()
    joblib = OmegaConf.merge(basic, {"hydra": {"launcher": {"_target_": launch.JOBLIB_LAUNCHER}}})
    try:
        launch.PinGPUs().on_job_start(joblib)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        assert (tmp_path / launch.SLOTS_DIR / "0.lock").exists()
    finally:
        if launch._pinned is not None:
            launch._pinned[2].close()


def test_a_missing_launcher_plugin_is_one_line_naming_the_extra():
    """Hydra's error for a preset whose plugin is absent (its launcher class is unknown)."""
    for cls, (preset, package) in launch.PLUGIN_CLASSES.items():
        line = error_line(RuntimeError(f"Unknown plugin class : '{cls}'"))
        assert line == f"hydra/launcher={preset} needs the Hydra plugin {package}, which is not installed: {INSTALL}"
    assert error_line(RuntimeError("Unknown plugin class : 'x.Y'")) is None
    assert error_line(RuntimeError("something else")) is None


def test_the_presets_name_the_plugin_classes():
    """Each preset has the name and _target_ of its plugin's config (so it merges onto that schema)."""
    import eval.conf

    conf = Path(eval.conf.__file__).parent / "hydra" / "launcher"
    for cls, (preset, _) in launch.PLUGIN_CLASSES.items():
        assert OmegaConf.load(conf / f"{preset}.yaml")["_target_"] == cls


# ------------------------------------------------------------------ the presets compose

def _hydra_cfg(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="eval.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra


@needs_joblib
def test_joblib_preset_runs_one_worker_per_visible_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    launcher = _hydra_cfg("hydra/launcher=joblib").launcher
    assert launcher._target_ == launch.JOBLIB_LAUNCHER and launcher.n_jobs == 4
    assert _hydra_cfg("hydra/launcher=joblib", "hydra.launcher.n_jobs=2").launcher.n_jobs == 2


@needs_submitit
def test_slurm_preset_composes_with_its_options():
    launcher = _hydra_cfg("hydra/launcher=submitit_slurm").launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_task, launcher.cpus_per_task, launcher.mem_gb,
            launcher.timeout_min, launcher.array_parallelism) == (None, 1, 8, 64, 240, 16)
    launcher = _hydra_cfg("hydra/launcher=submitit_slurm", "hydra.launcher.partition=a100", "hydra.launcher.timeout_min=30",
                          "hydra.launcher.gpus_per_task=null", "hydra.launcher.gres=gpu:1",
                          "hydra.launcher.setup=[module load cuda]").launcher
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_task, launcher.gres,
            list(launcher.setup)) == ("a100", 30, None, "gpu:1", ["module load cuda"])
    with pytest.raises(Exception, match="partiton"):  # the plugin's schema refuses a misspelt key
        _hydra_cfg("hydra/launcher=submitit_slurm", "hydra.launcher.partiton=a100")
    local = _hydra_cfg("hydra/launcher=submitit_local").launcher
    assert local._target_.endswith("LocalLauncher") and (local.gpus_per_node, local.timeout_min) == (1, 240)


# ------------------------------------------------------------------ end to end

def _eval(*overrides: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "eval", *overrides], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _rows(sweep: Path) -> dict[str, list[dict]]:
    """Each job's rows, timing left out (``seconds``: the one field two runs of a job may differ in)."""
    out = {}
    for job in sorted((sweep / "arith").iterdir()):
        rows = [json.loads(line) for line in (job / SAMPLES).read_text().splitlines()]
        out[job.name] = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    return out


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("basic")
    res = _eval("-m", *SWEEP, f"hydra.sweep.dir={out}", cwd=out)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out)
    assert sorted(rows) == sorted(JOB_DIRS) and all(len(r) == 2 for r in rows.values())
    return rows


@needs_joblib
def test_joblib_sweep_pins_a_gpu_per_worker_and_gives_the_basic_rows(basic_sweep, tmp_path):
    # two fake GPUs: n_jobs comes from CUDA_VISIBLE_DEVICES, each worker pins one (the CPU build runs anyway)
    res = _eval("-m", "hydra/launcher=joblib", *SWEEP, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path,
                env={"CUDA_VISIBLE_DEVICES": "7,9"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "n_jobs=2" in res.stdout + res.stderr  # the joblib launcher's own report of its settings
    assert "deprecated" not in res.stderr  # the preset merges onto the plugin's schema without Hydra's note
    assert _rows(tmp_path) == basic_sweep
    logs = [(tmp_path / "arith" / job / "eval.log").read_text() for job in JOB_DIRS]
    pins = {}  # worker pid -> GPU: a worker pins in its first job, and its later jobs keep the pin
    for log in logs:
        for pid, gpu in re.findall(r"worker (\d+): slot \d+ of GPUs 7,9, CUDA_VISIBLE_DEVICES=(\S+)", log):
            assert pins.setdefault(pid, gpu) == gpu
    assert pins and len(set(pins.values())) == len(pins) <= 2 and set(pins.values()) <= {"7", "9"}
    loads = sum(log.count("loading tiny from") for log in logs)
    assert loads == len(pins)  # each worker loads the model once, its later jobs reuse it
    assert sum(log.count("reusing the loaded tiny") for log in logs) == len(JOB_DIRS) - loads


@needs_submitit
def test_submitit_local_sweep_gives_the_basic_rows(basic_sweep, tmp_path):
    res = _eval("-m", "hydra/launcher=submitit_local", *SWEEP, f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _rows(tmp_path) == basic_sweep
    for job in JOB_DIRS:  # one process per job: each loads the model once
        assert (tmp_path / "arith" / job / "eval.log").read_text().count("loading tiny from") == 1
    assert len([d for d in (tmp_path / ".submitit").iterdir() if d.name.isdigit()]) == len(JOB_DIRS)


@needs_submitit
def test_submitit_slurm_sweep_submits_one_job_array_with_the_preset_options(tmp_path):
    # no cluster here: stand-ins for srun (submitit looks for it) and sbatch (keeps its script, then refuses)
    bin_dir, script = tmp_path / "bin", tmp_path / "sbatch_script.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "sbatch: error: a stand-in" >&2\nexit 1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    sweep = tmp_path / "sweep"
    res = _eval("-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=a100", "hydra.launcher.array_parallelism=2",
                "sampler=asynclane,fast_dllm", "gen_length=256,512,1024", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                env={"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert res.returncode != 0 and "sbatch: error: a stand-in" in res.stderr
    flags = set(re.findall(r"^#SBATCH (\S+)$", script.read_text(), re.M))
    assert {"--array=0-5%2", "--partition=a100", "--gpus-per-task=1", "--cpus-per-task=8", "--mem=64GB",
            "--time=240", "--nodes=1", "--ntasks-per-node=1", "--job-name=eval"} <= flags, flags
    assert f"-m submitit.core._submit {sweep}/.submitit/" in script.read_text()  # runs this interpreter's eval
