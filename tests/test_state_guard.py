"""tests/state_guard.py: a test, module fixture or session fixture that leaks process-global state
fails at its teardown with what it changed, and the state is restored before the next test.

The guard runs on purpose-built tests in a separate pytest process (pytester), with the same
one-thread default as tests/conftest.py.  The first leaky module is the old ``tiny`` fixture of
tests/asynclane/test_asynclane_tiny.py: ``torch.set_num_threads(2)``, never restored.
"""
from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})

import pytest
import torch

torch.set_num_threads(1)

from state_guard import global_state_guard, global_state_guard_module, global_state_guard_session  # noqa


@pytest.fixture(scope="session")
def float64_for_the_session():
    torch.set_default_dtype(torch.float64)  # never restored
    return torch.float64
"""

LEAKY_MODULE = """
import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)  # never restored
    return "model"


def test_uses_two_threads(tiny):
    assert torch.get_num_threads() == 2


def test_still_two_threads(tiny):
    assert torch.get_num_threads() == 2
"""

NEXT_MODULE = """
import torch


def test_next_module_starts_with_one_thread_again():
    assert torch.get_num_threads() == 1
"""

LEAKY_TESTS = """
import logging
import os
import random

import torch


def test_env():
    os.environ["STATE_GUARD_LEAK"] = "1"


def test_seed():
    torch.manual_seed(3)


def test_dtype():
    torch.set_default_dtype(torch.float64)


def test_cwd(tmp_path):
    os.chdir(tmp_path)


def test_python_random():
    random.seed(1)


def test_grad():
    torch.set_grad_enabled(False)


def test_deterministic():
    torch.use_deterministic_algorithms(True)


def test_logger_level():
    logging.getLogger("eval").setLevel(logging.DEBUG)


def test_root_handler():
    logging.getLogger().addHandler(logging.NullHandler())
"""

CLEAN_TESTS = """
import logging
import os
import random

import pytest
import torch


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_monkeypatched_env_and_cwd(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_GUARD_OK", "1")
    monkeypatch.chdir(tmp_path)


def test_seed_inside_fork_rng():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)


def test_drawing_from_the_global_generator():
    torch.randn(3)


def test_own_generators():
    random.Random(1).random()
    torch.randn(3, generator=torch.Generator().manual_seed(0))


def test_a_fixture_that_restores(two_threads):
    assert torch.get_num_threads() == 2


def test_caplog_levels(caplog):
    caplog.set_level(logging.DEBUG, logger="eval")


def test_everything_was_restored(tmp_path):
    assert torch.get_num_threads() == 1 and torch.get_default_dtype() == torch.float32
    assert torch.is_grad_enabled() and not torch.are_deterministic_algorithms_enabled()
    assert "STATE_GUARD_LEAK" not in os.environ and "STATE_GUARD_OK" not in os.environ
    assert logging.getLogger("eval").level == logging.NOTSET
"""

SESSION_USER = """
import torch


def test_uses_the_session_fixture(float64_for_the_session):
    assert torch.get_default_dtype() == torch.float64
"""

LEAKS = {  # test -> the line its teardown error must contain
    "test_env": "os.environ: +STATE_GUARD_LEAK='1'",
    "test_seed": "torch.initial_seed() (torch.manual_seed outside torch.random.fork_rng):",
    "test_dtype": "torch.get_default_dtype(): torch.float32 -> torch.float64",
    "test_cwd": "os.getcwd():",
    "test_python_random": "Python's global random state (random.seed or a draw from it): changed",
    "test_grad": "torch.is_grad_enabled(): True -> False",
    "test_deterministic": "torch deterministic algorithms (enabled, warn_only): (False, False) -> (True, False)",
    "test_logger_level": "logger levels: eval: NOTSET -> DEBUG",
    "test_root_handler": "root logging handlers:",
}


def test_guard_reports_and_restores_leaks(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_a_leaky_module=LEAKY_MODULE, test_b_next_module=NEXT_MODULE,
                        test_c_leaky_tests=LEAKY_TESTS, test_d_clean_tests=CLEAN_TESTS,
                        test_e_session=SESSION_USER)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rE")
    out = res.stdout.str()
    # every test body passes; each leak is one error at teardown (the module's on its last test,
    # the session's on the session's last test)
    res.assert_outcomes(passed=2 + 1 + len(LEAKS) + 7 + 1, errors=1 + len(LEAKS) + 1)
    assert ("module test_a_leaky_module.py (its module- or class-scoped fixtures) leaked global state" in out
            and "torch.get_num_threads(): 1 -> 2" in out), out
    for test, line in LEAKS.items():
        assert f"test test_c_leaky_tests.py::{test} leaked global state" in out, out
        assert line in out, (test, out)
    assert "the session (session- or package-scoped fixtures) leaked global state" in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("ERROR ")]
    assert not any("test_b_next_module" in ln or "test_d_clean_tests" in ln for ln in errors), errors
