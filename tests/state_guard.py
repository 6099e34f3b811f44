"""A guard against tests that leak process-global state into the tests after them.

A test or fixture that sets torch's thread count, its default dtype, a global seed, an
environment variable, the working directory... and never puts it back silently changes every
later test: a module fixture once left ``torch.set_num_threads(2)`` behind, after which a
bit-exact comparison in another module failed on some CPUs, and every remaining test ran with
two threads (many times slower on a shared two-core machine).

``tests/conftest.py`` uses the three autouse fixtures below.  Each snapshots the state listed in
``CHECKS`` when its scope starts and compares when it ends: per test (the test body and its
function-scoped fixtures), per module (module- and class-scoped fixtures, which live outside
any one test), and per session.  A difference is restored at once, so it cannot poison later
tests, and reported as an error at teardown naming what changed.  Fixtures that need other
state set it and restore it themselves (``monkeypatch``, ``torch.random.fork_rng``, a
``try/finally``, or the ``torch_threads`` fixture in ``tests/conftest.py``).

Random number generators: a test may *draw* from torch's global generator (building an
``nn.Module`` does), so its state is restored after every test and module without complaint,
and each test starts from the same global generator state whatever ran before it.  *Seeding*
it outside ``torch.random.fork_rng`` is a leak (``torch.initial_seed()`` changes).  Python's and
NumPy's global generators must be left untouched: the project draws only from its own seeded
generators (``random.Random(seed)``, ``torch.Generator``).
"""
from __future__ import annotations

import logging
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch

__all__ = ["CHECKS", "snapshot", "leaks", "restore", "global_state_guard", "global_state_guard_module",
           "global_state_guard_session"]


@dataclass(frozen=True)
class Check:
    name: str
    get: Callable[[], Any]
    set: Optional[Callable[[Any], None]]  # None: cannot be put back from here (still reported)
    same: Callable[[Any, Any], bool] = lambda a, b: a == b
    describe: Callable[[Any, Any], str] = lambda a, b: f"{a!r} -> {b!r}"
    report: bool = True  # False: restored silently (drawing from torch's global generator)


# ------------------------------------------------------------------------------------ getters/setters

def _set_deterministic(v):
    torch.use_deterministic_algorithms(v[0], warn_only=v[1])


def _umask():
    m = os.umask(0o022)
    os.umask(m)
    return m


_SIGNALS = [s for s in ("SIGINT", "SIGTERM", "SIGHUP", "SIGALRM", "SIGCHLD", "SIGPIPE", "SIGUSR1", "SIGUSR2")
            if hasattr(signal, s)]


def _signals():
    return {s: signal.getsignal(getattr(signal, s)) for s in _SIGNALS}


def _set_signals(saved):
    for s, handler in saved.items():
        if handler is not None and signal.getsignal(getattr(signal, s)) is not handler:
            signal.signal(getattr(signal, s), handler)


# set by pytest itself around every phase, and once per process by torch's lazy import of
# torch._dynamo (torch._inductor's cache directory); the project reads neither
_ENV_IGNORED = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR")


def _environ():
    return {k: v for k, v in os.environ.items() if k not in _ENV_IGNORED}


def _set_environ(saved):
    for k in set(_environ()) - set(saved):
        del os.environ[k]
    for k, v in saved.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


def _describe_dict(a, b):
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    parts = [f"+{k}={b[k]!r}" for k in added] + [f"-{k}" for k in removed]
    parts += [f"{k}: {a[k]!r} -> {b[k]!r}" for k in changed]
    return ", ".join(parts)


def _foreign_root_handlers():
    """Root handlers other than pytest's own (it adds and removes capture handlers around each phase)."""
    return [h for h in logging.root.handlers if not type(h).__module__.startswith("_pytest")]


def _set_root_handlers(saved):
    for h in _foreign_root_handlers():
        if h not in saved:
            logging.root.removeHandler(h)
    for h in saved:
        if h not in logging.root.handlers:
            logging.root.addHandler(h)


def _logger_levels():
    levels = {"<root>": logging.root.level}
    levels.update({name: lg.level for name, lg in list(logging.Logger.manager.loggerDict.items())
                   if isinstance(lg, logging.Logger)})
    return levels


_OWN_LOGGERS = ("<root>", "eval", "asynclane", "baselines", "hydra", "__main__")


def _level_changed(a, b, name):
    """A changed level of the root logger, of the project's loggers, or of any logger whose level
    was already set.  A library's own logger going from unset (or absent) to a level is the library
    configuring itself on first use (transformers and huggingface_hub set WARNING lazily), not a leak."""
    was = a.get(name, logging.NOTSET)
    if b[name] == was:
        return False
    own = name.split(".")[0] in _OWN_LOGGERS
    return own or was != logging.NOTSET


def _same_levels(a, b):
    return not any(_level_changed(a, b, k) for k in b)


def _describe_levels(a, b):
    return ", ".join(f"{k}: {logging.getLevelName(a.get(k, logging.NOTSET))} -> {logging.getLevelName(b[k])}"
                     for k in sorted(b) if _level_changed(a, b, k))


def _set_levels(saved):
    now = _logger_levels()
    for name in now:
        if _level_changed(saved, now, name):
            (logging.root if name == "<root>" else logging.getLogger(name)).setLevel(saved.get(name, logging.NOTSET))


def _hydra_initialized():
    gh = sys.modules.get("hydra.core.global_hydra")
    return bool(gh and gh.GlobalHydra.instance().is_initialized())


def _set_hydra(was):
    if not was and _hydra_initialized():
        sys.modules["hydra.core.global_hydra"].GlobalHydra.instance().clear()


def _numpy_state():
    np = sys.modules.get("numpy")
    return None if np is None else np.random.get_state(legacy=False)


def _same_numpy(a, b):
    if a is None or b is None:
        return True  # numpy imported during the scope: its generator is fresh, nobody seeded it
    return a["bit_generator"] == b["bit_generator"] and repr(a["state"]) == repr(b["state"]) \
        and a.get("has_uint32") == b.get("has_uint32") and a.get("uinteger") == b.get("uinteger")


def _set_numpy(saved):
    if saved is not None:
        sys.modules["numpy"].random.set_state(saved)


def _print_options():
    return dict(vars(torch._tensor_str.PRINT_OPTS))


def _set_print_options(saved):
    vars(torch._tensor_str.PRINT_OPTS).update(saved)


def _backend_flags():
    return {"cudnn.deterministic": torch.backends.cudnn.deterministic,
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def _set_backend_flags(saved):
    torch.backends.cudnn.deterministic = saved["cudnn.deterministic"]
    torch.backends.cudnn.benchmark = saved["cudnn.benchmark"]
    torch.backends.cudnn.allow_tf32 = saved["cudnn.allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = saved["cuda.matmul.allow_tf32"]


CHECKS = [
    Check("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
    Check("torch.get_num_interop_threads()", torch.get_num_interop_threads, None),  # settable once per process
    Check("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
    Check("torch.get_default_device()", torch.get_default_device, torch.set_default_device),
    Check("torch.is_grad_enabled()", torch.is_grad_enabled, torch.set_grad_enabled),
    Check("torch.is_inference_mode_enabled()", torch.is_inference_mode_enabled, None),
    Check("torch deterministic algorithms (enabled, warn_only)",
          lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
          _set_deterministic),
    Check("torch.get_float32_matmul_precision()", torch.get_float32_matmul_precision,
          torch.set_float32_matmul_precision),
    Check("torch.is_anomaly_enabled()", torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    Check("torch.backends flags", _backend_flags, _set_backend_flags, describe=_describe_dict),
    Check("torch print options", _print_options, _set_print_options, describe=_describe_dict),
    Check("torch.initial_seed() (torch.manual_seed outside torch.random.fork_rng)", torch.initial_seed, None),
    # restored silently after the seed check above: drawing from the global generator is allowed
    Check("torch global RNG state", torch.get_rng_state, torch.set_rng_state, same=torch.equal, report=False),
    Check("Python's global random state (random.seed or a draw from it)", random.getstate, random.setstate,
          describe=lambda a, b: "changed"),
    Check("NumPy's global random state (np.random.seed or a draw from it)", _numpy_state, _set_numpy,
          same=_same_numpy, describe=lambda a, b: "changed"),
    Check("os.environ", _environ, _set_environ, describe=_describe_dict),
    Check("os.getcwd()", os.getcwd, os.chdir),
    Check("umask", _umask, os.umask, describe=lambda a, b: f"{a:#o} -> {b:#o}"),
    Check("sys.path", lambda: list(sys.path), lambda saved: sys.path.__setitem__(slice(None), saved),
          describe=lambda a, b: f"+{[p for p in b if p not in a]} -{[p for p in a if p not in b]}"),
    Check("signal handlers", _signals, _set_signals, describe=_describe_dict),
    Check("logging.disable level", lambda: logging.root.manager.disable, logging.disable),
    Check("logger levels", _logger_levels, _set_levels, same=_same_levels, describe=_describe_levels),
    Check("root logging handlers", _foreign_root_handlers, _set_root_handlers),
    Check("Hydra GlobalHydra initialized", _hydra_initialized, _set_hydra),
]


def snapshot() -> dict:
    return {c.name: c.get() for c in CHECKS}


def leaks(before: dict, after: Optional[dict] = None) -> list[str]:
    """'name: change' for each reported check that differs between two snapshots."""
    after = snapshot() if after is None else after
    return [f"{c.name}: {c.describe(before[c.name], after[c.name])}" for c in CHECKS
            if c.report and not c.same(before[c.name], after[c.name])]


def restore(before: dict) -> None:
    """Put back everything that differs from ``before`` (as far as it can be put back)."""
    for c in CHECKS:
        if c.set is not None and not c.same(before[c.name], c.get()):
            c.set(before[c.name])


def _guard(what: str):
    before = snapshot()
    yield
    found = leaks(before)
    restore(before)
    if found:
        pytest.fail(f"{what} leaked global state (restored now; restore it where it is set):\n  "
                    + "\n  ".join(found), pytrace=False)


# autouse fixtures run first within their scope, so each window encloses every other fixture of it
@pytest.fixture(autouse=True)
def global_state_guard(request):
    """The test body and its function-scoped fixtures."""
    yield from _guard(f"test {request.node.nodeid}")


@pytest.fixture(scope="module", autouse=True)
def global_state_guard_module(request):
    """Module- and class-scoped fixtures (and anything a per-test check could not see)."""
    yield from _guard(f"module {request.node.nodeid} (its module- or class-scoped fixtures)")


@pytest.fixture(scope="session", autouse=True)
def global_state_guard_session():
    """Session- and package-scoped fixtures."""
    yield from _guard("the session (session- or package-scoped fixtures)")
