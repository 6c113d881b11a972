"""Child processes of a benchmark: a free loopback port, spawn into its own session with a log, wait
until an HTTP URL answers, stop the whole group, read a process's CPU seconds, POST JSON.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path,
               headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with code {proc.returncode}; "
                               f"log tail:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"{url} not up after {timeout_s:.0f}s; log tail:\n{log.read_text()[-2000:]}")


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``cmd`` in its own session, output to ``log``; ``env`` is the child's whole environment (None: ours)."""
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def process_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process and its direct children (Linux /proc), 0.0 if unreadable.

    The kernel counts in clock ticks (10 ms at the usual 100 Hz), so a difference is only meaningful over
    runs that take many ticks of CPU: hundreds of requests, not tens.
    """
    tck = os.sysconf("SC_CLK_TCK")

    def one(p: str) -> tuple[int, float]:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / tck

    total = 0.0
    try:
        total += one(str(pid))[1]
    except OSError:
        return 0.0
    for p in os.listdir("/proc"):
        if p.isdigit() and p != str(pid):
            try:
                ppid, cpu = one(p)
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                total += cpu
    return total


def post_json(url: str, body: Any, token: str) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())
