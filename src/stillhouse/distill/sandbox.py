"""Run untrusted Python (model-written code) in a subprocess with limits.

Used by the code verifier (HumanEval-style: prompt + completion + tests +
``check(entry_point)``). One call = one fresh ``python -I`` process in a fresh
temporary directory; the result says whether it exited 0 in time, plus its
(truncated) output and which isolation layers were active.

Layers, in the order they are applied in the child before ``exec``:

=====================  ===========================================  ==============
layer                  what it does                                 needs
=====================  ===========================================  ==============
session                new session / process group; on timeout the  always
                       whole group gets SIGKILL
rlimits                RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE always
                       (file size), RLIMIT_NOFILE, RLIMIT_CORE=0;
                       RLIMIT_NPROC only with ``uid`` (see below)
env                    scrubbed environment (PATH, HOME=TMPDIR=cwd, always
                       LANG), ``python -I`` (ignores PYTHON* vars
                       and the user site), cwd = fresh temp dir
netns                  a new, empty network namespace (only a       root (+ the
                       downed loopback): no network at all          kernel allowing
mountns                a private mount namespace with fresh small   namespaces)
                       tmpfs over /tmp, /var/tmp and /dev/shm, so
                       the only shared world-writable places vanish
uid                    drops to a throw-away uid/gid (random in a   root
                       high range, no supplementary groups); the
                       code cannot write files it does not own, cannot
                       signal our process (EPERM), and RLIMIT_NPROC
                       caps its process count. Afterwards every
                       process of that uid is SIGKILLed
                       (``kill(-1)`` from a helper running as it),
                       which also reaps children that ``setsid()``
                       out of the process group.
=====================  ===========================================  ==============

What is contained (with root, as on the machines this project runs on): wrong
answers, infinite loops (wall-clock timeout and CPU limit), memory bombs (RLIMIT_AS:
allocation fails with MemoryError), fork bombs (RLIMIT_NPROC), writing outside the
work directory (uid and mount namespace), network access (netns), killing or
signalling the parent (uid), processes that try to outlive the run (uid sweep).

What is NOT contained, honestly:

* This is not a security boundary against a determined attacker: no seccomp filter,
  no PID namespace, the filesystem stays readable (e.g. the repo, /etc), and kernel
  exploits are out of scope. Use a VM or gVisor for hostile code.
* Without root, only the always-on layers apply: the code runs as our own user, so it
  can write anywhere we can, use the network, signal our process, and a child that
  calls ``setsid()`` escapes the process-group kill. ``SandboxResult.isolation``
  says which layers were active, and :func:`isolation_available` says so up front.
* As root in a container that forbids namespaces, netns and mountns are skipped (probed
  once): the code then has the network, and /tmp and /dev/shm stay writable for the
  throw-away uid (what it writes there outlives the run).
* RLIMIT_AS limits address space, not resident memory; a program that maps little
  but touches much is still bounded by it. Threads count toward RLIMIT_NPROC.

Quick check from the shell::

    python -m stillhouse.distill.sandbox 'print(sum(range(10)))'

Exception tree::

    SandboxError            the sandbox itself could not run (not the code's fault)
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_BIND = 4096

_UID_BASE = 1_600_000_000
_UID_SPAN = 100_000_000


class SandboxError(RuntimeError):
    """The sandbox could not run the code (a problem on our side, not a verdict)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one sandboxed run."""

    timeout_s: float = 5.0
    """Wall-clock limit; the process group (and the sandbox uid) is killed after it."""
    memory_mb: int = 512
    """RLIMIT_AS, in MiB. Python itself needs about 30; below 64 it cannot start."""
    cpu_s: int | None = None
    """RLIMIT_CPU in seconds; None = ceil(timeout_s) + 1."""
    max_processes: int = 16
    """RLIMIT_NPROC for the throw-away uid (only enforced with the uid layer)."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: the largest file the code may write (also bounds its captured output)."""
    max_output_chars: int = 4000
    """How much of stdout/stderr to keep in the result."""
    drop_privileges: bool = True
    """When root: run as a throw-away uid (see module docstring). False keeps our uid."""
    isolate_network: bool = True
    """When root: a new empty network namespace."""
    private_tmp: bool = True
    """When root: fresh tmpfs over /tmp, /var/tmp and /dev/shm in a private mount namespace."""
    python: str = ""
    """The interpreter; empty = the one running us, or a system python3 when the dropped uid
    cannot execute ours."""

    def __post_init__(self) -> None:
        if not (0 < self.timeout_s <= 3600):
            raise ValueError(f"timeout_s={self.timeout_s}: give a wall-clock limit in (0, 3600] seconds")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb={self.memory_mb}: Python needs at least 64 MiB to start")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"cpu_s={self.cpu_s}: at least 1 second, or None to derive it from timeout_s")
        if self.max_processes < 1:
            raise ValueError(f"max_processes={self.max_processes}: at least 1")
        if self.max_file_mb < 1:
            raise ValueError(f"max_file_mb={self.max_file_mb}: at least 1")
        if self.max_output_chars < 0:
            raise ValueError(f"max_output_chars={self.max_output_chars}: must be >= 0")


@dataclass
class SandboxResult:
    """What happened to one run."""

    passed: bool
    """Exited 0 within the time limit."""
    reason: str
    """``"passed"``, ``"timeout"``, ``"memory"``, ``"failed: <last error line>"`` or ``"killed: SIGNAL"``."""
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    wall_s: float
    isolation: tuple[str, ...] = field(default_factory=tuple)
    """The layers that were active, e.g. ``("session", "rlimits", "env", "netns", "mountns", "uid")``."""


_PROBED: dict[str, bool] = {}


def _can_unshare(flag: int) -> bool:
    """Whether a child may unshare(flag): root inside a container without CAP_SYS_ADMIN may not.
    Probed once per flag with a throw-away fork."""
    key = hex(flag)
    if key not in _PROBED:
        libc = _libc()
        pid = os.fork()
        if pid == 0:  # child: try, report through the exit code, never return
            try:
                os._exit(0 if libc.unshare(flag) == 0 else 1)
            except BaseException:  # noqa: BLE001 - a forked child must never return into our code
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        _PROBED[key] = os.waitstatus_to_exitcode(status) == 0
    return _PROBED[key]


def isolation_available() -> tuple[str, ...]:
    """The layers this process can apply: root adds uid, and netns/mountns where the kernel
    lets us create namespaces (probed once)."""
    layers: tuple[str, ...] = ("session", "rlimits", "env")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if _can_unshare(_CLONE_NEWNET):
            layers += ("netns",)
        if _can_unshare(_CLONE_NEWNS):
            layers += ("mountns",)
        layers += ("uid",)
    return layers


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _child_setup(cfg: SandboxConfig, uid: int | None, layers: tuple[str, ...], errpipe_w: int,
                 workdir: str) -> Any:
    """Build the preexec function. It runs in the forked child, after chdir, before exec."""
    import resource

    mem = cfg.memory_mb * 1024 * 1024
    cpu = cfg.cpu_s if cfg.cpu_s is not None else int(cfg.timeout_s) + 1
    fsize = cfg.max_file_mb * 1024 * 1024
    libc: Any = _libc() if ("netns" in layers or "mountns" in layers) else None

    def fail(msg: str) -> None:
        os.write(errpipe_w, msg.encode()[:500])
        os._exit(126)

    def setup() -> None:
        try:
            if "netns" in layers and libc.unshare(_CLONE_NEWNET) != 0:
                fail(f"unshare(CLONE_NEWNET) failed: errno {ctypes.get_errno()}")
            if "mountns" in layers:
                if libc.unshare(_CLONE_NEWNS) != 0:
                    fail(f"unshare(CLONE_NEWNS) failed: errno {ctypes.get_errno()}")
                if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
                    fail(f"making / private failed: errno {ctypes.get_errno()}")
                for target in (b"/tmp", b"/var/tmp", b"/dev/shm"):
                    if os.path.isdir(target):
                        opts = b"size=%dk,mode=1777" % (cfg.max_file_mb * 1024)
                        if libc.mount(b"tmpfs", target, b"tmpfs", _MS_NOSUID | _MS_NODEV, opts) != 0:
                            fail(f"tmpfs on {target!r} failed: errno {ctypes.get_errno()}")
                # The work dir may now be hidden under a fresh tmpfs: show it again at its own
                # path by bind-mounting our cwd (set before this runs) back onto it.
                os.makedirs(workdir, exist_ok=True)
                if libc.mount(b"/proc/self/cwd", workdir.encode(), None, _MS_BIND | _MS_REC, None) != 0:
                    fail(f"bind-mounting the work dir failed: errno {ctypes.get_errno()}")
                os.chdir(workdir)
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if uid is not None:
                resource.setrlimit(resource.RLIMIT_NPROC, (cfg.max_processes, cfg.max_processes))
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
        except Exception as exc:  # noqa: BLE001 - report any failure to the parent, never run unconfined
            fail(f"sandbox setup failed: {type(exc).__name__}: {exc}")

    return setup


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as ``uid`` (kill(-1) from a helper with that uid)."""
    for _ in range(5):
        pid = os.fork()
        if pid == 0:  # child: become the uid, kill everything it owns, exit
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                os._exit(0)  # nothing left
            except BaseException:  # noqa: BLE001 - a forked child must never return into our code
                os._exit(2)
            os._exit(1)  # killed something: sweep again, children may have been mid-fork
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) in (0, 2):
            return


def _world_executable(path: str) -> bool:
    """True when a user with no relation to us could execute ``path`` (o+x all the way down)."""
    import stat

    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts) + 1):
        try:
            mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def _interpreter(cfg: SandboxConfig, dropping: bool) -> str:
    """The Python to run. A throw-away uid cannot enter e.g. /root/.pyenv: fall back to a
    system python3 it can execute (the code under test needs only the standard library)."""
    if cfg.python:
        return cfg.python
    if not dropping or _world_executable(sys.executable):
        return sys.executable
    for cand in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3",
                 shutil.which("python3") or ""):
        if cand and os.path.exists(cand) and _world_executable(cand):
            return cand
    raise SandboxError(
        f"no Python interpreter that an unprivileged uid may execute ({sys.executable} sits in a "
        "directory without o+x); install a system python3 or set SandboxConfig(python=...)"
    )


def _tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit * 4 + 4)
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[:limit]


def run_python(code: str, config: SandboxConfig | None = None, *, stdin: str = "") -> SandboxResult:
    """Run ``code`` as ``python -I main.py`` in a fresh temp dir under ``config``'s limits."""
    cfg = config or SandboxConfig()
    layers = isolation_available()
    if not cfg.isolate_network:
        layers = tuple(x for x in layers if x != "netns")
    if not cfg.private_tmp:
        layers = tuple(x for x in layers if x != "mountns")
    uid: int | None = None
    if "uid" in layers and cfg.drop_privileges:
        uid = _UID_BASE + random.SystemRandom().randrange(_UID_SPAN)
    else:
        layers = tuple(x for x in layers if x != "uid")

    python = _interpreter(cfg, uid is not None)
    workdir = tempfile.mkdtemp(prefix="stillhouse-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        r_err, w_err = os.pipe()
        start = time.monotonic()
        timed_out = False
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                try:
                    proc = subprocess.Popen(
                        [python, "-I", "main.py"],
                        cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                        # w_err is close-on-exec: open during setup, gone once the code runs
                        start_new_session=True, close_fds=True,
                        # the setup only makes os/resource/ctypes calls; its imports happen before the fork
                        preexec_fn=_child_setup(cfg, uid, layers, w_err, workdir),  # noqa: PLW1509
                    )
                except OSError as exc:
                    raise SandboxError(f"could not start {python}: {exc}") from exc
                os.close(w_err)
                w_err = -1
                try:
                    proc.communicate(stdin.encode(), timeout=cfg.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    if uid is not None:
                        _kill_uid(uid)
                    proc.wait()
            wall = time.monotonic() - start
            setup_error = os.read(r_err, 1000).decode("utf-8", "replace")
        finally:
            os.close(r_err)
            if w_err >= 0:
                os.close(w_err)
        if setup_error:
            raise SandboxError(setup_error)
        stdout = _tail(out_path, cfg.max_output_chars)
        stderr = _tail(err_path, cfg.max_output_chars)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rc = proc.returncode
    if timed_out:
        reason = f"timeout: no exit within {cfg.timeout_s:g} s"
    elif rc == 0:
        reason = "passed"
    elif rc is not None and rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        reason = "timeout: CPU limit" if sig == "SIGXCPU" else f"killed: {sig}"
    elif "MemoryError" in stderr:
        reason = "memory: hit the memory limit"
    else:
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        reason = "failed: " + (last[-1][:200] if last else f"exit code {rc}")
    return SandboxResult(passed=(rc == 0 and not timed_out), reason=reason, returncode=rc,
                         timed_out=timed_out, stdout=stdout, stderr=stderr, wall_s=wall,
                         isolation=layers)


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The program HumanEval runs: prompt + completion, the tests, then ``check(entry_point)``."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def run_humaneval(problem: dict[str, Any], completion: str,
                  config: SandboxConfig | None = None) -> SandboxResult:
    """Run one HumanEval problem's tests against ``completion``."""
    return run_python(humaneval_program(problem, completion), config)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stillhouse.distill.sandbox CODE", file=sys.stderr)
        return 2
    res = run_python(args[0])
    print(res.stdout, end="")
    print(res.stderr, end="", file=sys.stderr)
    print(f"[{res.reason}; {res.wall_s:.2f} s; layers: {', '.join(res.isolation)}]", file=sys.stderr)
    return 0 if res.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
