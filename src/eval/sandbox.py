"""Run generated Python programs away from the harness: one throw-away process tree per program.

Generated code never runs in the harness process.  :func:`run_program` writes the program into
a fresh temporary directory and hands it to a supervisor (``eval/sandbox_child.py``, a separate
interpreter started with an empty environment), which sets up the layers below and starts
``python -I -B`` on the program through a small launcher.  Layers (``ExecResult.isolation``
names those a run actually had, and code-task rows and ``summary.json`` record it):

* ``userns``: a new user namespace.  In-namespace root is mapped to a fresh throw-away uid when
  the harness is root (to the harness's own uid otherwise); the program holds no capability in
  any namespace (``caps``: empty bounding, ambient, permitted and effective sets,
  ``no_new_privs``), so it cannot remount, ``setns`` back into the harness's namespaces, signal
  or trace the harness, or read what only root may read (``/etc/shadow``, other users' files).
* ``uid``: the program's real uid outside is not the harness's (the throw-away uid).  Without
  user namespaces a root harness still gets it by ``setresuid`` after the set-up.
* ``pidns``: a new PID namespace with its own ``/proc``: the harness's processes, their command
  lines and environments are invisible; when the namespace's first process ends, the kernel
  kills every process left in it.
* ``netns``: a new, empty network namespace: no interface is up, not even loopback.
* ``mntns`` (``readonly_fs``): a private mount namespace in which every mount is read-only
  except the program's own directory; home directories, ``/tmp``, ``/run`` and ``/dev/shm``
  (``hide_dirs``) are replaced by empty tmpfs, with the interpreter and the sandbox's own
  directory bound back, so a private interpreter directory (``/root/...``) still works.
* ``seccomp`` (``no_fork``): a seccomp filter on which new processes and threads, mount and
  namespace calls, ``ptrace``, ``bpf``, keyrings and every x32-ABI call fail with EPERM.
* ``nproc`` / ``rlimits``: ``RLIMIT_CPU`` just above the wall-clock ``timeout``, ``RLIMIT_AS``
  (``memory_mb``), ``RLIMIT_FSIZE`` (``file_mb``; stdout/stderr go to files, so it also caps
  what the program prints), few open files, no core dumps, ``RLIMIT_NPROC`` = ``max_procs``
  (the kernel applies it to any uid but root: ``nproc`` is listed when it binds).
* ``guard``: a Python audit hook installed before the program starts that refuses sockets,
  ``fork``/``exec``/``system``/``subprocess``, ``kill``, links, and any write, delete, rename,
  ``chmod`` or ``chdir`` outside the directory (Python-level: ``ctypes`` bypasses it; it is the
  last line only where the kernel layers are missing).
* a wall-clock ``timeout`` (the supervisor kills the namespace's first process, hence all of
  it), a scrubbed environment (``PATH``, ``HOME`` and ``TMPDIR`` in the directory, a UTF-8
  locale, one BLAS thread), stdin closed, ``-I``; the directory is removed afterwards.

Pass signal: a run passes only if the process exits with status 0 *and* the launcher, after the
program's last statement, wrote the run's nonce to a pipe (fd 4).  The supervisor makes the
nonce after it started the namespace and hands it to the launcher on another pipe (fd 3),
which the launcher reads and closes before the program starts: it is in no argument,
environment variable or file, so ``exit(0)`` / ``os._exit(0)`` before the tests, or printing
anything read from ``/proc/self``, does not pass.

What assert-based scoring still cannot catch: a program that returns an object whose ``__eq__``
always answers True (or otherwise games the tests' comparisons), or one that deliberately digs
the nonce out of the launcher's own frames or memory (``gc``, ``sys._getframe``,
``/proc/self/mem``) before the tests run.  Both are attacks on the score, not on the machine:
the kernel layers still hold.  Threat model: sloppy or hostile generated code; the machine is
protected by the kernel layers, which depend on what the machine allows (user namespaces may be
disabled, containers often forbid namespaces and seccomp).  :func:`capabilities` probes them
once per process; ``SandboxConfig.strict`` turns a run weaker than requested into an ``error``
and the code tasks warn at the start of a run (``task.sandbox_strict=true`` makes that an
error).  For more, run the scorer in a VM that holds no secrets.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

__all__ = ["SandboxConfig", "ExecResult", "STATUSES", "FULL_LAYERS", "run_program", "capabilities",
           "missing_layers"]

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "error")
# every layer a default run asks for; ``userns`` or ``uid`` stands for "not the harness's identity"
FULL_LAYERS = ("userns", "uid", "caps", "pidns", "netns", "mntns", "seccomp", "rlimits", "guard")
_CHILD = Path(__file__).with_name("sandbox_child.py")
_UID_BASE, _UID_SPAN = 200_000, 100_000  # throw-away uids (no passwd entry needed)
_uid_counter = itertools.count()
_uid_lock = threading.Lock()
HIDE_DIRS = ("/root", "/home", "/tmp", "/var/tmp", "/run", "/dev/shm")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and layers of one run.  ``network``: ``auto`` (a network namespace when
    available, else only the guard), ``netns`` (required: a run without it is an ``error``) or
    ``guard``.  ``drop_user``: run as a throw-away uid when the harness is root (``auto``: if
    it works here; ``yes``: required).  ``user_ns`` / ``pid_ns``: the user and PID namespaces.
    ``strict``: a run that lacks any layer it asked for is an ``error`` instead of running
    weaker."""

    timeout: float = 10.0  # wall-clock seconds
    memory_mb: int = 2048  # RLIMIT_AS
    file_mb: int = 16  # RLIMIT_FSIZE (files the program writes, and its stdout/stderr)
    max_procs: int = 1  # RLIMIT_NPROC: 1 = no child processes or threads
    max_open_files: int = 64
    network: str = "auto"  # auto | netns | guard
    drop_user: str = "auto"  # auto | yes | no
    readonly_fs: bool = True  # a private mount namespace, everything but the directory read-only
    no_fork: bool = True  # the seccomp filter refusing new processes and threads
    guard: bool = True  # the audit-hook guard
    user_ns: bool = True  # a user namespace (no capabilities outside it)
    pid_ns: bool = True  # a PID namespace with its own /proc
    hide_dirs: tuple = HIDE_DIRS  # replaced by empty tmpfs in the mount namespace
    strict: bool = False  # missing requested layers: error instead of a weaker run
    tail_chars: int = 2000  # how much of stdout/stderr the result keeps (the end)

    def __post_init__(self):
        if not self.timeout > 0:
            raise ValueError(f"sandbox timeout must be > 0 seconds, got {self.timeout!r}")
        if self.network not in ("auto", "netns", "guard"):
            raise ValueError(f"sandbox network {self.network!r}; valid choices: auto, netns, guard")
        if self.drop_user not in ("auto", "yes", "no"):
            raise ValueError(f"sandbox drop_user {self.drop_user!r}; valid choices: auto, yes, no")
        if self.memory_mb < 64 or self.file_mb < 1 or self.max_procs < 1 or self.max_open_files < 16:
            raise ValueError("sandbox limits too small: memory_mb >= 64, file_mb >= 1, max_procs >= 1, "
                             "max_open_files >= 16")

    def requested(self, root: bool) -> tuple:
        """The layers this config asks for (``uid`` only makes sense for a root harness)."""
        on = {"userns": self.user_ns, "uid": root and self.drop_user != "no", "caps": True,
              "pidns": self.pid_ns, "netns": self.network != "guard", "mntns": self.readonly_fs,
              "seccomp": self.no_fork, "rlimits": True, "guard": self.guard}
        return tuple(k for k in FULL_LAYERS if on[k])


@dataclass(frozen=True)
class ExecResult:
    """What happened to one program.  ``status``: passed | failed | timeout | error (the sandbox
    itself could not run it).  Tails are the last ``tail_chars`` characters."""

    status: str
    returncode: Optional[int]
    seconds: float
    stdout: str
    stderr: str
    isolation: str  # the layers this run had, e.g. "userns+uid+caps+pidns+netns+mntns+seccomp+rlimits+guard"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The launcher: takes the run's nonce from fd 3 (and closes it), installs the guard (an audit
# hook: it cannot be removed once added), runs the program as __main__, then writes the nonce to
# fd 4.  The nonce is in no argument, environment variable or file; only a program that digs
# through the launcher's own frames or memory could find it.  Everything the hook uses is bound
# at install time, so a program that rebinds os/os.path functions does not change what it checks.
_LAUNCHER = r'''
import os, sys
_argv = list(sys.argv)

def _take_nonce():
    try:
        return os.read(3, 64)
    finally:
        os.close(3)

def _install_guard(root):
    root = root.rstrip("/") + "/"
    fspath, isinstance_, str_, bytes_, int_ = os.fspath, isinstance, str, bytes, int
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    refused = frozenset({
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "os.symlink", "os.link", "os.setxattr", "os.removexattr"})
    path_args = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
                 "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
                 "shutil.rmtree": (0,), "os.chdir": (0,), "os.chflags": (0,), "os.mkfifo": (0,),
                 "os.mknod": (0,)}

    def inside(p):
        if isinstance_(p, int_):
            return None  # a file descriptor: its opening was checked
        try:
            p = fspath(p)
        except TypeError:
            return False
        if isinstance_(p, bytes_):
            p = p.decode("utf-8", "surrogateescape")
        if not p.startswith("/"):
            p = root + p  # chdir is confined to root, so relative paths resolve below it
        parts = []
        for seg in p.split("/"):
            if seg in ("", "."):
                continue
            if seg == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(seg)
        return ("/" + "/".join(parts) + "/").startswith(root)

    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance_(mode, str_) and any(c in mode for c in "wax+")) or \
                      (isinstance_(flags, int_) and flags & write_flags)
            if writing and path != "/dev/null" and inside(path) is False:
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        elif event in path_args:
            if event == "os.chdir" and args and isinstance_(args[0], int_):
                raise PermissionError("sandbox: fchdir is not allowed")
            for i in path_args[event]:
                if i < len(args) and inside(args[i]) is False:
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the working directory")

    sys.addaudithook(hook)

def _run(nonce, path, write=os.write):
    import runpy
    runpy.run_path(path, run_name="__main__")
    write(4, nonce)

if _argv[1] == "1":
    _install_guard(os.getcwd())
sys.argv = [_argv[2]]
_run(_take_nonce(), _argv[2])
'''


def _limits(cfg: SandboxConfig) -> list:
    cpu = int(math.ceil(cfg.timeout)) + 1
    mib = 1024 * 1024
    return [(resource.RLIMIT_CPU, cpu, cpu + 1),
            (resource.RLIMIT_AS, cfg.memory_mb * mib, cfg.memory_mb * mib),
            (resource.RLIMIT_FSIZE, cfg.file_mb * mib, cfg.file_mb * mib),
            (resource.RLIMIT_NPROC, cfg.max_procs, cfg.max_procs),
            (resource.RLIMIT_NOFILE, cfg.max_open_files, cfg.max_open_files),
            (resource.RLIMIT_CORE, 0, 0)]


def _fresh_uid() -> int:
    with _uid_lock:
        n = next(_uid_counter)
    return _UID_BASE + (os.getpid() * 97 + n) % _UID_SPAN


def _env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@lru_cache(maxsize=None)
def _interpreter_paths() -> tuple:
    """Directories the interpreter needs (its prefixes and the directory of its executable)."""
    paths = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.abspath(sys.executable)), os.path.dirname(os.path.realpath(sys.executable))):
        for q in (os.path.abspath(p), os.path.realpath(p)):
            if os.path.isdir(q):
                paths.add(q)
    return tuple(sorted(paths))


def _private_ancestors(path: str) -> list:
    """Ancestors of ``path`` (itself excluded) that other users cannot enter."""
    out, cur = [], "/"
    for seg in [s for s in path.split("/") if s][:-1]:
        cur = os.path.join(cur, seg)
        try:
            if not os.stat(cur).st_mode & stat.S_IXOTH:
                out.append(cur)
        except OSError:
            break
    return out


def _hide_and_keep(cfg: SandboxConfig, root: Path) -> tuple[list, list]:
    keep = list(_interpreter_paths()) + [str(root)]
    hide = set()
    for d in tuple(cfg.hide_dirs) + (os.path.expanduser("~"), tempfile.gettempdir()):
        if d and os.path.isdir(d) and not os.path.islink(d):
            hide.add(os.path.realpath(d))
    for p in keep:  # a private ancestor would keep the throw-away uid from the interpreter
        hide.update(_private_ancestors(p)[:1])
    hide.discard("/")
    hide = sorted(hide, key=lambda h: (h.count("/"), h))
    return hide, keep


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * chars))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-chars:]


def _rmtree(path: Path) -> None:
    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


@dataclass(frozen=True)
class _Request:
    """Which layers the supervisor tries (it reports the ones it got)."""

    userns: bool = True
    pidns: bool = True
    netns: bool = True
    mntns: bool = True
    seccomp: bool = True
    drop_uid: bool = True
    guard: bool = True


def _supervise(source: str, cfg: SandboxConfig, req: _Request) -> tuple:
    """Run ``source``; (status, returncode, seconds, stdout, stderr, layers)."""
    root_user = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="eval-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        os.chmod(root, 0o711)  # a sandbox uid may pass through, not list or write
        uid = _fresh_uid() if root_user and req.drop_uid else None
        if uid is not None:
            os.chown(work, uid, uid)
        os.chmod(work, 0o700)
        program, launcher = root / "program.py", root / "launcher.py"
        program.write_text(source, encoding="utf-8")
        launcher.write_text(_LAUNCHER, encoding="utf-8")
        os.chmod(program, 0o644)
        os.chmod(launcher, 0o644)
        out_path, err_path = root / "stdout", root / "stderr"
        hide, keep = _hide_and_keep(cfg, root)
        request = {"python": sys.executable, "launcher": str(launcher), "program": str(program),
                   "work": str(work), "stdout": str(out_path), "stderr": str(err_path),
                   "timeout": cfg.timeout, "limits": _limits(cfg), "env": _env(str(work)),
                   "root": root_user, "uid": uid, "userns": req.userns, "pidns": req.pidns,
                   "netns": req.netns, "mntns": req.mntns, "seccomp": req.seccomp, "guard": req.guard,
                   "hide": hide, "keep": keep}
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-S", str(_CHILD)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={},
                                    start_new_session=True, close_fds=True)
        except OSError as e:
            return "error", None, 0.0, "", f"sandbox could not start its supervisor: {e}", []
        try:
            raw, raw_err = proc.communicate(json.dumps(request).encode(), timeout=cfg.timeout + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "error", None, cfg.timeout, "", "sandbox: the supervisor did not answer", []
        try:
            res = json.loads(raw.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return ("error", None, 0.0, "", "sandbox: the supervisor failed: "
                    + raw_err.decode("utf-8", "replace")[-cfg.tail_chars:], [])
        layers = list(res["layers"]) + (["guard"] if req.guard else [])
        if "uid" in layers or not root_user:  # the kernel applies RLIMIT_NPROC to any uid but root
            layers.append("nproc")
        stdout = _tail(out_path, cfg.tail_chars)
        stderr = _tail(err_path, cfg.tail_chars)
        pstatus, seconds = res["pstatus"], float(res["seconds"])
        if pstatus is None:
            if res["timed_out"]:
                return "timeout", -signal.SIGKILL, seconds, stdout, stderr, layers
            msg = "; ".join(res["errors"]) or "sandbox: the program never started"
            return "error", None, seconds, stdout, (stderr + "\n" + msg)[-cfg.tail_chars:], layers
        rc = os.waitstatus_to_exitcode(pstatus)
        if res["errors"]:  # the program's process failed before the program started
            return "error", rc, seconds, stdout, (stderr + "\n" + "; ".join(res["errors"]))[-cfg.tail_chars:], layers
        if res["timed_out"] or rc == -signal.SIGXCPU:
            return "timeout", rc, seconds, stdout, stderr, layers
        if rc == 0 and res["reached_end"]:
            return "passed", rc, seconds, stdout, stderr, layers
        if rc == 0:
            stderr = (stderr + "\nsandbox: the program ended before its last statement ran "
                      "(exit() or os._exit() called early?)")[-cfg.tail_chars:]
        return "failed", rc, seconds, stdout, stderr, layers
    finally:
        _rmtree(root)


# strongest first: the probe keeps the first that runs a trivial program
_TIERS = (_Request(), _Request(userns=False), _Request(userns=False, mntns=False, pidns=False),
          _Request(userns=False, mntns=False, pidns=False, netns=False, drop_uid=False))


@lru_cache(maxsize=None)
def _probe() -> tuple:
    """(the strongest request that runs ``pass`` here, the layers it got)."""
    cfg = SandboxConfig(timeout=30.0)
    for req in _TIERS:
        status, _, _, _, err, layers = _supervise("pass\n", cfg, req)
        if status == "passed":
            return req, tuple(layers)
        log.debug("sandbox probe %s: %s %s", req, status, err.strip()[-300:])
    return _Request(userns=False, mntns=False, pidns=False, netns=False, seccomp=False, drop_uid=False), ()


@lru_cache(maxsize=None)
def capabilities() -> dict[str, bool]:
    """Which layers work on this machine, probed once per process by running ``pass`` under the
    strongest set-up that works here: ``root``, and one flag per layer (``userns``, ``uid``,
    ``caps``, ``pidns``, ``netns``, ``mntns``, ``seccomp``, ``nproc``); ``drop_uid`` is ``uid``
    (the name older callers use)."""
    _, layers = _probe()
    caps = {"root": os.geteuid() == 0}
    for name in FULL_LAYERS + ("nproc",):
        if name != "guard" and name != "rlimits":
            caps[name] = name in layers
    caps["drop_uid"] = caps["uid"]
    missing = [k for k in ("userns", "pidns", "netns", "mntns", "seccomp", "caps")
               if not caps[k]] + (["uid"] if caps["root"] and not caps["uid"] else [])
    if missing:
        log.warning("sandbox: %s unavailable here; the other layers still apply (see eval.sandbox)",
                    ", ".join(missing))
    return caps


def missing_layers(cfg: Optional[SandboxConfig] = None) -> list:
    """The layers ``cfg`` asks for that this machine cannot give (empty: the full sandbox);
    ``userns`` is not missing where a root harness still drops to a throw-away uid."""
    cfg = cfg or SandboxConfig()
    caps = capabilities()
    got = {k for k, v in caps.items() if v} | {"rlimits", "guard"}
    out = [k for k in cfg.requested(caps["root"]) if k not in got]
    if "userns" in out and caps["root"] and caps["uid"]:
        out.remove("userns")
    return out


def run_program(source: str, config: Optional[SandboxConfig] = None, **overrides) -> ExecResult:
    """Run the Python program ``source`` in the sandbox (``config`` plus keyword overrides of
    its fields) and say what happened.  Never raises for anything the program does."""
    cfg = config or SandboxConfig()
    if overrides:
        cfg = replace(cfg, **overrides)
    tier, _ = _probe()
    caps = capabilities()
    if cfg.network == "netns" and not caps["netns"]:
        return ExecResult("error", None, 0.0, "", "sandbox: network=netns but network namespaces are "
                          "unavailable here", "none")
    if cfg.drop_user == "yes" and caps["root"] and not caps["uid"]:
        return ExecResult("error", None, 0.0, "", "sandbox: drop_user=yes but switching uid fails here", "none")
    missing = missing_layers(cfg) if cfg.strict else []
    if missing:
        return ExecResult("error", None, 0.0, "", "sandbox: strict, but unavailable here: " + ", ".join(missing),
                          "none")
    req = _Request(userns=cfg.user_ns and tier.userns, pidns=cfg.pid_ns and tier.pidns,
                   netns=cfg.network != "guard" and tier.netns, mntns=cfg.readonly_fs and tier.mntns,
                   seccomp=cfg.no_fork and tier.seccomp, drop_uid=cfg.drop_user != "no" and tier.drop_uid,
                   guard=cfg.guard)
    try:
        status, rc, seconds, out, err, layers = _supervise(source, cfg, req)
    except OSError as e:  # the temporary directory itself could not be made
        return ExecResult("error", None, 0.0, "", f"sandbox: {e}", "none")
    order = FULL_LAYERS[:-2] + ("nproc", "rlimits", "guard")
    names = [n for n in order if n in layers]
    return ExecResult(status, rc, seconds, out, err, "+".join(names) or "none")
