"""Sweeps beyond Hydra's basic launcher: the pieces behind ``conf/hydra/launcher/``.

The presets need Hydra's launcher plugins (``pip install -e ".[cluster]"``):

- ``joblib`` (hydra-joblib-launcher): the jobs run side by side on this machine in ``n_jobs``
  worker processes, by default one per visible GPU (:func:`gpu_count`, the resolver
  ``${eval.gpu_count:}``); :class:`PinGPUs` gives each worker one GPU.
- ``submitit_slurm`` (hydra-submitit-launcher): one SLURM array task per job, with the GPUs SLURM grants it.
- ``submitit_local``: the same submitit machinery on this machine, every job in its own process.

Loading: the runner keeps one loaded backbone per process (:func:`eval.runner.cached_backbone`).
A submitit job is a process of its own and loads its model once.  A joblib worker is a long-lived
process that runs several jobs one after another, so it loads a model once and keeps it for its
later jobs with the same model, path, dtype and device (a sweep over samplers and lengths of one
model loads it at most ``n_jobs`` times in all).

Why a GPU per worker rather than per job: CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when a
process first touches the GPU, so a worker's device is fixed by its first job; pinning job ``k``
to GPU ``k mod G`` would put a worker's later jobs on its first GPU anyway, and two running jobs on
one GPU whenever jobs of unequal length finish out of turn.  So in its first job each worker claims
a slot, the lowest-numbered lock file under ``<sweep dir>/.gpu_slots/`` it can lock (``flock``, held
while the worker lives and released by the OS when it exits, so a replaced worker frees its slot),
and sets ``CUDA_VISIBLE_DEVICES`` to GPU ``slot mod G`` before the runner first touches CUDA.  With
``n_jobs`` <= G each worker has a GPU of its own; with more workers than GPUs they share them
evenly.  ``device=auto`` (or ``cuda``) in a worker then means its own GPU.
"""
from __future__ import annotations

import fcntl
import itertools
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Optional

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLOTS_DIR = ".gpu_slots"


# the plugins' launcher classes (the presets' _target_) -> (preset, pip package)
PLUGIN_CLASSES = {JOBLIB_LAUNCHER: ("joblib", "hydra-joblib-launcher"),
                  "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher":
                      ("submitit_slurm", "hydra-submitit-launcher"),
                  "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher":
                      ("submitit_local", "hydra-submitit-launcher")}


def missing_launcher_class_hint(error: BaseException) -> Optional[str]:
    """For Hydra's ``Unknown plugin class : '<launcher>'`` (a preset chosen without its plugin installed),
    the one line saying what to install; None for any other error."""
    text = str(error)
    for cls, (preset, package) in PLUGIN_CLASSES.items():
        if isinstance(error, RuntimeError) and text.startswith("Unknown plugin class") and cls in text:
            return (f"hydra/launcher={preset} needs the Hydra plugin {package}, which is not installed: "
                    f"pip install -e \".[cluster]\"")
    return None


def nvidia_smi_gpus() -> list[str]:
    """The indices of this machine's NVIDIA GPUs as ``nvidia-smi`` lists them; [] without one (or
    without the driver).  Asked of the driver's tool, not of torch: ``torch.cuda`` would start CUDA
    in this process, after which a worker could no longer choose its GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def visible_gpus(environ: Mapping[str, str] = os.environ,
                 query: Callable[[], list[str]] = nvidia_smi_gpus) -> list[str]:
    """The GPUs jobs may use, as ``CUDA_VISIBLE_DEVICES`` entries: that variable's entries when it
    is set (indices, UUIDs or MIG ids; empty: none), otherwise every GPU ``query`` finds."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    return query()


def gpu_count() -> int:
    """The resolver ``${eval.gpu_count:}``: the number of visible GPUs, or 1 on a machine without
    one (the ``joblib`` preset's ``n_jobs``; on a CPU give ``hydra.launcher.n_jobs=N``)."""
    return max(1, len(visible_gpus()))


def register_resolvers() -> None:
    """Register ``${eval.gpu_count:}`` (run when the config package ``eval.conf`` is imported)."""
    OmegaConf.register_new_resolver("eval.gpu_count", gpu_count, replace=True)


def claim_slot(directory: Path) -> tuple[int, IO]:
    """The lowest slot number whose lock file under ``directory`` this process can lock, and that
    file, open and locked: the slot stays taken until the file is closed or the process exits."""
    directory.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        fh = open(directory / f"{slot}.lock", "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another worker holds it
            fh.close()
            continue
        return slot, fh
    raise AssertionError("unreachable")


def slot_gpu(slot: int, gpus: list[str]) -> str:
    """The GPU of worker slot ``slot``: slots go round the GPUs in order."""
    return gpus[slot % len(gpus)]


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


# this process's pin, once made: (slot, GPU, the held lock file)
_pinned: Optional[tuple[int, str, IO]] = None


def pin_process_gpu(slots_dir: Path, environ: Any = os.environ,
                    query: Callable[[], list[str]] = nvidia_smi_gpus) -> Optional[str]:
    """Give this process one GPU (the first call; later calls keep it): claim a slot under
    ``slots_dir`` and set ``CUDA_VISIBLE_DEVICES`` to that slot's GPU.  Returns the GPU, or None
    where no GPU is visible (the jobs run on the CPU)."""
    global _pinned
    if _pinned is not None:
        return _pinned[1]
    gpus = visible_gpus(environ, query)
    if not gpus:
        return None
    slot, fh = claim_slot(slots_dir)
    gpu = slot_gpu(slot, gpus)
    if _cuda_started():  # CUDA has read the variable already: setting it would only mislead the log
        log.warning("worker %d: CUDA started before the GPU pin; it keeps the GPUs it saw (slot %d would "
                    "have been CUDA_VISIBLE_DEVICES=%s)", os.getpid(), slot, gpu)
    else:
        environ["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("worker %d: slot %d of GPUs %s, CUDA_VISIBLE_DEVICES=%s", os.getpid(), slot, ",".join(gpus), gpu)
    _pinned = (slot, gpu, fh)
    return gpu


def is_joblib(config) -> bool:
    return OmegaConf.select(config, "hydra.launcher._target_", default=None) == JOBLIB_LAUNCHER


class PinGPUs(Callback):
    """Under the joblib launcher (``hydra/launcher=joblib``), each worker process takes one GPU
    (:func:`pin_process_gpu`) before its first job runs; under any other launcher it does nothing."""

    def on_multirun_start(self, config, **kwargs) -> None:
        if is_joblib(config):
            gpus = visible_gpus()
            n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs")
            log.info("joblib: %s worker(s); %s", n_jobs,
                     f"each takes one of the GPUs {','.join(gpus)} (CUDA_VISIBLE_DEVICES)" if gpus
                     else "no GPU visible: the workers run on the CPU")

    def on_job_start(self, config, **kwargs) -> None:
        if is_joblib(config):
            pin_process_gpu(Path(OmegaConf.select(config, "hydra.sweep.dir")) / SLOTS_DIR)
