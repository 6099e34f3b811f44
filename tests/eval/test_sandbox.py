"""eval.sandbox: hostile programs are contained, scored as failures, and the harness lives on.

Each attack runs with every layer on (what the tasks use), and again with only the kernel
layers (guard off) or only the Python guard (kernel layers off) where this machine has them,
so each layer is shown to hold on its own.  Timeouts are short: the file takes seconds.
"""
from __future__ import annotations

import os
import socket
import textwrap
import time

import pytest

from eval.sandbox import STATUSES, ExecResult, SandboxConfig, capabilities, run_program

FAST = SandboxConfig(timeout=3.0)
CAPS = capabilities()
# guard off: what the kernel alone refuses here
KERNEL_ONLY = SandboxConfig(timeout=3.0, guard=False)
# kernel namespaces/filters off: what the Python guard alone refuses (rlimits stay)
GUARD_ONLY = SandboxConfig(timeout=3.0, network="guard", readonly_fs=False, no_fork=False, drop_user="no")

NO_FORK_IN_KERNEL = CAPS["seccomp"] or not CAPS["root"] or CAPS["drop_uid"]
NO_NET_IN_KERNEL = CAPS["netns"]
NO_WRITE_IN_KERNEL = CAPS["mntns"] or CAPS["drop_uid"]


def run(src: str, cfg: SandboxConfig = FAST, **kw) -> ExecResult:
    res = run_program(textwrap.dedent(src), cfg, **kw)
    assert res.status in STATUSES
    return res


def test_a_correct_program_passes_and_a_failing_one_fails():
    ok = run("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('done')")
    assert ok.passed and ok.status == "passed" and ok.returncode == 0 and ok.stdout.strip() == "done"
    assert "sandbox-ok" not in ok.stdout  # the sentinel is not shown
    assert "rlimits" in ok.isolation
    bad = run("def f(x):\n    return x\nassert f(1) == 2")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = run("def f(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr
    future = run("from __future__ import annotations\ndef f(x: int) -> int:\n    return x\nassert f(3) == 3")
    assert future.passed  # the program is its own module: __future__ imports work


def test_exiting_before_the_tests_have_run_is_not_a_pass():
    for early in ("import sys; sys.exit(0)", "import os; os._exit(0)", "exit()"):
        res = run(early + "\nassert False")
        assert res.status == "failed" and res.returncode == 0, early
        assert "before its last statement" in res.stderr


def test_infinite_loop_times_out_and_the_harness_lives():
    pid = os.getpid()
    t0 = time.monotonic()
    res = run("while True:\n    pass", timeout=1.0)
    assert res.status == "timeout" and not res.passed
    assert time.monotonic() - t0 < 6
    assert os.getpid() == pid and run("print(1)").passed  # still here, still working


def test_sleeping_forever_hits_the_wall_clock_limit():
    res = run("import time\ntime.sleep(60)", timeout=1.0)
    assert res.status == "timeout" and res.seconds < 5


@pytest.mark.parametrize("cfg", [FAST, KERNEL_ONLY, GUARD_ONLY], ids=["all", "kernel", "guard"])
def test_fork_bomb_is_contained(cfg):
    if cfg is KERNEL_ONLY and not NO_FORK_IN_KERNEL:
        pytest.skip("root without seccomp or a throw-away uid: RLIMIT_NPROC does not bind, only the guard")
    res = run("""
        import os
        while True:
            os.fork()
    """, cfg)
    assert res.status == "failed", res
    assert "PermissionError" in res.stderr or "BlockingIOError" in res.stderr or "Resource" in res.stderr
    threads = run("import threading\nt = threading.Thread(target=print)\nt.start()", cfg)
    if cfg is not GUARD_ONLY:  # no new threads either (they are processes to the kernel)
        assert threads.status == "failed" and "can't start new thread" in threads.stderr


def test_subprocess_and_system_are_refused():
    res = run("import subprocess\nsubprocess.run(['true'])")
    assert res.status == "failed" and ("PermissionError" in res.stderr)
    res = run("import os\nos.system('true')", GUARD_ONLY)
    assert res.status == "failed" and "os.system is not allowed" in res.stderr


@pytest.mark.parametrize("cfg", [FAST, KERNEL_ONLY], ids=["all", "kernel"])
def test_huge_allocation_is_refused(cfg):
    res = run("x = bytearray(64 * 1024 ** 3)\nprint(len(x))", cfg)
    assert res.status == "failed" and "MemoryError" in res.stderr
    res = run("x = [0] * (10 ** 10)", cfg, memory_mb=256)
    assert res.status == "failed" and "MemoryError" in res.stderr


@pytest.fixture
def listener():
    """A server on 127.0.0.1 that records whether anything connected to it."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def _connected(srv) -> bool:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        return False
    conn.close()
    return True


@pytest.mark.parametrize("cfg", [FAST, KERNEL_ONLY, GUARD_ONLY], ids=["all", "kernel", "guard"])
def test_socket_to_localhost_is_refused(listener, cfg):
    if cfg is KERNEL_ONLY and not NO_NET_IN_KERNEL:
        pytest.skip("no network namespaces here: only the guard refuses sockets")
    port = listener.getsockname()[1]
    res = run(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(("127.0.0.1", {port}))
        s.sendall(b"hello")
        print("connected")
    """, cfg)
    assert res.status == "failed" and "connected" not in res.stdout, res
    assert not _connected(listener)
    if cfg is KERNEL_ONLY:
        assert "unreachable" in res.stderr.lower()


@pytest.mark.parametrize("cfg", [FAST, KERNEL_ONLY, GUARD_ONLY], ids=["all", "kernel", "guard"])
def test_writes_outside_the_temporary_directory_are_refused(tmp_path, cfg):
    if cfg is KERNEL_ONLY and not NO_WRITE_IN_KERNEL:
        pytest.skip("no mount namespace and no throw-away uid here: only the guard refuses these writes")
    outside = tmp_path / "escaped.txt"
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for attack in (f"open({str(outside)!r}, 'w').write('x')",
                   f"import os\nfd = os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
                   f"import os\nos.remove({str(victim)!r})",
                   f"import pathlib\npathlib.Path({str(victim)!r}).write_text('gone')",
                   "import os\nos.chdir('..')\nopen('x.txt', 'w').write('x')"):
        res = run(attack, cfg)
        assert res.status == "failed", (attack, res)
        assert not outside.exists() and victim.read_text() == "precious"


def test_the_temporary_directory_is_private_writable_and_removed():
    res = run("""
        import os
        open('scratch.txt', 'w').write('ok')
        os.makedirs('a/b')
        print(os.getcwd())
        print(open('scratch.txt').read())
    """)
    assert res.passed, res
    cwd, text = res.stdout.split()
    assert text == "ok" and cwd.startswith("/") and not os.path.exists(cwd)
    other = run("import os\nprint(os.getcwd())")
    assert other.stdout.strip() != cwd  # a fresh directory per program


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token-value")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    res = run("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)")
    assert res.passed and "HF_TOKEN" not in res.stdout and "PYTHONPATH" not in res.stdout
    assert res.stdout.split("\n")[-2].strip() == "1"  # -I


def test_output_floods_are_capped_by_the_file_size_limit():
    res = run("while True:\n    print('x' * 10000)", file_mb=1)
    assert res.status == "failed" and len(res.stdout) <= FAST.tail_chars


def _alive_named(name: str) -> list:
    """Host pids of live (not zombie) processes whose comm is ``name``."""
    out = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and open(f"/proc/{p}/comm").read().strip() == name and \
                    open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                out.append(int(p))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("pid_ns", [True, False], ids=["pidns", "no-pidns"])
def test_timeout_kills_everything_the_program_started(pid_ns):
    """With forks allowed, children left behind by a timed-out program (one of them in a new
    session) die with it."""
    if not pid_ns and not CAPS["uid"]:
        pytest.skip("without a PID namespace only a throw-away uid finds a child in its own session")
    name = f"sbx{os.getpid() % 100000}{int(pid_ns)}"
    cfg = SandboxConfig(timeout=1.0, no_fork=False, guard=False, max_procs=4096, pid_ns=pid_ns)
    res = run(f"""
        import ctypes, os, time
        ctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)  # PR_SET_NAME
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        time.sleep(0.3)
        print("forked", flush=True)
        while True:
            pass
    """, cfg)
    assert res.status == "timeout" and "forked" in res.stdout, res
    time.sleep(0.3)
    assert _alive_named(name) == []


def test_config_is_validated_and_unavailable_layers_are_errors():
    with pytest.raises(ValueError, match="timeout"):
        SandboxConfig(timeout=0)
    with pytest.raises(ValueError, match="valid choices: auto, netns, guard"):
        SandboxConfig(network="off")
    with pytest.raises(ValueError, match="too small"):
        SandboxConfig(memory_mb=1)
    if not CAPS["netns"]:
        assert run("print(1)", network="netns").status == "error"
    if CAPS["root"] and not CAPS["drop_uid"]:
        res = run("print(1)", drop_user="yes")
        assert res.status == "error" and "uid" in res.stderr
