"""Run one benchmark child program and sample its process tree: CPU time after its READY line,
resident memory over time, and (optionally) a server process's CPU over the same span.

    m = run_child([python, "child_ours.py", ...], "ours", 64, server=srv)
    m.rate, m.cpu_ms_per_req, m.rss_peak_mb
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Measured:
    """One system at one concurrency."""

    system: str
    concurrency: int
    n: int = 0
    wall_s: float = 0.0
    rate: float = 0.0
    cpu_ms_per_req: float = 0.0
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _tree(proc: Any) -> list[Any]:
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def run_child(argv: list[str], system: str, concurrency: int, env: dict[str, str] | None = None,
              timeout_s: float = 1800.0, server: Any = None) -> Measured:
    """Run one child program, sampling its process tree's CPU and RSS (and the server's CPU, when given)."""
    import psutil

    m = Measured(system, concurrency)
    m.extra["load_avg_start"] = round(os.getloadavg()[0], 2)
    srv = psutil.Process(server.pid) if server is not None else None

    def server_cpu() -> float:
        total = 0.0
        for q in _tree(srv) if srv is not None else []:
            try:
                ct = q.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
        return total

    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(p.pid)
    lines: list[str] = []
    ready = threading.Event()
    err_tail: list[str] = []

    def read_out() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            line = line.strip()
            if line == "READY":
                ready.set()
            elif line:
                lines.append(line)

    def read_err() -> None:
        assert p.stderr is not None
        for line in p.stderr:
            err_tail.append(line)
            del err_tail[:-30]

    threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    cpu_by_pid: dict[int, float] = {}

    def sample() -> tuple[float, float]:
        rss = 0.0
        for q in _tree(ps):
            try:
                ct = q.cpu_times()
                cpu_by_pid[q.pid] = ct.user + ct.system + getattr(ct, "children_user", 0) + getattr(
                    ct, "children_system", 0)
                rss += q.memory_info().rss
            except psutil.Error:
                pass
        return sum(cpu_by_pid.values()), rss / 2**20

    t_start = time.monotonic()
    cpu0 = None
    scpu0 = 0.0
    rss_series: list[tuple[float, float]] = []
    while p.poll() is None:
        if time.monotonic() - t_start > timeout_s:
            p.kill()
            m.error = f"timed out after {timeout_s:.0f} s"
            break
        cpu, rss = sample()
        if ready.is_set():
            if cpu0 is None:
                cpu0, scpu0 = cpu, server_cpu()
            rss_series.append((time.monotonic(), rss))
        time.sleep(0.2)
    cpu_end = sum(cpu_by_pid.values())
    scpu_end = server_cpu()
    for t in threads:
        t.join(5)
    if p.returncode and m.error is None:
        m.error = f"exit {p.returncode}: {''.join(err_tail)[-800:]}"
    result = None
    for line in reversed(lines):
        try:
            result = json.loads(line)
            break
        except ValueError:
            continue
    if result is None:
        m.error = m.error or f"no result line; stderr: {''.join(err_tail)[-800:]}"
        return m
    m.n, m.wall_s = int(result["n"]), float(result["wall_s"])
    m.extra.update({k: v for k, v in result.items() if k not in ("n", "wall_s")})
    m.rate = m.n / m.wall_s if m.wall_s > 0 else 0.0
    phase = float(result.get("request_phase_s") or 0.0)
    m.extra["rate_requests"] = m.n / phase if phase > 0 else m.rate  # others load prompts before READY
    if cpu0 is not None and m.n > 0:
        m.cpu_ms_per_req = (cpu_end - cpu0) * 1000 / m.n
        if srv is not None:
            m.extra["server_cpu_ms_per_req"] = round((scpu_end - scpu0) * 1000 / m.n, 4)
    if rss_series:
        t0 = rss_series[0][0]
        early = [r for t, r in rss_series if t - t0 <= max(1.0, 0.1 * m.wall_s)]
        m.rss_start_mb = max(early) if early else rss_series[0][1]
        m.rss_peak_mb = max(r for _, r in rss_series)
        span = rss_series[-1][0] - t0
        m.extra["rss_quartiles_mb"] = [round(next((r for t, r in rss_series if t - t0 >= q * span),
                                                  rss_series[-1][1])) for q in (0.25, 0.5, 0.75, 1.0)]
    return m
