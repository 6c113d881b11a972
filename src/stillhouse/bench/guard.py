"""`stillhouse bench guard`: the guard against going direct and against the LiteLLM proxy, in one run.

Setup, all on loopback, each server in its own process:

- the upstream: ``stillhouse.testing.fakeserver`` with a fixed latency (default 50 ms);
- **direct**: the load generator talks to the upstream itself;
- **guard**: ``stillhouse guard`` (uvicorn, SQLite log in a temp dir unless ``db_url``), one
  account with high but active limits, a real key;
- **litellm**: ``litellm --config`` from its pinned virtualenv (:mod:`stillhouse.bench.peers`,
  built on first use; ``peer_python`` names another), with
  ``LITELLM_LOCAL_MODEL_COST_MAP=True``, one ``openai/<model>`` entry pointing at the same
  upstream and a ``master_key`` (no database: it has no virtual keys and no spend log then).
- **guard+detector** (with ``detector_dir``): a second guard with online detection in shadow
  mode, the detector in its own process (the guard's default); ``detector_inline`` adds a third
  with the detector in the guard's loop (``detect_mode="inline"``). The summary's ``detector``
  entries are these minus the plain guard, from the same rounds. A guard's CPU includes its
  detector process (a direct child).

Requests cycle through ``prompts`` distinct arithmetic questions. Measured, per target,
interleaved so drift hits all of them alike:

1. added latency: ``latency_requests`` requests at ``latency_concurrency`` (closed loop), in
   ``latency_rounds`` rounds that each visit every target; p50/p99 of each minus direct's;
2. throughput ratio: open loop at each offered rate for ``duration_s`` s; completed OK/s
   divided by direct's at the same rate;
3. log loss (guard only): ``lossless_requests`` requests at concurrency 64, the guard is then
   stopped (graceful: it flushes) and its log is counted against the responses received.

Run: ``stillhouse bench guard --out bench-guard.json`` (``--help`` lists the knobs);
``--detector DIR [--detector-inline]`` for the detection arms; ``--compare-servers`` and
``--compare-clients`` for the uvicorn and upstream-client A/Bs.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = "fake-model"


@dataclass(frozen=True)
class GuardBenchConfig:
    """What the guard benchmark runs."""

    latency_ms: float = 50.0
    """Fixed latency of the fake upstream."""
    rates: tuple[float, ...] = (200.0, 1000.0)
    """Offered loads (requests/s) for the throughput ratios."""
    duration_s: float = 10.0
    """Seconds of offered load per rate and target."""
    drain_s: float = 15.0
    """After the offered-load window, how long outstanding requests may still finish."""
    latency_requests: int = 2000
    latency_concurrency: int = 8
    lossless_requests: int = 50000
    """Requests for the log-loss count (0 = skip)."""
    lossless_concurrency: int = 64
    peers: bool = True
    """Run the LiteLLM proxy column, building its pinned virtualenv on first use; False skips it."""
    peer_python: tuple[str, ...] = ()
    """``litellm=PATH``: run LiteLLM with this python instead of its pinned virtualenv."""
    db_url: str = ""
    """Guard log store; "" = SQLite in the run's temp dir."""
    max_tokens: int = 16
    latency_rounds: int = 4
    """The added-latency requests are split into this many rounds; each round runs every target
    in turn, so drift on a shared machine hits all of them alike. Percentiles pool the rounds."""
    detector_dir: str = ""
    """A fitted detector (``stillhouse detect --fit``); adds the "guard+detector" target: a second
    guard, identical but for online detection (in shadow mode, so verdicts are computed, persisted
    and logged but the bench's one-prompt-family account is never blocked). "" = no such target."""
    detector_inline: bool = False
    """With ``detector_dir``: also a third guard with the detector in its event loop
    (``detect_mode="inline"``, default ``detect_max_lag``), reported as "guard+detector(inline)"."""
    prompts: int = 64
    """Distinct prompts the load cycles through (arithmetic questions), the same for every target."""

    def __post_init__(self) -> None:
        from stillhouse.bench.peers import check_overrides

        check_overrides(self.peer_python)
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms={self.latency_ms}: must be >= 0")
        if not self.rates or any(r <= 0 for r in self.rates):
            raise ValueError(f"rates={self.rates}: give positive requests/s, e.g. (200, 1000)")
        if self.duration_s <= 0 or self.drain_s < 0:
            raise ValueError("duration_s must be > 0 and drain_s >= 0")
        if self.latency_requests < 10 or self.latency_concurrency < 1:
            raise ValueError("latency_requests must be >= 10 and latency_concurrency >= 1")
        if self.lossless_requests < 0 or self.lossless_concurrency < 1:
            raise ValueError("lossless_requests must be >= 0 and lossless_concurrency >= 1")
        if not 1 <= self.latency_rounds <= self.latency_requests:
            raise ValueError(f"latency_rounds={self.latency_rounds}: must be 1..latency_requests")
        if self.prompts < 1:
            raise ValueError(f"prompts={self.prompts}: must be >= 1")
        if self.detector_inline and not self.detector_dir:
            raise ValueError("detector_inline needs detector_dir (the inline arm is a second detector guard)")
        if self.detector_dir and not (Path(self.detector_dir) / "detector.json").is_file():
            raise ValueError(f"detector_dir={self.detector_dir!r} holds no detector.json; fit one with "
                             "`stillhouse detect --fit --log BENIGN_LOG --model DIR` (or use OUT/detector "
                             "of a `stillhouse arena --quick --out OUT` run)")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path,
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


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``cmd`` in its own session, output to ``log``; ``env`` is the child's whole environment (None: ours)."""
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
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


def _post_json(url: str, body: Any, token: str) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# -- load generation ----------------------------------------------------------------------
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


# -- the run ------------------------------------------------------------------------------
def _litellm_config(path: Path, upstream: str, master_key: str) -> str:
    text = (
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {master_key}\n"
    )
    path.write_text(text)
    return text


def _git_commit() -> str:
    """The commit of the code under test ("" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             check=False, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except OSError:
        return ""


DETECTOR_TARGET = "guard+detector"
INLINE_TARGET = "guard+detector(inline)"


def bench_bodies(n: int, max_tokens: int) -> list[dict[str, Any]]:
    """``n`` chat requests with distinct arithmetic questions (deterministic)."""
    return [{"model": MODEL, "messages": [{"role": "user", "content": f"What is {12 + 7 * i} + {30 + 3 * i}?"}],
             "max_tokens": max_tokens} for i in range(n)]


def _start_guard(work: Path, name: str, upstream: str, db_url: str, accounts: list[str],
                 extra: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str, list[str], Any]:
    """A guard process (``stillhouse guard --config``) with one high-limit account and key per name."""
    from stillhouse.config import save_config
    from stillhouse.guard.config import GuardConfig, sha256_hex

    admin = secrets.token_urlsafe(24)
    port = _free_port()
    gcfg = GuardConfig(upstream_url=upstream, admin_token_sha256=sha256_hex(admin), port=port, db_url=db_url,
                       spool_dir=str(work / f"spool-{name}"), **extra)
    save_config(gcfg, work / f"{name}-config.json")
    log = work / f"{name}.log"
    proc = _spawn([str(Path(sys.executable).parent / "stillhouse"), "guard", "--config",
                   str(work / f"{name}-config.json")], log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/healthz", proc, 120, log)
        lim = {"requests_per_min": 10**9, "tokens_per_min": 10**12, "max_concurrent_streams": 10**6}
        keys = []
        for account in accounts:
            _post_json(url + "/admin/accounts", {"account_id": account, "limits": lim}, admin)
            keys.append(_post_json(url + f"/admin/accounts/{account}/keys", {}, admin)["key"])
    except BaseException:
        _stop(proc)
        raise
    return proc, url, keys, gcfg


def run_bench(cfg: GuardBenchConfig, work: Path | None = None) -> dict[str, Any]:
    """Run everything; returns the results as a JSON-ready dict (ratios included)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from stillhouse.bench.peers import prepare, run_env
    from stillhouse.config import config_to_dict
    from stillhouse.guard.store import open_store

    # The peer first: a first-use build must finish before anything is measured.
    peer_py, peer_errors = prepare(["litellm"] if cfg.peers else [], cfg.peer_python)
    work = work or Path(tempfile.mkdtemp(prefix="stillhouse-bench-guard-"))
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"config": config_to_dict(cfg), "work_dir": str(work),
                              "errors": [f"{k}: {v}" for k, v in peer_errors.items()],
                              "machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
                              "git_commit": _git_commit(), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                        time.gmtime())}
    body = bench_bodies(cfg.prompts, cfg.max_tokens)
    try:
        # upstream
        up_port = _free_port()
        up_log = work / "upstream.log"
        up = _spawn([sys.executable, "-m", "stillhouse.testing.fakeserver", "--port", str(up_port),
                     "--latency-ms", str(cfg.latency_ms), "--model", MODEL], up_log)
        procs.append(up)
        upstream = f"http://127.0.0.1:{up_port}"
        _wait_http(upstream + "/health", up, 30, up_log)

        # guard (and, with a detector, a second guard that differs only by online detection)
        guard, g_url, keys, gcfg = _start_guard(work, "guard", upstream, cfg.db_url or f"sqlite:///{work}/guard.db",
                                                ["bench", "lossless"], {})
        procs.append(guard)
        key, loss_key = keys
        result["guard_config"] = config_to_dict(gcfg)

        targets: dict[str, tuple[str, str | None]] = {
            "direct": (upstream + "/v1/chat/completions", None),
            "guard": (g_url + "/v1/chat/completions", key),
        }
        server_pid = {"direct": up.pid, "guard": guard.pid}
        if cfg.detector_dir:
            gd, gd_url, (dkey,), gdcfg = _start_guard(work, "guard-detector", upstream,
                                                      f"sqlite:///{work}/guard-detector.db", ["bench"],
                                                      {"detector_dir": str(Path(cfg.detector_dir).resolve()),
                                                       "shadow": True})
            procs.append(gd)
            targets[DETECTOR_TARGET] = (gd_url + "/v1/chat/completions", dkey)
            server_pid[DETECTOR_TARGET] = gd.pid
            result["guard_detector_config"] = config_to_dict(gdcfg)
            if cfg.detector_inline:
                gs, gs_url, (skey,), _ = _start_guard(work, "guard-detector-inline", upstream,
                                                      f"sqlite:///{work}/guard-detector-inline.db", ["bench"],
                                                      {"detector_dir": str(Path(cfg.detector_dir).resolve()),
                                                       "shadow": True, "detect_mode": "inline"})
                procs.append(gs)
                targets[INLINE_TARGET] = (gs_url + "/v1/chat/completions", skey)
                server_pid[INLINE_TARGET] = gs.pid

        # litellm
        if "litellm" in peer_py:
            litellm_python = str(peer_py["litellm"])
            try:
                l_port = _free_port()
                master = "sk-bench-" + secrets.token_hex(8)
                l_text = _litellm_config(work / "litellm.yaml", upstream, master)
                l_log = work / "litellm.log"
                lbin = Path(litellm_python).parent / "litellm"
                if not lbin.exists():
                    raise RuntimeError(f"{lbin} not found: pip install 'litellm[proxy]' into "
                                       f"{Path(litellm_python).parent.parent}")
                version = subprocess.run([litellm_python, "-c",
                                          "import importlib.metadata as m; print(m.version('litellm'))"],
                                         capture_output=True, text=True, timeout=60, check=False).stdout.strip()
                ll = _spawn([str(lbin), "--config", str(work / "litellm.yaml"), "--host", "127.0.0.1",
                             "--port", str(l_port), "--num_workers", "1"], l_log, env=run_env("litellm"))
                procs.append(ll)
                l_url = f"http://127.0.0.1:{l_port}"
                _wait_http(l_url + "/health/liveliness", ll, 180, l_log)
                _post_json(l_url + "/v1/chat/completions", body[0], master)  # warm-up, proves auth works
                targets["litellm"] = (l_url + "/v1/chat/completions", master)
                server_pid["litellm"] = ll.pid
                result["litellm"] = {"version": version, "config_yaml": l_text.replace(master, "<master_key>"),
                                     "mode": "master_key auth only; no database (so no virtual keys and no "
                                             "spend log)", "workers": 1}
            except Exception as exc:  # noqa: BLE001 - report and carry on without the peer
                result["errors"].append(f"litellm: {exc}")

        loop = asyncio.new_event_loop()
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()) as bar:
                # warm-up
                for name, (url, tok) in targets.items():
                    loop.run_until_complete(closed_loop(url, tok, 100, 8, body))
                # 1. added latency, in rounds that visit every target in turn
                per_round = [cfg.latency_requests // cfg.latency_rounds + (i < cfg.latency_requests % cfg.latency_rounds)
                             for i in range(cfg.latency_rounds)]
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
                cpu = {name: [0.0, 0.0] for name in targets}
                tasks = {name: bar.add_task(f"latency  {name:7s}", total=cfg.latency_requests) for name in targets}
                for n_round in per_round:
                    for name, (url, tok) in targets.items():
                        c0 = process_cpu_s(server_pid[name]), process_cpu_s(up.pid)
                        runs[name].append(loop.run_until_complete(closed_loop(
                            url, tok, n_round, cfg.latency_concurrency, body,
                            progress=lambda t=tasks[name]: bar.advance(t))))
                        c1 = process_cpu_s(server_pid[name]), process_cpu_s(up.pid)
                        cpu[name][0] += c1[0] - c0[0]
                        cpu[name][1] += c1[1] - c0[1]
                lat: dict[str, Any] = {}
                for name, rs in runs.items():
                    pooled = [x for r in rs for x in r.pop("latencies_ms")]
                    wall = sum(r["wall_s"] for r in rs)
                    statuses: dict[str, int] = {}
                    for r in rs:
                        for code, k in r["statuses"].items():
                            statuses[str(code)] = statuses.get(str(code), 0) + k
                    lat[name] = {"n": cfg.latency_requests, "ok": len(pooled), "statuses": statuses,
                                 "client_errors": sum(r["client_errors"] for r in rs), "wall_s": wall,
                                 "p50_ms": percentile(pooled, 50), "p99_ms": percentile(pooled, 99),
                                 "rps": len(pooled) / wall if wall else 0.0,
                                 "rounds_p50_ms": [round(r["p50_ms"], 3) for r in rs],
                                 # CPU per request is what contention cannot blur: how many cores a rate needs.
                                 "server_cpu_ms_per_request": 1000 * cpu[name][0] / cfg.latency_requests,
                                 "upstream_cpu_ms_per_request": 1000 * cpu[name][1] / cfg.latency_requests}
                result["latency"] = lat
                # 2. offered load
                thr: dict[str, Any] = {}
                for rate in cfg.rates:
                    for name, (url, tok) in targets.items():
                        if name in (DETECTOR_TARGET, INLINE_TARGET):
                            continue  # its goal is latency; the throughput ratios compare proxies
                        t = bar.add_task(f"{rate:g} req/s {name:7s}", total=None)
                        thr.setdefault(f"{rate:g}", {})[name] = loop.run_until_complete(
                            open_loop(url, tok, rate, cfg.duration_s, cfg.drain_s, body))
                        bar.update(t, total=1, completed=1)
                result["throughput"] = thr
                # 3. log loss through the guard
                if cfg.lossless_requests:
                    t = bar.add_task("lossless guard", total=cfg.lossless_requests)
                    c0g = process_cpu_s(guard.pid)
                    result["lossless_run"] = loop.run_until_complete(closed_loop(
                        targets["guard"][0], loss_key, cfg.lossless_requests, cfg.lossless_concurrency, body,
                        progress=lambda: bar.advance(t)))
                    result["lossless_run"].pop("latencies_ms")
                    result["lossless_run"]["guard_cpu_ms_per_request"] = \
                        1000 * (process_cpu_s(guard.pid) - c0g) / cfg.lossless_requests
        finally:
            loop.close()

        # stop the guard gracefully (it flushes its log), then count
        _stop(guard)
        if guard.returncode not in (0, -signal.SIGTERM):
            result["errors"].append(f"guard exited with {guard.returncode}")
        if cfg.lossless_requests:
            store = open_store(gcfg.db_url)
            logged = len(store.read_records("lossless"))
            spooled = 0
            from stillhouse.guard.spool import Spool

            spooled = Spool(gcfg.spool_dir).pending_records()
            run = result["lossless_run"]
            answered = sum(run["statuses"].values())
            result["lossless"] = {"requests": cfg.lossless_requests, "answered": answered,
                                  "client_errors": run["client_errors"], "logged": logged,
                                  "still_in_spool": spooled,
                                  "lost": max(0, answered - logged - spooled)}
            store.close()
        result["machine"]["loadavg_after"] = os.getloadavg()
        result["summary"] = summarize(result)
        return result
    finally:
        for p in reversed(procs):
            _stop(p)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios: added latency vs direct, throughput vs direct, per proxy."""
    out: dict[str, Any] = {}
    lat = result.get("latency", {})
    d = lat.get("direct")
    for name in ("guard", DETECTOR_TARGET, INLINE_TARGET, "litellm"):
        if name not in lat or d is None:
            continue
        s: dict[str, Any] = {
            "added_p50_ms": round(lat[name]["p50_ms"] - d["p50_ms"], 2),
            "added_p99_ms": round(lat[name]["p99_ms"] - d["p99_ms"], 2),
            "server_cpu_ms_per_request": round(lat[name].get("server_cpu_ms_per_request", float("nan")), 3),
        }
        for rate, per in result.get("throughput", {}).items():
            if name in per and per["direct"]["achieved_rps"] > 0:
                s[f"throughput_ratio_at_{rate}"] = round(per[name]["achieved_rps"] / per["direct"]["achieved_rps"], 3)
        out[name] = s
    if "lossless" in result:
        out.setdefault("guard", {})["log_records_lost"] = result["lossless"]["lost"]
    g = lat.get("guard")
    for key, target in (("detector", DETECTOR_TARGET), ("detector_inline", INLINE_TARGET)):
        gd = lat.get(target)
        if g is not None and gd is not None:
            # What online detection adds: the same guard with and without it, same rounds (issue 6: <= 0.2 ms p50).
            out[key] = {
                "added_p50_ms": round(gd["p50_ms"] - g["p50_ms"], 3),
                "added_p99_ms": round(gd["p99_ms"] - g["p99_ms"], 3),
                "added_cpu_ms_per_request": round(gd.get("server_cpu_ms_per_request", float("nan"))
                                                  - g.get("server_cpu_ms_per_request", float("nan")), 3),
            }
    return out


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
    up_port = _free_port()
    up = _spawn([sys.executable, "-m", "stillhouse.testing.fakeserver", "--port", str(up_port), "--latency-ms",
                 str(latency_ms), "--model", MODEL], work / "upstream.log")
    try:
        _wait_http(f"http://127.0.0.1:{up_port}/health", up, 30, work / "upstream.log")
        for rep in range(repeats):
            for i, (label, http, loop_name, extra) in enumerate(variants):
                port = _free_port()
                admin = secrets.token_urlsafe(16)
                name = f"v{i}-{rep}"
                cfg = GuardConfig(upstream_url=f"http://127.0.0.1:{up_port}", admin_token_sha256=sha256_hex(admin),
                                  port=port, db_url=f"sqlite:///{work}/{name}.db",
                                  spool_dir=str(work / f"spool-{name}"), **extra)
                save_config(cfg, work / f"{name}.json")
                log = work / f"guard-{name}.log"
                g = _spawn([sys.executable, "-c", _SERVER_RUNNER, str(work / f"{name}.json"), http, loop_name], log)
                try:
                    url = f"http://127.0.0.1:{port}"
                    _wait_http(url + "/healthz", g, 60, log)
                    lim = {"requests_per_min": 10**9, "tokens_per_min": 10**12}
                    _post_json(url + "/admin/accounts", {"account_id": "b", "limits": lim}, admin)
                    key = _post_json(url + "/admin/accounts/b/keys", {}, admin)["key"]
                    asyncio.run(closed_loop(url + "/v1/chat/completions", key, 200, 16, body))  # warm-up
                    c0 = process_cpu_s(g.pid)
                    r = asyncio.run(closed_loop(url + "/v1/chat/completions", key, requests, concurrency, body))
                    cpu = 1000 * (process_cpu_s(g.pid) - c0) / requests
                finally:
                    _stop(g)
                out["runs"].append({"variant": label, "repeat": rep,
                                    "guard_cpu_ms_per_request": round(cpu, 3), "rps": round(r["rps"], 1),
                                    "p50_ms": round(r["p50_ms"], 1), "ok": r["ok"]})
    finally:
        _stop(up)
    out["loadavg_after"] = os.getloadavg()
    return out


def format_markdown(result: dict[str, Any]) -> str:
    """The figures as markdown tables (what docs/benchmarks.md carries)."""
    lines = []
    lat = result.get("latency", {})
    if lat:
        c = result["config"]
        lines += [(f"Latency, {c['latency_requests']} requests at concurrency {c['latency_concurrency']} "
                   f"in {c.get('latency_rounds', 1)} interleaved round(s) "
                   f"(upstream latency {c['latency_ms']:g} ms):"), "",
                  "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | proxy CPU ms/request |",
                  "|---|---|---|---|---|---|"]
        d = lat.get("direct", {})
        for name, v in lat.items():
            if name == "direct":
                lines.append(f"| direct | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | — | — | — |")
                continue
            add50 = v["p50_ms"] - d.get("p50_ms", float("nan"))
            add99 = v["p99_ms"] - d.get("p99_ms", float("nan"))
            cpu = v.get("server_cpu_ms_per_request", float("nan"))
            lines.append(f"| {name} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {add50:+.1f} | {add99:+.1f} | "
                         f"{cpu:.2f} |")
        lines.append("")
    summ = summarize(result) if lat else {}
    for key, target in (("detector", DETECTOR_TARGET), ("detector_inline", INLINE_TARGET)):
        det = summ.get(key)
        if det:
            lines += [(f"Online detection ({target} minus guard, same rounds): p50 {det['added_p50_ms']:+.2f} ms, "
                       f"p99 {det['added_p99_ms']:+.2f} ms, CPU {det['added_cpu_ms_per_request']:+.3f} ms/request."),
                      ""]
    thr = result.get("throughput", {})
    if thr:
        lines += [f"Offered load, {result['config']['duration_s']:g} s per rate (open loop):", "",
                  "| offered req/s | target | achieved OK req/s | ratio to direct | p50 ms | p99 ms | non-200 |",
                  "|---|---|---|---|---|---|---|"]
        for rate, per in thr.items():
            base = per.get("direct", {}).get("achieved_rps", 0) or float("nan")
            for name, v in per.items():
                bad = v["sent"] - v["ok"]
                lines.append(f"| {rate} | {name} | {v['achieved_rps']:.0f} | {v['achieved_rps'] / base:.2f} | "
                             f"{v['p50_ms']:.0f} | {v['p99_ms']:.0f} | {bad} |")
        lines.append("")
    if "lossless" in result:
        x = result["lossless"]
        lines.append(f"Log loss: {x['requests']} requests through the guard, {x['answered']} answered, "
                     f"{x['logged']} records in the log, {x['still_in_spool']} in the spool, **{x['lost']} lost**.")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_bench(GuardBenchConfig()), indent=2))
