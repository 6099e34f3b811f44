"""The command line's guard rails: every expected error becomes one ``error: ...`` line.

Light on purpose (Hydra and OmegaConf, no torch), so a bad command answers before torch loads.

- :class:`UsageError`: a bad configuration value; its message names the key or value and what is
  valid.  The runner raises it (also for a missing or unreadable checkpoint, naming the model).
- :func:`check_keys`: top-level keys (and ``model.*`` keys) that nothing reads are refused, with
  the valid ones and the closest match (``+gen_lenght=64`` would otherwise run and be ignored).
- :func:`check_output_dir`: the output directory must be creatable and writable, and the files
  a run writes into it must be files.
- :class:`Preflight`: a Hydra callback (``hydra.callbacks`` in conf/config.yaml) running both
  checks before Hydra creates the output directory (under ``torchrun``, after giving every rank
  rank 0's ``${now:...}``, so that all ranks share one directory: :mod:`eval.distributed`).
- :func:`run_cli` / :func:`one_line_errors`: print that line on stderr and exit with status 2;
  with ``HYDRA_FULL_ERROR=1`` the traceback instead.
- :func:`error_line`: the one line for an exception (ours, an altered or malformed data file,
  Hydra's config errors, a launcher preset whose plugin is not installed), or ``None`` for anything
  unexpected (a bug: the traceback is printed).
"""
from __future__ import annotations

import difflib
import os
import sys
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from hydra.experimental.callback import Callback

# files a run writes into its directory (Hydra's log is <job name>.log: eval.log)
OUTPUT_FILES = ("samples.jsonl", "summary.json", "traces.jsonl", "eval.log")


class UsageError(ValueError):
    """A bad configuration value; the message names the value and the valid choices."""


def preset(group: Optional[str], name: str) -> dict:
    """A shipped config file (``conf/<group>/<name>.yaml``) as written, uninterpolated; {} if none."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    d = files("eval.conf")
    f = (d.joinpath(group) if group else d).joinpath(f"{name}.yaml")
    return OmegaConf.to_container(OmegaConf.create(f.read_text())) if f.is_file() else {}


@lru_cache(maxsize=None)
def known_keys() -> dict[str, tuple[str, ...]]:
    """The keys something reads: ``""``: conf/config.yaml's keys and groups; ``"model"``: the
    keys of the model presets (conf/model/*.yaml).  Samplers and tasks check their own options."""
    from importlib.resources import files

    top = preset(None, "config")
    groups = {next(iter(d)) for d in top.pop("defaults") if isinstance(d, dict)}
    top.pop("hydra", None)
    model = set()
    for f in files("eval.conf").joinpath("model").iterdir():
        if f.name.endswith(".yaml"):
            model |= set(preset("model", f.name[:-5]))
    return {"": tuple(sorted(groups | set(top))), "model": tuple(sorted(model))}


def unknown_key_message(key: str, valid: Iterable[str], node: str = "") -> str:
    where = f"{node}." if node else ""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {where}{close[0]}?)" if close else ""
    return (f"unknown config key {where}{key}{hint}: nothing reads it; valid keys"
            f"{' of ' + node if node else ''}: {', '.join(valid)}")


def check_keys(cfg: Any) -> None:
    """Refuse top-level and ``model`` keys that nothing reads (``+key=...`` additions, typos)."""
    known = known_keys()
    for key in cfg:
        if key != "hydra" and key not in known[""]:
            raise UsageError(unknown_key_message(key, known[""]))
    model = cfg.get("model")
    for key in (model if hasattr(model, "keys") else ()):
        if key not in known["model"]:
            raise UsageError(unknown_key_message(key, known["model"], "model"))


def check_output_dir(path, key: str = "hydra.run.dir") -> None:
    """Create ``path`` and make sure a run can write into it (files it writes must be files)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        why = (f"{blocker} is a file" if blocker is not None and not blocker.is_dir()
               else e.strerror or type(e).__name__)
        raise UsageError(f"cannot write the output directory {path} ({why}); "
                         f"choose a writable directory with {key}=DIR") from e
    for name in OUTPUT_FILES:
        f = path / name
        if f.exists() or f.is_symlink():
            try:
                open(f, "a").close()  # append mode: writable without touching the content
            except OSError as e:
                raise UsageError(f"cannot write {f} ({e.strerror or type(e).__name__}); a run writes its "
                                 f"{name} there: remove it, or choose another directory with {key}=DIR") from e


class Preflight(Callback):
    """Runs :func:`check_keys` and :func:`check_output_dir` before Hydra creates the output directory."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")  # each job's directory: checked by the runner

    @staticmethod
    def _check(config, key: str) -> None:
        from omegaconf import OmegaConf

        with one_line_errors():  # Hydra turns a callback's exception into a warning: exit here
            from .distributed import env_world, share_start_time

            if env_world().distributed:  # under torchrun: one output directory for all ranks (rank 0's time)
                share_start_time(config)
            check_keys(config)
            check_output_dir(OmegaConf.select(config, key), key)


_USER_FULL_ERROR: Optional[bool] = None  # set by run_cli; None: read the environment


def run_cli(main: Callable[[], Any]) -> None:
    """Call Hydra's ``main`` so that every expected error, Hydra's own config errors included, is
    one line (:func:`one_line_errors`)."""
    global _USER_FULL_ERROR
    _USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then re-raises its errors instead of printing them
    try:
        with one_line_errors():
            main()
    finally:
        if not _USER_FULL_ERROR:
            del os.environ["HYDRA_FULL_ERROR"]


@contextmanager
def one_line_errors():
    """An expected error (:func:`error_line`) becomes ``error: <line>`` on stderr and exit status 2;
    anything else, or anything with ``HYDRA_FULL_ERROR=1`` set by the user, propagates."""
    try:
        yield
    except Exception as e:
        full = os.environ.get("HYDRA_FULL_ERROR") == "1" if _USER_FULL_ERROR is None else _USER_FULL_ERROR
        line = None if full else error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def error_line(e: BaseException) -> Optional[str]:
    """The one line (without ``error: ``) for an expected error; ``None`` for anything else."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    from .launch import missing_launcher_class_hint
    from .tasks.datafiles import DataFileError

    if isinstance(e, (UsageError, DataFileError)):
        msg = str(e)
    elif isinstance(e, MissingConfigException) and e.options:  # an unknown group choice
        msg = f"{str(e).splitlines()[0]}; valid choices: {', '.join(e.options)}"
    elif missing_launcher_class_hint(e):  # a launcher preset without its plugin
        msg = missing_launcher_class_hint(e)
    elif isinstance(e, OverrideParseException):
        msg = f"cannot parse the override {e.override!r}: {e.message}"
    elif isinstance(e, HydraException):
        cause, parent = e.__cause__, getattr(e.__cause__, "parent_node", None)
        full_key = getattr(cause, "full_key", None)
        if full_key and parent is not None and "not in struct" in str(cause):  # key=value on an unknown key
            node, _, key = full_key.rpartition(".")
            msg = unknown_key_message(key, [k for k in parent if k != "hydra"], node)
        else:
            msg = str(e).split("Config search path:")[0]
    else:
        return None
    return " ".join(msg.split())
