"""A/B runs behind two choices of the guard: its HTTP server (uvicorn h11+asyncio against
httptools+uvloop) and its upstream client (aiohttp against the http1 pool), by guard CPU per request.

    stillhouse bench guard --compare-servers
    stillhouse bench guard --compare-clients
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from stillhouse.bench.guard import MODEL
from stillhouse.bench.loadgen import closed_loop
from stillhouse.bench.procs import free_port, post_json, process_cpu_s, spawn, stop, wait_http

_SERVER_RUNNER = """
import sys, uvicorn
from stillhouse.guard.config import load_guard_config
from stillhouse.guard.app import create_app
from stillhouse.guard.store import open_store
cfg = load_guard_config(sys.argv[1])
uvicorn.run(create_app(cfg, open_store(cfg.db_url)), host="127.0.0.1", port=cfg.port, log_level="warning",
            access_log=False, http=sys.argv[2], loop=sys.argv[3], proxy_headers=False)
"""


SERVER_VARIANTS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("uvicorn --http h11 --loop asyncio", "h11", "asyncio", {}),
    ("uvicorn --http httptools --loop uvloop", "httptools", "uvloop", {}),
)
"""(label, uvicorn http, uvicorn loop, GuardConfig overrides): what chose the guard extra."""
CLIENT_VARIANTS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("upstream_client=aiohttp", "httptools", "uvloop", {"upstream_client": "aiohttp"}),
    ("upstream_client=http1", "httptools", "uvloop", {"upstream_client": "http1"}),
)
"""What chose the guard's default upstream client (the http1 pool: teacher/rawhttp.py via guard/upstream.py Http1Upstream)."""


def compare_servers(requests: int = 3000, concurrency: int = 64, latency_ms: float = 50.0,
                    repeats: int = 2,
                    variants: tuple[tuple[str, str, str, dict[str, Any]], ...] = SERVER_VARIANTS) -> dict[str, Any]:
    """Guard CPU per request for each variant, alternating, ``repeats`` times (default: uvicorn
    h11+asyncio versus httptools+uvloop; ``CLIENT_VARIANTS``: aiohttp versus the http1 client)."""
    from stillhouse.config import save_config
    from stillhouse.guard.config import GuardConfig, sha256_hex

    work = Path(tempfile.mkdtemp(prefix="stillhouse-bench-servers-"))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is 12 + 30?"}], "max_tokens": 16}
    out: dict[str, Any] = {"requests": requests, "concurrency": concurrency, "latency_ms": latency_ms,
                           "loadavg_before": os.getloadavg(), "runs": []}
    up_port = free_port()
    up = spawn([sys.executable, "-m", "stillhouse.testing.fakeserver", "--port", str(up_port), "--latency-ms",
                 str(latency_ms), "--model", MODEL], work / "upstream.log")
    try:
        wait_http(f"http://127.0.0.1:{up_port}/health", up, 30, work / "upstream.log")
        for rep in range(repeats):
            for i, (label, http, loop_name, extra) in enumerate(variants):
                port = free_port()
                admin = secrets.token_urlsafe(16)
                name = f"v{i}-{rep}"
                cfg = GuardConfig(upstream_url=f"http://127.0.0.1:{up_port}", admin_token_sha256=sha256_hex(admin),
                                  port=port, db_url=f"sqlite:///{work}/{name}.db",
                                  spool_dir=str(work / f"spool-{name}"), **extra)
                save_config(cfg, work / f"{name}.json")
                log = work / f"guard-{name}.log"
                g = spawn([sys.executable, "-c", _SERVER_RUNNER, str(work / f"{name}.json"), http, loop_name], log)
                try:
                    url = f"http://127.0.0.1:{port}"
                    wait_http(url + "/healthz", g, 60, log)
                    lim = {"requests_per_min": 10**9, "tokens_per_min": 10**12}
                    post_json(url + "/admin/accounts", {"account_id": "b", "limits": lim}, admin)
                    key = post_json(url + "/admin/accounts/b/keys", {}, admin)["key"]
                    asyncio.run(closed_loop(url + "/v1/chat/completions", key, 200, 16, body))  # warm-up
                    c0 = process_cpu_s(g.pid)
                    r = asyncio.run(closed_loop(url + "/v1/chat/completions", key, requests, concurrency, body))
                    cpu = 1000 * (process_cpu_s(g.pid) - c0) / requests
                finally:
                    stop(g)
                out["runs"].append({"variant": label, "repeat": rep,
                                    "guard_cpu_ms_per_request": round(cpu, 3), "rps": round(r["rps"], 1),
                                    "p50_ms": round(r["p50_ms"], 1), "ok": r["ok"]})
    finally:
        stop(up)
    out["loadavg_after"] = os.getloadavg()
    return out
