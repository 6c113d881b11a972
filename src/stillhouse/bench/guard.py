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
``--compare-clients`` for the uvicorn and upstream-client A/Bs (:mod:`stillhouse.bench.guard_ab`).
The load comes from :mod:`stillhouse.bench.loadgen`, the processes from :mod:`stillhouse.bench.procs`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillhouse.bench.loadgen import closed_loop, open_loop, percentile
from stillhouse.bench.procs import free_port, post_json, process_cpu_s, spawn, stop, wait_http

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
    port = free_port()
    gcfg = GuardConfig(upstream_url=upstream, admin_token_sha256=sha256_hex(admin), port=port, db_url=db_url,
                       spool_dir=str(work / f"spool-{name}"), **extra)
    save_config(gcfg, work / f"{name}-config.json")
    log = work / f"{name}.log"
    proc = spawn([sys.executable, "-m", "stillhouse", "guard", "--config",
                   str(work / f"{name}-config.json")], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, 120, log)
        lim = {"requests_per_min": 10**9, "tokens_per_min": 10**12, "max_concurrent_streams": 10**6}
        keys = []
        for account in accounts:
            post_json(url + "/admin/accounts", {"account_id": account, "limits": lim}, admin)
            keys.append(post_json(url + f"/admin/accounts/{account}/keys", {}, admin)["key"])
    except BaseException:
        stop(proc)
        raise
    return proc, url, keys, gcfg


def run_bench(cfg: GuardBenchConfig, work: Path | None = None) -> dict[str, Any]:
    """Run everything; returns the results as a JSON-ready dict (ratios included)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from stillhouse.bench.peers import prepare
    from stillhouse.config import config_to_dict

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
        up_port = free_port()
        up_log = work / "upstream.log"
        up = spawn([sys.executable, "-m", "stillhouse.testing.fakeserver", "--port", str(up_port),
                     "--latency-ms", str(cfg.latency_ms), "--model", MODEL], up_log)
        procs.append(up)
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream + "/health", up, 30, up_log)

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

        if "litellm" in peer_py:
            try:
                ll, l_url, master, result["litellm"] = _start_litellm(work, upstream, str(peer_py["litellm"]), body)
                procs.append(ll)
                targets["litellm"] = (l_url + "/v1/chat/completions", master)
                server_pid["litellm"] = ll.pid
            except Exception as exc:  # noqa: BLE001 - report and carry on without the peer
                result["errors"].append(f"litellm: {exc}")

        loop = asyncio.new_event_loop()
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()) as bar:
                # warm-up
                for name, (url, tok) in targets.items():
                    loop.run_until_complete(closed_loop(url, tok, 100, 8, body))
                # 1. added latency, in rounds that visit every target in turn
                lat = _measure_latency(loop, bar, cfg, targets, server_pid, up.pid, body)
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
        stop(guard)
        if guard.returncode not in (0, -signal.SIGTERM):
            result["errors"].append(f"guard exited with {guard.returncode}")
        if cfg.lossless_requests:
            result["lossless"] = _count_lossless(cfg.lossless_requests, gcfg, result["lossless_run"])
        result["machine"]["loadavg_after"] = os.getloadavg()
        result["summary"] = summarize(result)
        return result
    finally:
        for p in reversed(procs):
            stop(p)


def _start_litellm(work: Path, upstream: str, litellm_python: str,
                   body: list[dict[str, Any]]) -> tuple[subprocess.Popen[bytes], str, str, dict[str, Any]]:
    """LiteLLM's proxy in front of the same upstream, warmed up: (process, URL, master key, what ran)."""
    from stillhouse.bench.peers import run_env

    l_port = free_port()
    master = "sk-bench-" + secrets.token_hex(8)
    l_text = _litellm_config(work / "litellm.yaml", upstream, master)
    l_log = work / "litellm.log"
    lbin = Path(litellm_python).parent / "litellm"
    if not lbin.exists():
        raise RuntimeError(f"{lbin} not found: pip install 'litellm[proxy]' into {Path(litellm_python).parent.parent}")
    version = subprocess.run([litellm_python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=60, check=False).stdout.strip()
    ll = spawn([str(lbin), "--config", str(work / "litellm.yaml"), "--host", "127.0.0.1",
                "--port", str(l_port), "--num_workers", "1"], l_log, env=run_env("litellm"))
    l_url = f"http://127.0.0.1:{l_port}"
    try:
        wait_http(l_url + "/health/liveliness", ll, 180, l_log)
        post_json(l_url + "/v1/chat/completions", body[0], master)  # warm-up, proves auth works
    except BaseException:
        stop(ll)
        raise
    info = {"version": version, "config_yaml": l_text.replace(master, "<master_key>"),
            "mode": "master_key auth only; no database (so no virtual keys and no spend log)", "workers": 1}
    return ll, l_url, master, info


def _measure_latency(loop: asyncio.AbstractEventLoop, bar: Any, cfg: GuardBenchConfig,
                     targets: dict[str, tuple[str, str | None]], server_pid: dict[str, int], up_pid: int,
                     body: list[dict[str, Any]]) -> dict[str, Any]:
    """Closed-loop latency of every target, in rounds that visit each in turn (so drift in the machine's
    load falls on all alike), with the server's and the upstream's CPU per request."""
    per_round = [cfg.latency_requests // cfg.latency_rounds + (i < cfg.latency_requests % cfg.latency_rounds)
                 for i in range(cfg.latency_rounds)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    cpu = {name: [0.0, 0.0] for name in targets}
    tasks = {name: bar.add_task(f"latency  {name:7s}", total=cfg.latency_requests) for name in targets}
    for n_round in per_round:
        for name, (url, tok) in targets.items():
            c0 = process_cpu_s(server_pid[name]), process_cpu_s(up_pid)
            runs[name].append(loop.run_until_complete(closed_loop(
                url, tok, n_round, cfg.latency_concurrency, body, progress=lambda t=tasks[name]: bar.advance(t))))
            c1 = process_cpu_s(server_pid[name]), process_cpu_s(up_pid)
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
    return lat


def _count_lossless(requests: int, gcfg: Any, run: dict[str, Any]) -> dict[str, Any]:
    """After the guard stopped: of the answered requests, how many its log (or spool) holds."""
    from stillhouse.guard.spool import Spool
    from stillhouse.guard.store import open_store

    store = open_store(gcfg.db_url)
    try:
        logged = len(store.read_records("lossless"))
    finally:
        store.close()
    spooled = Spool(gcfg.spool_dir).pending_records()
    answered = sum(run["statuses"].values())
    return {"requests": requests, "answered": answered, "client_errors": run["client_errors"], "logged": logged,
            "still_in_spool": spooled, "lost": max(0, answered - logged - spooled)}


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
