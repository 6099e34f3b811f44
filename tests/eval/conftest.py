"""Shared fixtures of the eval tests: a private copy of the tiny model and the runner in this process
(the resume and data-parallel tests), lm-eval's own task objects on our shipped data files."""
from __future__ import annotations

import importlib.metadata
import os
import random
import shutil
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import pytest
import torch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A copy of the embedded tiny model (``model.path=...``): the training job may re-export the tiny
    model meanwhile, and rows from other weights would not compare (the fingerprint holds their id)."""
    from asynclane.loading import TINY_DIR

    d = tmp_path_factory.mktemp("tiny")
    for f in os.listdir(TINY_DIR):
        shutil.copy(os.path.join(TINY_DIR, f), d)
    return d


@pytest.fixture
def run_in_process():
    """``eval.runner.run`` in this process.  It is the body of one ``python -m eval`` and sets that
    process's global state: it seeds torch's and Python's global generators and sets torch's thread
    count.  Here those are put back afterwards, so later tests do not inherit them."""
    from eval.runner import run

    state, threads = random.getstate(), torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            yield run
    finally:
        random.setstate(state)
        torch.set_num_threads(threads)


@contextmanager
def _own_utils():
    """Import lm-eval's task utilities with their two import-time obstacles moved aside (minerva's
    antlr 4.11 assertion; humaneval's / mbpp's download of the ``code_eval`` metric)."""
    import eval.lmeval as L
    import latex2sympy2_extended  # noqa: F401  (picks its parser by the real antlr version: load it first)
    import math_verify  # noqa: F401
    import sympy.parsing.latex  # noqa: F401

    real = importlib.metadata.version
    with mock.patch("importlib.metadata.version", lambda name: "4.11.0" if name == "antlr4-python3-runtime"
                    else real(name)), mock.patch("evaluate.load", lambda name, *a, **k: L.CodeEval()):
        yield


def _task(name: str):
    """lm-eval's own task ``name`` (its YAML and utilities) on our shipped data files."""
    import eval.lmeval as L
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    rel_yaml, files, extra = L.TASKS[name]
    with _own_utils():
        cfg = dict(load_yaml(L._tasks_dir() / rel_yaml, resolve_func=True, recursive=True))
    cfg.pop("include", None)
    cfg.pop("tag", None)
    cfg.update(task=name, dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {k: str(L.DATA_DIR / v) for k, v in files.items()}}, **extra)
    return ConfigurableTask(config=cfg)


@pytest.fixture(scope="session")
def lm_evals():
    """``.task(name)``: lm-eval's own task object; ``.own_utils()``: a context to import its utilities."""
    pytest.importorskip("lm_eval", reason="lm-eval is installed by CI (.ci/run); pip install -e '.[lm-eval]'")
    return SimpleNamespace(task=_task, own_utils=_own_utils)
