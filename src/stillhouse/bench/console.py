"""`stillhouse bench console`: console page latency over a traffic log of a million records, SQLite and PostgreSQL.

Per backend, in one run:

1. fill a fresh guard store: ``accounts`` accounts (with keys), ``records`` traffic records spread over
   ``days`` days with a heavy-tailed split across accounts (the busiest has tens of thousands),
   prompts and answers of about ``text_chars`` characters, a few refusals and errors; bulk insert
   (SQLite ``executemany`` in large transactions, PostgreSQL ``COPY``); then the counter tables are
   built by the store's own one-time backfill (``SqlStore.migrate``, the path an existing database
   takes), and detector scores, clusters, decisions, reviews and audit rows are added;
2. start the real guard on that store (uvicorn on loopback) and log in to its console;
3. request every page ``requests_per_page`` times (after ``warmup`` unmeasured requests), one at a
   time over keep-alive HTTP, and report p50/p95/max in ms per page, with the fill and backfill times.

The goal is p95 <= ``target_p95_ms`` (300 ms) for every page on both backends.

Run: ``nice stillhouse bench console --out runs/bench-console.json`` (about 5 minutes on 2 cores,
2-3 GB of temporary disk); ``--records 100000`` for a quick look; ``--pg-url`` to use a running
PostgreSQL instead of a throwaway cluster (needs initdb; ``bash scripts/ensure-postgres.sh``).
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

TRAFFIC_COLS = ("request_id", "ts", "account_id", "key_id", "client_ip", "user_agent", "header_fingerprint",
                "model", "params", "messages", "response_text", "prompt_tokens", "completion_tokens",
                "latency_ms", "status", "decision", "decision_reason", "session_id")
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma", "omega", "river",
         "stone", "cloud", "table", "number", "prove", "explain", "compute", "step", "reason", "answer", "question",
         "model", "tokens", "budget", "invoice", "travel", "recipe")


@dataclass(frozen=True)
class BenchConsoleConfig:
    records: int = 1_000_000
    """Traffic records in the log."""
    accounts: int = 10_000
    """Accounts (each with one key); traffic is split across them heavy-tailed (Zipf-like)."""
    days: float = 30.0
    """Span of the log."""
    text_chars: int = 300
    """Rough length of each prompt and each answer."""
    clustered_share: float = 0.1
    """Share of accounts the fake detector puts into clusters (of 2-50 accounts)."""
    decisions: int = 2000
    """Detector decisions in force (half of them reviewed, a review and an audit row each); the tier filter's
    'block' page lists the accounts they block."""
    requests_per_page: int = 40
    """Measured requests per page."""
    warmup: int = 3
    backends: tuple[str, ...] = ("sqlite", "postgresql")
    pg_url: str = ""
    """A running PostgreSQL (a fresh database is created in it); "" = a throwaway cluster."""
    target_p95_ms: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.records < 1000 or self.accounts < 10 or self.accounts > self.records:
            raise ValueError("BenchConsoleConfig: records >= 1000 and 10 <= accounts <= records")
        if self.requests_per_page < 5:
            raise ValueError("BenchConsoleConfig.requests_per_page must be >= 5 (p95 needs a few samples)")
        bad = set(self.backends) - {"sqlite", "postgresql"}
        if bad or not self.backends:
            raise ValueError(f"BenchConsoleConfig.backends={self.backends}: use sqlite and/or postgresql")


# -- filling a store ---------------------------------------------------------------------------
def _text(rng: random.Random, n: int) -> str:
    out, size = [], 0
    while size < n:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def _account_weights(n: int) -> list[float]:
    return [1.0 / (i + 1) ** 0.9 for i in range(n)]


def traffic_rows(cfg: BenchConsoleConfig, start: float):  # type: ignore[no-untyped-def]
    """Yield traffic rows (tuples in TRAFFIC_COLS order), in arrival order."""
    rng = random.Random(cfg.seed)
    ids = [f"acct_{i:06d}" for i in range(cfg.accounts)]
    weights = _account_weights(cfg.accounts)
    chunk = 10_000
    span = cfg.days * 86400.0
    texts = [_text(rng, cfg.text_chars) for _ in range(512)]
    n = 0
    while n < cfg.records:
        k = min(chunk, cfg.records - n)
        who = rng.choices(range(cfg.accounts), weights=weights, k=k)
        for j, a in enumerate(who):
            i = n + j
            ts = start + span * i / cfg.records
            status = 200 if rng.random() > 0.03 else rng.choice((403, 429, 502))
            aid = ids[a]
            prompt = texts[(i * 7 + a) % 512]
            yield (f"b{i:09d}", ts, aid, f"k{a:06d}", f"10.{a % 200}.{(a // 200) % 250}.{a % 7 + 1}", "bench-client/1.0",
                   "fp", "fake-model", '{"max_tokens": 256}',
                   json.dumps([{"role": "user", "content": prompt}]), texts[(i * 13) % 512] if status == 200 else "",
                   len(prompt) // 4, cfg.text_chars // 4 if status == 200 else 0, 50.0, status,
                   "block" if status == 403 else "allow", "", "")
        n += k


def fill(store: Any, cfg: BenchConsoleConfig, log: Any = print) -> dict[str, float]:
    """Fill an initialized, empty store (see the module docstring); returns the phase timings in seconds."""
    from stillhouse.guard.store import AuditRow, DecisionRow, ReviewRow

    rng = random.Random(cfg.seed + 1)
    start = 1_790_000_000.0
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    orgs = [f"org-{i:03d}" for i in range(300)]
    accounts = [(f"acct_{i:06d}", rng.choice(orgs), "web", rng.choice(("NL", "US", "DE", "FR", "BR", "IN")),
                 "", start - 86400.0, "{}") for i in range(cfg.accounts)]
    keys = [(f"k{i:06d}", f"acct_{i:06d}", f"{i:064x}", start - 86400.0, None, start - 86400.0)
            for i in range(cfg.accounts)]
    pg = store.url.startswith("postgres")

    def accounts_and_keys(cur: Any) -> None:
        cur.executemany(store._sql("INSERT INTO accounts VALUES (?,?,?,?,?,?,?)"), accounts)
        cur.executemany(store._sql("INSERT INTO api_keys VALUES (?,?,?,?,?,?)"), keys)
    store._run(accounts_and_keys)
    rows = traffic_rows(cfg, start)
    if pg:
        def copy(cur: Any) -> None:
            with cur.copy(f"COPY traffic ({', '.join(TRAFFIC_COLS)}) FROM STDIN") as cp:
                for row in rows:
                    cp.write_row(row)
        store._run(copy)
    else:
        sql = f"INSERT INTO traffic ({', '.join(TRAFFIC_COLS)}) VALUES ({','.join('?' * len(TRAFFIC_COLS))})"
        batch: list[tuple[Any, ...]] = []
        store._run(lambda cur: cur.execute("PRAGMA synchronous=OFF"))
        for row in rows:
            batch.append(row)
            if len(batch) == 100_000:
                store._run(lambda cur, b=batch: cur.executemany(sql, b))
                batch = []
        if batch:
            store._run(lambda cur: cur.executemany(sql, batch))
    t["fill_traffic_s"] = time.perf_counter() - t0
    log(f"  {cfg.records:,} records in {t['fill_traffic_s']:.1f}s")
    t0 = time.perf_counter()
    store._run(lambda cur: cur.execute("DELETE FROM schema_meta"))
    store.migrate()
    if pg:  # a steady-state database: no autovacuum of the fresh bulk load during the measurement
        import psycopg

        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
    else:
        store._run(lambda cur: cur.execute("ANALYZE"))
    t["backfill_s"] = time.perf_counter() - t0
    log(f"  counters backfilled in {t['backfill_s']:.1f}s")
    t0 = time.perf_counter()
    scores, cid, i = [], 0, 0
    ids = [a[0] for a in accounts]
    rng.shuffle(ids)
    clustered = int(cfg.accounts * cfg.clustered_share)
    while i < cfg.accounts:
        size = rng.randint(2, 50) if i < clustered else 1
        for aid in ids[i:i + size]:
            s = rng.expovariate(0.3) + (20.0 if size > 1 and rng.random() < 0.5 else 0.0)
            scores.append((aid, start + cfg.days * 86400.0 - rng.random() * 86400.0, s,
                           f"c-{cid:05d}" if size > 1 else "", json.dumps([["cot", round(s / 2, 2)],
                                                                            ["template", round(s / 3, 2)]])))
        cid += 1
        i += size
    store.put_scores(scores)
    top = sorted(scores, key=lambda r: -r[2])[:cfg.decisions]
    decisions = [DecisionRow(f"d{j:06d}", "account", aid, "block" if s > 25 else "throttle",
                             f"detector score {s:.2f}", "detector", ts - j, "detector", [["score", s]], False)
                 for j, (aid, ts, s, _, _) in enumerate(top)]
    store.put_decisions(decisions)
    for j, d in enumerate(decisions[::2]):
        store.add_review(ReviewRow(f"rv{j:06d}", d.decision_id, d.target, "confirmed" if j % 3 else "dismissed",
                                   1 if j % 3 else 0, "bench", "bench", d.created_at + 60))
        store.add_audit(AuditRow(f"au{j:06d}", d.created_at + 60, "bench", "review:confirmed", d.target, "bench",
                                 {"action": "allow"}, {"action": d.action}))
    t["fill_rest_s"] = time.perf_counter() - t0
    return t


# -- measuring -----------------------------------------------------------------------------------
def _pages(store: Any) -> dict[str, str]:
    """The pages to measure, with ids picked from the filled store."""
    busiest = store.fetch("SELECT account_id FROM account_stats ORDER BY requests DESC, account_id DESC LIMIT 1")[0][0]
    median = store.fetch("SELECT account_id FROM account_stats ORDER BY requests DESC, account_id DESC LIMIT 1 "
                         "OFFSET (SELECT COUNT(*) / 2 FROM account_stats)")[0][0]
    cluster = store.fetch("SELECT cluster_id FROM account_stats WHERE cluster_id <> '' GROUP BY cluster_id "
                          "ORDER BY COUNT(*) DESC LIMIT 1")[0][0]
    return {
        "overview": "/console/",
        "accounts (by score)": "/console/accounts",
        "accounts (by requests)": "/console/accounts?sort=requests",
        "accounts (search)": "/console/accounts?q=00042",
        "accounts (org + min score)": "/console/accounts?org=org-007&min_score=5",
        "accounts (tier block)": "/console/accounts?tier=block",
        "account (busiest)": f"/console/accounts/{busiest}",
        "account (median)": f"/console/accounts/{median}",
        "clusters": "/console/clusters",
        "cluster (largest)": f"/console/clusters/{cluster}",
        "review queue": "/console/review",
        "audit": "/console/audit",
    }


def measure(url: str, pages: dict[str, str], cfg: BenchConsoleConfig, token: str) -> dict[str, dict[str, float]]:
    """p50/p95/max (ms) per page, plus the keyset follow-ups (page 2 of the list, older samples)."""
    import re

    from stillhouse.testing.console_client import ConsoleClient

    c = ConsoleClient(url)
    status, _ = c.login("bench", token)
    if status != 200:
        raise RuntimeError(f"console login failed with {status}")
    status, html = c.get(pages["accounts (by score)"])
    m = re.search(r'<a id="next" href="([^"]+)"', html)
    if m:
        pages["accounts (by score), next page"] = m.group(1).replace("&amp;", "&")
    status, html = c.get(pages["account (busiest)"])
    m = re.search(r'href="(/console/accounts/[^"?]+\?before=[^"]+)"', html)
    if m:
        pages["account (busiest), older requests"] = m.group(1).replace("&amp;", "&")
    out: dict[str, dict[str, float]] = {}
    for name, path in pages.items():
        times = []
        for i in range(cfg.warmup + cfg.requests_per_page):
            t0 = time.perf_counter()
            status, _ = c.get(path)
            dt = (time.perf_counter() - t0) * 1000.0
            if status != 200:
                raise RuntimeError(f"{name} ({path}) answered {status}")
            if i >= cfg.warmup:
                times.append(dt)
        times.sort()
        out[name] = {"p50_ms": round(statistics.median(times), 1),
                     "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1),
                     "max_ms": round(times[-1], 1), "n": len(times)}
    return out


def run_backend(backend: str, cfg: BenchConsoleConfig, work: Path, log: Any = print) -> dict[str, Any]:
    from stillhouse.guard.app import create_app
    from stillhouse.guard.config import GuardConfig, sha256_hex
    from stillhouse.guard.store import open_store
    from stillhouse.http.server import ServerThread

    cluster = None
    if backend == "sqlite":
        url = f"sqlite:///{work}/console-bench.db"
    else:
        base = cfg.pg_url
        if not base:
            from stillhouse.testing.pg import PgCluster

            cluster = PgCluster()
            cluster.start()
            base = cluster.url
        import psycopg

        name = f"console_bench_{int(time.time())}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = base.rsplit("/", 1)[0] + "/" + name
    try:
        log(f"{backend}: filling {url.split('@')[-1]}")
        store = open_store(url)
        timings = fill(store, cfg, log)
        size = store.fetch("SELECT pg_database_size(current_database())")[0][0] if backend != "sqlite" \
            else Path(url[len("sqlite:///"):]).stat().st_size
        pages = _pages(store)
        store.close()
        token = "bench-admin-token"
        gcfg = GuardConfig(upstream_url="http://127.0.0.1:9", admin_token_sha256=sha256_hex(token), db_url=url,
                           spool_dir=str(work / f"spool-{backend}"), key_refresh_s=0.0)
        app = create_app(gcfg, open_store(url))
        with ServerThread(app) as srv:
            log(f"{backend}: measuring {len(pages) + 2} pages x {cfg.requests_per_page}")
            result = measure(srv.url, pages, cfg, token)
        worst = max(v["p95_ms"] for v in result.values())
        return {"db_url": url.split("@")[-1], "db_bytes": int(size), **{k: round(v, 1) for k, v in timings.items()},
                "pages": result, "worst_p95_ms": worst, "meets_target": worst <= cfg.target_p95_ms}
    finally:
        if cluster is not None:
            cluster.close()


def run_bench(cfg: BenchConsoleConfig, log: Any = print) -> dict[str, Any]:
    import os
    import platform

    work = Path(tempfile.mkdtemp(prefix="bench-console-"))
    try:
        out: dict[str, Any] = {"config": asdict(cfg), "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                                 "load_start": os.getloadavg()[0]},
                               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "backends": {}}
        for backend in cfg.backends:
            out["backends"][backend] = run_backend(backend, cfg, work, log)
        out["machine"]["load_end"] = os.getloadavg()[0]
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_markdown(result: dict[str, Any]) -> str:
    backends = list(result["backends"])
    lines = ["| page | " + " | ".join(f"{b} p50 / p95 ms" for b in backends) + " |",
             "|---|" + "---|" * len(backends)]
    names = list(next(iter(result["backends"].values()))["pages"])
    for name in names:
        cells = []
        for b in backends:
            v = result["backends"][b]["pages"].get(name)
            cells.append(f"{v['p50_ms']} / {v['p95_ms']}" if v else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for b in backends:
        r = result["backends"][b]
        lines.append(f"\n{b}: worst p95 {r['worst_p95_ms']} ms (target {result['config']['target_p95_ms']:g}); "
                     f"fill {r['fill_traffic_s']} s, counter backfill {r['backfill_s']} s, "
                     f"database {r['db_bytes'] / 1e6:,.0f} MB")
    return "\n".join(lines)


def bench_console(
    records: int = typer.Option(1_000_000, "--records", help="Traffic records in the log."),
    accounts: int = typer.Option(10_000, "--accounts", help="Accounts (heavy-tailed share of the traffic)."),
    requests_per_page: int = typer.Option(40, "--requests-per-page", help="Measured requests per page."),
    backends: str = typer.Option("sqlite,postgresql", "--backends", help="Comma list: sqlite, postgresql."),
    pg_url: str = typer.Option("", "--pg-url", help="A running PostgreSQL (default: a throwaway cluster)."),
    out: Path = typer.Option(None, "--out", help="Write the results JSON here."),
) -> None:
    """Console page latency (p50/p95 per page) over a log of a million records, on SQLite and PostgreSQL."""
    try:
        cfg = BenchConsoleConfig(records=records, accounts=accounts, requests_per_page=requests_per_page,
                                 backends=tuple(b for b in backends.split(",") if b), pg_url=pg_url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = run_bench(cfg, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(format_markdown(result), err=True)
    text = json.dumps(result, indent=2)
    if out:
        from stillhouse.config import atomic_write_text

        atomic_write_text(out, text + "\n")
    typer.echo(text)
    if not all(r["meets_target"] for r in result["backends"].values()):
        raise typer.Exit(1)
