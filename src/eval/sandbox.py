"""Run generated Python programs away from the harness: one throw-away process per program.

Generated code never runs in the harness process.  :func:`run_program` writes the program into
a fresh temporary directory and starts a separate interpreter on it (``python -I -B``, through
a small launcher), in a new session (process group).  Layers, cheapest first:

* ``rlimits``: ``RLIMIT_CPU`` just above the wall-clock ``timeout``, ``RLIMIT_AS``
  (``memory_mb``), ``RLIMIT_FSIZE`` (``file_mb``; stdout/stderr go to files, so it also caps
  what the program prints), few open files, no core dumps, and ``RLIMIT_NPROC`` =
  ``max_procs`` (1: no child processes).  The kernel never applies ``RLIMIT_NPROC`` to root.
* a wall-clock ``timeout``: the whole process group is SIGKILLed when it runs out (the group
  leader is not reaped before that, so the group id cannot have been recycled).
* ``netns``: a new, empty network namespace (``unshare(CLONE_NEWNET)``): no interface is up,
  not even loopback, so every connection fails with "Network is unreachable".
* ``mntns`` (``readonly_fs``): a private mount namespace in which every mount is read-only
  except the program's own directory (bind-mounted read-write), so the program cannot write,
  delete or rename anything outside it, whatever its uid.
* ``seccomp`` (``no_fork``): a seccomp filter on which ``clone``/``fork``/``vfork``/``clone3``
  fail with EPERM: no child processes and no threads, for root too (x86-64 and arm64).
* ``uid`` (``drop_user``): when the harness is root, a throw-away uid/gid (fresh per run), if
  the interpreter is reachable by other users (it is not when it lives under ``/root``).
* ``guard``: a Python audit hook installed before the program starts that refuses sockets,
  ``fork``/``exec``/``system``/``subprocess``, ``kill``, links, and any write, delete, rename,
  ``chmod`` or ``chdir`` outside the directory.
* a scrubbed environment (``PATH``, ``HOME`` and ``TMPDIR`` in the directory, a UTF-8 locale,
  one BLAS thread), stdin closed, ``-I`` (no ``PYTHON*`` variables, no user site-packages, not
  the script's directory on ``sys.path``); the directory is removed afterwards, whatever
  happened.

A run passes only if the process exits with status 0 *and* a per-run random sentinel, written
after the program's last statement, reaches stdout, so a program that calls ``exit(0)`` or
``os._exit(0)`` before its tests have run does not pass.

Threat model: accidents and sloppy generated code (infinite loops, memory or fork bombs, file
deletion, stray network calls), not a determined attacker.  The kernel layers hold against any
code; the guard is Python-level and can be bypassed (for example through ``ctypes``).  Which
kernel layers exist depends on the machine (namespaces need root or unprivileged user
namespaces; containers often forbid both): :func:`capabilities` probes them once per process,
unavailable ones are skipped (logged), and every :class:`ExecResult` names the layers its run
had (``isolation``, e.g. ``netns+mntns+seccomp+rlimits+guard``).  The weakest fallback is
rlimits + timeout + guard: sockets and writes outside the directory are then refused only by
the guard, and forks by ``RLIMIT_NPROC`` (non-root) or the guard (root).  For stronger
isolation run the scorer in a container or VM that holds no secrets.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import logging
import math
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

__all__ = ["SandboxConfig", "ExecResult", "STATUSES", "run_program", "capabilities"]

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "error")
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
_MOUNT_OPTS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
_UID_BASE, _UID_SPAN = 200_000, 100_000  # throw-away uids (no passwd entry needed)
_uid_counter = itertools.count()
_uid_lock = threading.Lock()

try:  # loaded in the parent: the child (between fork and exec) only calls these
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _UNSHARE, _MOUNT, _PRCTL = _LIBC.unshare, _LIBC.mount, _LIBC.prctl
    _MOUNT.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    _PRCTL.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
except (OSError, AttributeError):  # pragma: no cover - non-glibc systems
    _UNSHARE = _MOUNT = _PRCTL = None


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# seccomp: the process-creating syscalls (clone, fork, vfork, clone3) fail with EPERM
_AUDIT_ARCH = {"x86_64": (0xC000003E, (56, 57, 58, 435)), "aarch64": (0xC00000B7, (220, 435))}


def _seccomp_program():
    """A classic-BPF seccomp filter refusing new processes and threads, or None on other CPUs."""
    import platform

    arch = _AUDIT_ARCH.get(platform.machine())
    if arch is None or _PRCTL is None:
        return None
    audit, numbers = arch
    ld, jeq, ret = 0x20, 0x15, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    n = len(numbers)
    code = [(ld, 0, 0, 4), (jeq, 0, n + 1, audit), (ld, 0, 0, 0)]
    code += [(jeq, n - i, 0, nr) for i, nr in enumerate(numbers)]  # match: jump to deny
    code += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    filters = (_SockFilter * len(code))(*[_SockFilter(*c) for c in code])
    prog = _SockFprog(len(code), filters)
    prog._keep = filters  # the child reads the array through the pointer
    return prog


_SECCOMP = _seccomp_program()
_SECCOMP_ADDR = ctypes.addressof(_SECCOMP) if _SECCOMP is not None else None


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one run.  ``network``: ``auto`` (a network namespace when available, else
    only the guard), ``netns`` (required: a run without it is an ``error``) or ``guard``.
    ``drop_user``: when the harness is root, run as a throw-away uid (``auto``: if it works)."""

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


@dataclass(frozen=True)
class ExecResult:
    """What happened to one program.  ``status``: passed | failed | timeout | error (the sandbox
    itself could not run it).  Tails are the last ``tail_chars`` characters."""

    status: str
    returncode: Optional[int]
    seconds: float
    stdout: str
    stderr: str
    isolation: str  # the layers this run had, e.g. "netns+mntns+seccomp+rlimits+guard"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The launcher: installs the guard (an audit hook: it cannot be removed once added), runs the
# program as __main__, then writes the sentinel.  Everything the hook uses is bound at install
# time, so a program that rebinds os/os.path functions does not change what the hook checks.
_LAUNCHER = r'''
import os, sys
_write, _argv = os.write, list(sys.argv)

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

if _argv[1] == "1":
    _install_guard(os.getcwd())
sys.argv = [_argv[2]]
import runpy
runpy.run_path(_argv[2], run_name="__main__")
_write(1, ("\n" + _argv[3] + "\n").encode())
'''


def _limits(cfg: SandboxConfig) -> list[tuple[int, tuple[int, int]]]:
    cpu = int(math.ceil(cfg.timeout)) + 1
    mib = 1024 * 1024
    return [(resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_AS, (cfg.memory_mb * mib,) * 2),
            (resource.RLIMIT_FSIZE, (cfg.file_mb * mib,) * 2),
            (resource.RLIMIT_NPROC, (cfg.max_procs,) * 2),
            (resource.RLIMIT_NOFILE, (cfg.max_open_files,) * 2),
            (resource.RLIMIT_CORE, (0, 0))]


def _mounts() -> list[tuple[bytes, int]]:
    """(mount point, flags to keep) of every read-write mount, parents first."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        point = fields[4].encode().decode("unicode_escape").encode("latin-1")  # \040 etc.
        opts = fields[5].split(",")
        if "ro" in opts:
            continue
        out.append((point, sum(_MOUNT_OPTS.get(o, 0) for o in opts)))
    return sorted(out, key=lambda m: m[0].count(b"/") if m[0] != b"/" else 0)


def _preexec(limits, netns: bool, mntns: bool, seccomp: bool, uid: Optional[int], work: str):
    """Runs in the child between fork and exec: namespaces and a read-only file system, limits,
    the uid, then the seccomp filter (last: it would refuse nothing the rest needs, but the
    order keeps every step before it free to fail loudly)."""
    flags = (CLONE_NEWNET if netns else 0) | (CLONE_NEWNS if mntns else 0)
    if flags and os.geteuid() != 0:
        flags |= CLONE_NEWUSER  # unprivileged: namespaces inside a user namespace
    mounts = _mounts() if mntns else []
    work_b = os.fsencode(work)

    def child():
        if flags:
            if _UNSHARE is None or _UNSHARE(flags) != 0:
                raise OSError(ctypes.get_errno(), "unshare failed")
        if mntns:
            # private first, so nothing below propagates back to the host's mounts
            if _MOUNT(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                raise OSError(ctypes.get_errno(), "making the mount namespace private failed")
            if _MOUNT(work_b, work_b, None, MS_BIND | MS_REC, None) != 0:
                raise OSError(ctypes.get_errno(), "bind-mounting the working directory failed")
            for point, keep in mounts:
                rc = _MOUNT(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep, None)
                if rc != 0 and point == b"/":
                    raise OSError(ctypes.get_errno(), "remounting / read-only failed")
            os.chdir(work_b)  # the old cwd is the directory under the bind mount (read-only now)
        os.umask(0o077)
        for which, values in limits:
            resource.setrlimit(which, values)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if seccomp:
            if _PRCTL(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0 or \
                    _PRCTL(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, _SECCOMP_ADDR, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "installing the seccomp filter failed")

    return child


def _fresh_uid() -> int:
    with _uid_lock:
        n = next(_uid_counter)
    return _UID_BASE + (os.getpid() * 97 + n) % _UID_SPAN


def _env(work: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait (without reaping, so the process group cannot be recycled) until ``pid`` exits;
    False if ``timeout`` seconds pass first."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = None
        if fd is not None:
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                return bool(poller.poll(max(0, int(timeout * 1000))))
            finally:
                os.close(fd)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


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
class _Layers:
    netns: bool = False
    mntns: bool = False
    seccomp: bool = False
    uid: Optional[int] = None
    guard: bool = False


def _spawn(source: str, cfg: SandboxConfig, layers: _Layers) -> tuple:
    """Run ``source``; (status, returncode, seconds, stdout, stderr)."""
    root = Path(tempfile.mkdtemp(prefix="eval-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        os.chmod(root, 0o711)  # a sandbox uid may pass through, not list or write
        if layers.uid is not None:
            os.chown(work, layers.uid, layers.uid)
        os.chmod(work, 0o700)
        program, launcher = root / "program.py", root / "launcher.py"
        program.write_text(source, encoding="utf-8")
        launcher.write_text(_LAUNCHER, encoding="utf-8")
        os.chmod(program, 0o644)
        os.chmod(launcher, 0o644)
        nonce = "sandbox-ok-" + secrets.token_hex(16)
        out_path, err_path = root / "stdout", root / "stderr"
        cmd = [sys.executable, "-I", "-B", str(launcher), "1" if layers.guard else "0", str(program), nonce]
        pre = _preexec(_limits(cfg), layers.netns, layers.mntns, layers.seccomp, layers.uid, str(work))
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work,
                                        env=_env(str(work)), preexec_fn=pre, start_new_session=True,
                                        close_fds=True)
            except (OSError, subprocess.SubprocessError) as e:
                return "error", None, time.perf_counter() - t0, "", f"sandbox could not start the program: {e}"
            exited = _wait_exited(proc.pid, cfg.timeout)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers; the leader is not reaped yet
            except (ProcessLookupError, PermissionError):
                pass
            rc = proc.wait()
        seconds = time.perf_counter() - t0
        stdout = _tail(out_path, cfg.tail_chars + len(nonce) + 2)
        stderr = _tail(err_path, cfg.tail_chars)
        sentinel = f"\n{nonce}\n"
        ok = sentinel in stdout
        stdout = stdout.replace(sentinel, "")[-cfg.tail_chars:]
        if not exited or rc == -signal.SIGXCPU:
            status = "timeout"
        elif rc == 0 and ok:
            status = "passed"
        else:
            status = "failed"
            if rc == 0:
                stderr = (stderr + "\nsandbox: the program ended before its last statement ran "
                          "(exit() or os._exit() called early?)")[-cfg.tail_chars:]
        return status, rc, seconds, stdout, stderr
    finally:
        _rmtree(root)


_PROBE = {"netns": _Layers(netns=True), "mntns": _Layers(mntns=True), "seccomp": _Layers(seccomp=True)}


@lru_cache(maxsize=None)
def capabilities() -> dict[str, bool]:
    """Which kernel layers work on this machine, probed once per process (each by starting
    ``python -c pass`` under it): ``netns`` (a private network namespace), ``mntns`` (a
    private mount namespace with everything but the working directory read-only), ``seccomp``
    (the no-new-process filter) and ``drop_uid`` (root switching to a throw-away uid: it can
    fail where the interpreter lives in a directory other users cannot enter)."""
    cfg = SandboxConfig(timeout=30.0)
    caps = {"root": os.geteuid() == 0}
    for name, layers in _PROBE.items():
        if name == "seccomp" and _SECCOMP is None:
            caps[name] = False
            continue
        try:
            caps[name] = _spawn("pass\n", cfg, layers)[0] == "passed"
        except OSError:
            caps[name] = False
    caps["drop_uid"] = False
    if caps["root"]:
        try:
            caps["drop_uid"] = _spawn("pass\n", cfg, _Layers(uid=_fresh_uid()))[0] == "passed"
        except OSError:
            pass
    missing = [k for k in ("netns", "mntns", "seccomp", "drop_uid") if not caps[k]
               and (k != "drop_uid" or caps["root"])]
    if missing:
        log.info("sandbox: %s unavailable here; the other layers still apply (see eval.sandbox)",
                 ", ".join(missing))
    return caps


def run_program(source: str, config: Optional[SandboxConfig] = None, **overrides) -> ExecResult:
    """Run the Python program ``source`` in the sandbox (``config`` plus keyword overrides of
    its fields) and say what happened.  Never raises for anything the program does."""
    cfg = config or SandboxConfig()
    if overrides:
        cfg = replace(cfg, **overrides)
    caps = capabilities()
    netns = cfg.network in ("auto", "netns") and caps["netns"]
    if cfg.network == "netns" and not netns:
        return ExecResult("error", None, 0.0, "", "sandbox: network=netns but network namespaces are "
                          "unavailable here", "none")
    uid = None
    if caps["root"] and cfg.drop_user != "no":
        if caps["drop_uid"]:
            uid = _fresh_uid()
        elif cfg.drop_user == "yes":
            return ExecResult("error", None, 0.0, "", "sandbox: drop_user=yes but switching uid fails here",
                              "none")
    layers = _Layers(netns=netns, mntns=cfg.readonly_fs and caps["mntns"],
                     seccomp=cfg.no_fork and caps["seccomp"], uid=uid, guard=cfg.guard)
    names = [n for n, on in (("netns", layers.netns), ("mntns", layers.mntns), ("seccomp", layers.seccomp),
                             ("uid", uid is not None), ("nproc", not caps["root"] or uid is not None),
                             ("rlimits", True), ("guard", cfg.guard)) if on]
    try:
        status, rc, seconds, out, err = _spawn(source, cfg, layers)
    except OSError as e:  # the temporary directory itself could not be made
        return ExecResult("error", None, 0.0, "", f"sandbox: {e}", "+".join(names))
    return ExecResult(status, rc, seconds, out, err, "+".join(names))
