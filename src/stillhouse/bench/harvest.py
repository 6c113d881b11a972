"""``stillhouse bench harvest``: harvest throughput against the physical limit C/L, and peers.

    stillhouse bench harvest                                   # N=100k, C=64 and 256, L=50 ms
    stillhouse bench harvest --n 20000 --only server,ours,naive

Setup: a fake OpenAI-compatible server (:mod:`stillhouse.testing.fakeserver`) with fixed
latency L runs in its own process, on its raw engine (a bare asyncio.Protocol HTTP/1.1
responder on uvloop; ``--server-engine aiohttp`` for aiohttp.web). At concurrency C no client
can beat C/L requests/s.

1. ``server``: the fake server's own capacity, with the cheapest client (``bare`` below)
   at L=0 and C=256, for both engines and a plain uvicorn+starlette fake — so we know it is
   not the bottleneck (or that it is).
2. per C, on the same server and the same prompts, one after another in one run:
   - ``ours``: :func:`stillhouse.distill.harvest.run_harvest` into a fresh run directory
     (SQLite store, keys, retries, limits: the whole harvester), N requests;
   - ``bare``: a bare loop over :class:`stillhouse.http.client.RawHTTPTransport` (the
     client ours uses) that POSTs and parses JSON and stores nothing: the cheapest client
     we have, so what it reaches is what this machine allows;
   - ``naive``: a bare aiohttp loop with C workers that POSTs and parses JSON, N requests;
   - ``curator``: bespokelabs-curator in its pinned virtualenv (``peers_n`` requests);
   - ``distilabel``: a distilabel pipeline in its pinned virtualenv (``peers_n`` requests).

Each system runs as a child process (its program: :mod:`stillhouse.bench.harvest_children`);
this process samples the child's process tree with psutil (:mod:`stillhouse.bench.sampling`): CPU time from the child's "READY" line (imports and setup excluded) to its end,
divided by the requests (client CPU-ms per request), and resident memory (peak, and the
value shortly after the start, to show whether memory stays flat). The server's CPU over
the same span is reported per request too. Throughput is the child's own count of completed
requests over its own wall time of the run. Ours loads its prompts and computes their keys
after READY (the others read theirs before), so for ours the table also gives the rate over
the request phase alone (first request to last answer).

Results go to OUT/results.json and a Markdown table on stdout (copied into docs/benchmarks.md).
The peers run in pinned virtualenvs under ``$STILLHOUSE_CACHE/peers``, built on first use
(:mod:`stillhouse.bench.peers`; ``stillhouse bench peers --install`` builds them up front,
``--no-peers`` leaves them out, ``--peer-python curator=PATH`` uses an existing one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillhouse.bench.harvest_children import ANATOMY, BARE, CURATOR, DISTILABEL, NAIVE, OURS, STARLETTE
from stillhouse.bench.sampling import run_child
from stillhouse.config import ConfigError, save_config

SYSTEMS = ("server", "ours", "bare", "naive", "curator", "distilabel", "anatomy")
OPT_IN = ("anatomy",)
"""Systems that run only when --only names them."""
ENGINES = ("raw", "aiohttp")
PEER_SYSTEMS = ("curator", "distilabel")
"""Systems that are peers (run in their own pinned virtualenvs, see bench/peers.py)."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run."""

    n: int = 100_000
    """Requests for ours and naive, per concurrency level."""
    concurrency: tuple[int, ...] = (64, 256)
    latency_ms: float = 50.0
    """The fake server's fixed latency L."""
    peers_n: int = 5_000
    """Requests for curator and distilabel (they are slow; the rate settles well before 5k)."""
    only: tuple[str, ...] = ()
    """Run only these systems (default: all)."""
    server_workers: int = 1
    """Fake server processes sharing the port."""
    server_engine: str = "raw"
    """The fake's HTTP engine for the C/L rows: raw (bare asyncio.Protocol, cheapest) or aiohttp."""
    out: str = "runs/bench-harvest"
    capacity_n: int = 20_000
    """Requests for the server-capacity stage."""
    peers: bool = True
    """Run the peer systems (curator, distilabel), building their pinned virtualenvs on first use."""
    peer_python: tuple[str, ...] = ()
    """``NAME=PATH`` items: run peer NAME with this python instead of its pinned virtualenv."""

    def __post_init__(self) -> None:
        from stillhouse.bench.peers import check_overrides

        check_overrides(self.peer_python)
        if self.n < 1 or self.peers_n < 1 or self.capacity_n < 1:
            raise ConfigError("n, peers_n and capacity_n must be >= 1")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ConfigError(f"concurrency={self.concurrency}: give levels >= 1, e.g. 64 256")
        if self.latency_ms <= 0:
            raise ConfigError(f"latency_ms={self.latency_ms}: must be > 0 (the limit is C/L)")
        unknown = set(self.only) - set(SYSTEMS)
        if unknown:
            raise ConfigError(f"only: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
        if self.server_workers < 1:
            raise ConfigError("server_workers must be >= 1")
        if self.server_engine not in ENGINES:
            raise ConfigError(f"server_engine={self.server_engine!r}: choose from {', '.join(ENGINES)}")

    def wants(self, system: str) -> bool:
        if system in PEER_SYSTEMS and not self.peers:
            return False
        return system in self.only if (self.only or system in OPT_IN) else True



def start_server(latency_ms: float, workers: int, out: Path, engine: str = "raw") -> tuple[subprocess.Popen[bytes], str]:
    """The fake server in its own process (group); returns it and its /v1 base URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = out / f"server-{port}.port"
    argv = [sys.executable, "-m", "stillhouse.testing.fakeserver", "--port", str(port), "--latency-ms",
            str(latency_ms), "--ready-file", str(ready), "--workers", str(workers), "--engine", engine]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    while not ready.exists():
        if p.poll() is not None or time.monotonic() - t0 > 30:
            raise RuntimeError("the fake server did not start")
        time.sleep(0.05)
    time.sleep(0.3 * workers)
    return p, f"http://127.0.0.1:{port}/v1"




def start_starlette(out: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A plain uvicorn+starlette fake (the kind DESIGN.md measured at ~3.6k req/s), for comparison."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = out / "children" / "child_starlette_server.py"
    script.write_text(STARLETTE)
    p = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if p.poll() is not None or time.monotonic() - t0 > 30:
                raise RuntimeError("the starlette fake did not start") from None
            time.sleep(0.1)
    return p, f"http://127.0.0.1:{port}/v1"


def stop_server(p: subprocess.Popen[bytes]) -> None:
    import signal

    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)


def write_prompts(path: Path, n: int) -> None:
    """n distinct arithmetic prompts, one JSON object a line."""
    with path.open("w") as f:
        for i in range(n):
            a, b = 10 + i // 1000, i % 1000
            f.write(json.dumps({"id": f"b{i}", "prompt": f"What is {a} + {b}? Reply with just the number."}) + "\n")


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every stage and print the table; returns the results (also saved as OUT/results.json)."""
    from rich.console import Console

    from stillhouse.bench.peers import prepare, run_env

    console = Console()
    # Peers first: a first-use build must finish before anything is measured.
    peer_py, peer_errors = prepare([p for p in PEER_SYSTEMS if cfg.wants(p)], cfg.peer_python, console)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    code = out / "children"
    shutil.rmtree(code, ignore_errors=True)
    code.mkdir()
    for name, src in (("naive", NAIVE), ("bare", BARE), ("ours", OURS), ("curator", CURATOR),
                      ("distilabel", DISTILABEL), ("anatomy", ANATOMY)):
        (code / f"child_{name}.py").write_text(src)  # not NAME.py: it would shadow the package
    peer_prompts = out / "prompts-peers.jsonl"
    write_prompts(peer_prompts, cfg.peers_n)
    small = out / "prompts-capacity.jsonl"
    write_prompts(small, cfg.capacity_n)
    big = out / f"prompts-{cfg.n}.jsonl"
    write_prompts(big, cfg.n)
    results: dict[str, Any] = {"config": cfg.__dict__ | {"concurrency": list(cfg.concurrency)},
                               "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
                               "peers": {k: str(v) for k, v in peer_py.items()}, "peer_errors": peer_errors,
                               "rows": []}
    py = sys.executable
    model = "fake-model"

    if cfg.wants("server"):
        console.print(f"[bold]server capacity[/bold] (L=0, C=256, the bare raw client, N={cfg.capacity_n})")
        for label, starter in (("server-raw", lambda: start_server(0.0, cfg.server_workers, out, "raw")),
                               ("server-aiohttp", lambda: start_server(0.0, cfg.server_workers, out, "aiohttp")),
                               ("server-starlette", lambda: start_starlette(out))):
            srv, url = starter()
            try:
                m = run_child([py, str(code / "child_bare.py"), url, model, "256", str(small)], label, 256,
                              server=srv)
                m.extra["latency_ms"] = 0.0
                results["rows"].append(m.__dict__)
                console.print(f"  {SERVER_LABELS[label]:36s} {m.rate:,.0f} req/s  server "
                              f"{m.extra.get('server_cpu_ms_per_req', 0):.3f} CPU-ms/req  {m.error or ''}")
            finally:
                stop_server(srv)

    if cfg.wants("anatomy"):
        run_anatomy(cfg, out, results, console)

    srv, url = start_server(cfg.latency_ms, cfg.server_workers, out, cfg.server_engine)
    try:
        for c in cfg.concurrency:
            limit = c / (cfg.latency_ms / 1000.0)
            console.print(f"[bold]C={c}, L={cfg.latency_ms:g} ms: limit C/L = {limit:,.0f} req/s[/bold]")
            runs: list[tuple[str, list[str], dict[str, str] | None]] = []
            if cfg.wants("ours"):
                run_dir = out / f"ours-c{c}"
                shutil.rmtree(run_dir, ignore_errors=True)
                runs.append(("ours", [py, str(code / "child_ours.py"), url, str(c), str(big), str(run_dir)], None))
            if cfg.wants("bare"):
                runs.append(("bare", [py, str(code / "child_bare.py"), url, model, str(c), str(big)], None))
            if cfg.wants("naive"):
                runs.append(("naive", [py, str(code / "child_naive.py"), url, model, str(c), str(big)], None))
            for peer in PEER_SYSTEMS:
                if peer not in peer_py:
                    if peer in peer_errors:
                        console.print(f"  {peer}: [yellow]skipped[/yellow]: {peer_errors[peer]}")
                    continue
                cache = out / f"{peer}-cache-c{c}-{int(time.time())}"
                runs.append((peer, [str(peer_py[peer]), str(code / f"child_{peer}.py"), url, model, str(c),
                                    str(peer_prompts), str(cache)], run_env(peer)))
            for system, argv, env in runs:
                m = run_child(argv, system, c, env=env, server=srv)
                m.extra["limit"] = limit
                results["rows"].append(m.__dict__)
                frac = m.rate / limit if limit else 0.0
                fr = m.extra["rate_requests"] / limit if limit else 0.0
                console.print(f"  {system:10s} N={m.n:>7,}  {m.rate:8,.0f} req/s  {frac:6.1%} of C/L "
                              f"({fr:6.1%} request phase)  "
                              f"{m.cpu_ms_per_req:6.3f} CPU-ms/req  RSS {m.rss_start_mb:6.0f} -> "
                              f"{m.rss_peak_mb:6.0f} MB  server {m.extra.get('server_cpu_ms_per_req', 0):.3f} "
                              f"CPU-ms/req  load {m.extra['load_avg_start']:.1f}  {m.error or ''}")
    finally:
        stop_server(srv)
    results["machine"]["load_avg_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    console.print(markdown_table(results, cfg))
    return results


def run_anatomy(cfg: BenchConfig, out: Path, results: dict[str, Any], console: Any, dur_s: float = 8.0) -> None:
    """Where the time goes: each server engine x each client, per C, an 8 s closed loop after 1 s of warm-up.

    Per cell: latency p50/p99 against L, event-loop lag of the client (a 1 ms sleep's overshoot),
    CPU per request on each side and run-queue wait per second on each side (from
    /proc/PID/task/*/schedstat: time runnable but not running, i.e. waiting for a core).
    """
    py = sys.executable
    console.print(f"[bold]anatomy[/bold] (L={cfg.latency_ms:g} ms; {dur_s:g} s per cell)")
    for engine in ENGINES:
        srv, url = start_server(cfg.latency_ms, cfg.server_workers, out, engine)
        try:
            for c in cfg.concurrency:
                limit = c / (cfg.latency_ms / 1000.0)
                for client in ("aiohttp", "raw"):
                    m = run_child([py, str(out / "children" / "child_anatomy.py"), url, str(c), str(dur_s), client,
                                   str(srv.pid)], f"anatomy:{engine}-server/{client}-client", c)
                    m.extra["limit"] = limit
                    results["rows"].append(m.__dict__)
                    e = m.extra
                    console.print(f"  server {engine:7s} client {client:7s} C={c:<4d} {m.rate / limit:6.1%} of C/L  "
                                  f"latency p50/p99 {e.get('lat_p50_ms', 0):.1f}/{e.get('lat_p99_ms', 0):.1f} ms  "
                                  f"loop lag p50/p99 {e.get('lag_p50_ms', 0):.2f}/{e.get('lag_p99_ms', 0):.1f} ms  "
                                  f"CPU-ms/req client {e.get('client_cpu_ms_per_req', 0):.3f} server "
                                  f"{e.get('server_cpu_ms_per_req', 0):.3f}  run-queue wait ms/s client "
                                  f"{e.get('client_runq_ms_per_s', 0):.0f} server {e.get('server_runq_ms_per_s', 0):.0f}  "
                                  f"load {e['load_avg_start']:.1f} {m.error or ''}")
        finally:
            stop_server(srv)


SERVER_LABELS = {"server-raw": "our fake, raw engine (asyncio.Protocol)",
                 "server-aiohttp": "our fake, aiohttp.web engine", "server-starlette": "plain uvicorn+starlette fake", "server": "our fake (aiohttp.web)"}


def markdown_table(results: dict[str, Any], cfg: BenchConfig) -> str:
    """The results as the Markdown table docs/benchmarks.md carries."""
    rows = [r for r in results["rows"] if not r["system"].startswith(("server", "anatomy"))]
    lines = [("| C | system | N | req/s | % of C/L | % of C/L, request phase | vs best peer | client CPU-ms/req | "
              "server CPU-ms/req | RSS start → peak (MB) | load |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cfg.concurrency:
        at = [r for r in rows if r["concurrency"] == c]
        peers = [r["rate"] for r in at if r["system"] in ("curator", "distilabel") and not r["error"]]
        best = max(peers) if peers else 0.0
        limit = c / (cfg.latency_ms / 1000.0)
        for r in at:
            vs = f"{r['rate'] / best:.2f}×" if best else "–"
            err = f" (failed: {' '.join(r['error'].split())[:80]})" if r["error"] else ""
            ex = r.get("extra", {})
            rq = ex.get("rate_requests", r["rate"])
            lines.append(f"| {c} | {r['system']}{err} | {r['n']:,} | {r['rate']:,.0f} | {r['rate'] / limit:.1%} | "
                         f"{rq / limit:.1%} | {vs} | {r['cpu_ms_per_req']:.3f} | {ex.get('server_cpu_ms_per_req', 0):.3f} | "
                         f"{r['rss_start_mb']:.0f} → {r['rss_peak_mb']:.0f} | {ex.get('load_avg_start', 0):.1f} |")
    anatomy = [r for r in results["rows"] if r["system"].startswith("anatomy")]
    if anatomy:
        lines += ["", ("| server / client | C | % of C/L | latency p50 / p99 (ms) | client loop lag p50 / p99 (ms) | "
                       "CPU-ms/req client / server | run-queue wait ms/s client / server | load |"),
                  "|---|---|---|---|---|---|---|---|"]
        for r in anatomy:
            e = r.get("extra", {})
            lim = e.get("limit") or 1.0
            lines.append(f"| {r['system'].split(':', 1)[1]} | {r['concurrency']} | {r['rate'] / lim:.1%} | "
                         f"{e.get('lat_p50_ms', 0):.1f} / {e.get('lat_p99_ms', 0):.1f} | "
                         f"{e.get('lag_p50_ms', 0):.2f} / {e.get('lag_p99_ms', 0):.1f} | "
                         f"{e.get('client_cpu_ms_per_req', 0):.3f} / {e.get('server_cpu_ms_per_req', 0):.3f} | "
                         f"{e.get('client_runq_ms_per_s', 0):.0f} / {e.get('server_runq_ms_per_s', 0):.0f} | "
                         f"{e.get('load_avg_start', 0):.1f} |")
    for name, why in results.get("peer_errors", {}).items():
        lines.append(f"\n{name}: not run: {why}")
    server = [r for r in results["rows"] if r["system"].startswith("server")]
    if server:
        lines.append("")
        lines.append("Fake server capacity (L=0, C=256, the bare raw client): " + ", ".join(
            f"{SERVER_LABELS.get(r['system'], r['system'])} {r['rate']:,.0f} req/s "
            f"({r.get('extra', {}).get('server_cpu_ms_per_req', 0):.3f} server CPU-ms/req)" for r in server) + ".")
    return "\n".join(lines)
