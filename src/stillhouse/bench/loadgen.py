"""HTTP load for the proxy benchmarks: a closed loop (n requests, C workers) and an open loop (a fixed
rate, whatever the answers do), with latencies and status counts; and the percentile they report.

Used by ``bench guard`` (:mod:`stillhouse.bench.guard`) and its A/B runs (:mod:`stillhouse.bench.guard_ab`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)




async def closed_loop(url: str, token: str | None, n: int, concurrency: int,
                      body: dict[str, Any] | list[dict[str, Any]], progress: Any = None) -> dict[str, Any]:
    """``n`` requests with ``concurrency`` workers; latencies in ms of the OK ones.

    ``body``: one request body, or a list the requests cycle through."""
    import aiohttp

    payloads = [json.dumps(b).encode() for b in (body if isinstance(body, list) else [body])]
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    next_i = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def worker() -> None:
            nonlocal next_i, errors
            while next_i < n:
                payload = payloads[next_i % len(payloads)]
                next_i += 1
                t = time.perf_counter()
                try:
                    async with s.post(url, data=payload, headers=headers) as r:
                        await r.read()
                        statuses[r.status] = statuses.get(r.status, 0) + 1
                        if r.status == 200:
                            lat.append((time.perf_counter() - t) * 1000)
                except (TimeoutError, aiohttp.ClientError):
                    errors += 1
                if progress is not None:
                    progress()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"n": n, "ok": len(lat), "statuses": statuses, "client_errors": errors, "wall_s": wall,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "rps": len(lat) / wall,
            "latencies_ms": lat}


async def open_loop(url: str, token: str | None, rate: float, duration_s: float, drain_s: float,
                    body: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """Requests sent on a fixed schedule (``rate``/s for ``duration_s``), whatever the answers do."""
    import aiohttp

    payloads = [json.dumps(b).encode() for b in (body if isinstance(body, list) else [body])]
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    n = int(rate * duration_s)
    lat: list[float] = []
    done_at: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=duration_s + drain_s)) as s:
        t0 = time.perf_counter()

        async def one(payload: bytes) -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                async with s.post(url, data=payload, headers=headers) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 200:
                        now = time.perf_counter()
                        lat.append((now - t) * 1000)
                        done_at.append(now - t0)
            except (TimeoutError, aiohttp.ClientError):
                errors += 1

        tasks = []
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(payloads[i % len(payloads)])))
        send_lag = time.perf_counter() - t0 - duration_s
        await asyncio.wait(tasks, timeout=drain_s + 1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = max(duration_s, max(done_at) if done_at else duration_s)
    return {"offered_rps": rate, "sent": n, "ok": len(lat), "statuses": statuses, "client_errors": errors,
            "achieved_rps": len(lat) / elapsed, "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "generator_lag_s": round(send_lag, 3)}
