"""The escapes issue 12 found as root, each as a program scored the way the runner scores one.

Every attack uses ``ctypes`` (which the Python guard cannot see), so these tests show what the
kernel layers hold.  Attacks that would hurt the harness if they worked (killing it, reading its
environment) run against a throw-away harness process, never against pytest itself.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from eval.sandbox import SandboxConfig, capabilities, missing_layers, run_program
from eval.tasks import HumanEvalTask, MBPPTask

CAPS = capabilities()
FAST = SandboxConfig(timeout=5.0)
FULL = not missing_layers()
needs_full = pytest.mark.skipif(not FULL, reason=f"this machine lacks sandbox layers {missing_layers()}")

LIBC = "import ctypes, ctypes.util\nlibc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"


def run(src: str, cfg: SandboxConfig = FAST, **kw):
    return run_program(LIBC + textwrap.dedent(src), cfg, **kw)


def test_every_result_names_its_layers_and_a_full_run_has_all_of_them():
    res = run("print('hi')")
    assert res.passed
    layers = set(res.isolation.split("+"))
    assert {"rlimits", "guard"} <= layers
    if FULL:
        assert {"caps", "pidns", "netns", "mntns", "seccomp"} <= layers
        assert "uid" in layers or not CAPS["root"]


@needs_full
def test_remounting_root_read_write_and_writing_on_the_host_fails(tmp_path):
    home_victim = Path(os.path.expanduser("~")) / f".sandbox-escape-{uuid.uuid4().hex}"
    outside = tmp_path / "escaped.txt"
    try:
        res = run(f"""
            MS_REMOUNT, MS_BIND = 32, 4096
            for flags in (MS_REMOUNT, MS_REMOUNT | MS_BIND):
                libc.mount(None, b"/", None, flags, None)
            libc.mount(None, {str(tmp_path)!r}.encode(), None, MS_REMOUNT | MS_BIND, None)
            wrote = []
            for path in ({str(outside)!r}, {str(home_victim)!r}, "/escaped-{uuid.uuid4().hex}"):
                fd = libc.open(path.encode(), 0o1 | 0o100, 0o644)  # O_WRONLY | O_CREAT
                if fd >= 0 and libc.write(fd, b"x", 1) == 1:
                    wrote.append(path)
            print("wrote", wrote)
        """, guard=False)
        assert not outside.exists() and not home_victim.exists(), res
        assert "wrote []" in res.stdout, res
    finally:
        home_victim.unlink(missing_ok=True)


@needs_full
def test_setns_into_the_harness_network_namespace_cannot_reach_loopback():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    try:
        res = run(f"""
            import os, struct
            joined = 0
            for pid in (os.getppid(), 1):  # the harness (its parent), or the first process
                for ns in ("user", "mnt", "net"):
                    try:
                        fd = os.open(f"/proc/{{pid}}/ns/{{ns}}", os.O_RDONLY)
                    except OSError:
                        continue
                    joined += libc.setns(fd, 0) == 0
            s = libc.socket(2, 1, 0)
            addr = struct.pack("!HH4s8x", 2, {port}, bytes([127, 0, 0, 1]))
            addr = struct.pack("=H", 2) + addr[2:]
            ok = libc.connect(s, addr, len(addr)) == 0 and libc.send(s, b"escaped", 7, 0) == 7
            print("connected", ok)
        """, guard=False)
        assert "connected True" not in res.stdout, res
        try:
            conn, _ = srv.accept()
            conn.close()
            arrived = True
        except socket.timeout:
            arrived = False
        assert not arrived
    finally:
        srv.close()


VICTIM = """
import json, os, sys
from eval.sandbox import run_program, SandboxConfig
src = sys.stdin.read().replace("HARNESS_PID", str(os.getpid()))
res = run_program(src, SandboxConfig(timeout=5.0, guard=False))
print(json.dumps({"status": res.status, "stdout": res.stdout, "stderr": res.stderr}))
"""


def _victim_harness(program: str, env_extra: dict) -> tuple[subprocess.CompletedProcess, list]:
    """Score ``program`` in a separate harness process; (that process, sandbox dirs it left)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    before = set(tmp.glob("eval-sandbox-*"))
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", VICTIM], input=LIBC + textwrap.dedent(program), text=True,
                          capture_output=True, env=env, timeout=60)
    return proc, sorted(set(tmp.glob("eval-sandbox-*")) - before)


@needs_full
def test_killing_the_harness_through_libc_fails_and_nothing_is_left_behind():
    proc, left = _victim_harness("""
        import os
        for pid in (os.getppid(), HARNESS_PID):  # (only ever the throw-away harness)
            libc.kill(pid, 9)
        print("still here")
    """, {})
    assert proc.returncode == 0, proc.stderr  # the harness lived to print its result
    assert json.loads(proc.stdout)["stdout"].strip() == "still here"
    assert left == []


@needs_full
def test_secrets_of_the_host_and_of_the_harness_environment_stay_out_of_reach():
    secret = f"harness-secret-{uuid.uuid4().hex}"
    proc, _ = _victim_harness("""
        import os
        found = []
        for path in ["/etc/shadow", f"/proc/{os.getppid()}/environ"] + \\
                    [f"/proc/{p}/environ" for p in os.listdir("/proc") if p.isdigit()]:
            try:
                found.append(open(path, "rb").read().decode("latin-1"))
            except OSError as e:
                pass
        print("|".join(found))
        raise SystemExit("|".join(found))
    """, {"HF_TOKEN": secret})
    out = json.loads(proc.stdout)
    assert secret not in out["stdout"] + out["stderr"]
    if Path("/etc/shadow").exists() and CAPS["root"]:
        first = Path("/etc/shadow").read_text().split(":")[0]
        assert f"{first}:" not in out["stdout"] + out["stderr"]


FORGE = """
import os
seen = []
for name in ("cmdline", "environ"):
    try:
        seen += open(f"/proc/self/{name}", "rb").read().split(b"\\0")
    except OSError:
        pass
for fd in range(3, 16):
    try:
        seen.append(os.read(fd, 4096))
    except OSError:
        pass
for fd in range(3, 16):
    for s in seen:
        try:
            os.write(fd, b"\\n" + s + b"\\n")
        except OSError:
            pass
for s in seen:
    print(s.decode("latin-1"))
import sys
sys.stdout.flush()
os._exit(0)
"""


def test_a_wrong_solution_cannot_forge_the_pass_signal_humaneval_and_mbpp():
    he = HumanEvalTask(variant="completion", postprocess="none")
    ex = he.examples()[0]
    body = "    return False\n" + textwrap.indent(FORGE, "    ").replace("    import os", "    import os", 1)
    completion = body.replace("    return False\n", "    import os\n" + textwrap.indent(FORGE, "    ") + "\n", 1)
    row = he.score(ex, completion)
    assert row["correct"] is False and row["exec_status"] == "failed", row
    mb = MBPPTask(postprocess="none")
    mex = mb.examples()[0]
    row = mb.score(mex, FORGE)
    assert row["correct"] is False and row["exec_status"] == "failed", row
    # the plain version (a wrong solution that just exits early) fails too
    assert run("import os\nos._exit(0)").status == "failed"


def test_code_task_rows_record_the_sandbox_layers():
    he = HumanEvalTask(variant="completion")
    ex = he.examples()[0]
    row = he.score(ex, "    return False\n")
    assert row["sandbox"] == run("pass").isolation


def test_a_strict_sandbox_refuses_to_run_weaker_than_asked():
    assert missing_layers(SandboxConfig(network="guard", readonly_fs=False, no_fork=False, user_ns=False,
                                        pid_ns=False, drop_user="no")) == []
    res = run_program("print(1)", SandboxConfig(timeout=5.0, strict=True))
    if FULL:
        assert res.passed
    else:
        assert res.status == "error" and "strict" in res.stderr


def test_code_tasks_warn_before_work_when_the_sandbox_is_weaker_and_strict_refuses(monkeypatch):
    import eval.sandbox as sb

    monkeypatch.setattr(sb, "missing_layers", lambda cfg=None: ["netns", "pidns"])
    for task in (HumanEvalTask(), MBPPTask()):
        (warning,) = task.preflight()
        assert "lacks netns, pidns" in warning and "sandbox_strict" in warning
    with pytest.raises(ValueError, match="sandbox_strict=true refuses"):
        HumanEvalTask(sandbox_strict=True).preflight()
    monkeypatch.setattr(sb, "missing_layers", lambda cfg=None: [])
    assert HumanEvalTask(sandbox_strict=True).preflight() == []


def test_the_runner_warns_at_start_and_a_strict_task_is_a_usage_error(monkeypatch, caplog):
    import eval.sandbox as sb
    from eval.runner import UsageError, _preflight

    monkeypatch.setattr(sb, "missing_layers", lambda cfg=None: ["userns"])
    with caplog.at_level("WARNING", logger="eval.runner"):
        (warning,) = _preflight(MBPPTask())
    assert "lacks userns" in warning and warning in caplog.text
    with pytest.raises(UsageError, match="refuses to run"):
        _preflight(MBPPTask(sandbox_strict=True))
    assert _preflight(object()) == []  # tasks without code to run have nothing to check
