"""Prometheus metrics of one guard replica, served at ``GET /metrics``.

The request path only adds to plain dicts and bucket lists (well under a microsecond per
request); ``prometheus-client`` is imported on the first scrape and turns them, plus the log
writer's, the detector's and the policy's state read at scrape time, into the exposition format.

Metrics (prefix ``stillhouse_guard_``):

=====================================  =========  =================================================
requests_total{status,tier}            counter    requests answered, by HTTP status and enforced tier
tokens_total{kind,status,tier}         counter    prompt / completion tokens of those requests
added_latency_seconds                  histogram  time the guard adds in front of the upstream call
upstream_latency_seconds               histogram  upstream call, answer relayed to the client included
log_lag_seconds                        gauge      how long the oldest unwritten log record may have waited
log_pending_records                    gauge      records and decisions waiting for the log writer
log_written_total / log_spooled_total  counter    records written to the store / spooled to disk
log_replayed_total                     counter    spooled records replayed into the store
spool_files / spool_records            gauge      what waits in the disk spool
store_up                               gauge      1 when the last log write succeeded
detector_queue_depth                   gauge      answered requests the detector has not scored yet
decisions_total{tier,source,shadow}    counter    decisions taken (detector, rule, manual, console)
active_decisions{tier,source}          gauge      manual and detector decisions in force
accounts / live_keys                   gauge      accounts and live API keys known to this replica
detector_reloads_total{result}         counter    detector reloads (ok, failed): guard/reload.py
detector_loaded_timestamp_seconds      gauge      when the scoring detector was loaded (wall clock)
detector_drift_psi                     gauge      the watch's last benign-score drift (PSI; see detect/drift.py)
detector_watch_alarm                   gauge      1 when the watch's last period raised an alarm (drift, FPR, no data)
detector_watch_last_run_timestamp      gauge      the time of the watch's last period (``..._seconds``)
=====================================  =========  =================================================

The ``detector_drift_psi`` and ``detector_watch_*`` gauges come from the status file ``stillhouse detect watch``
writes beside the model (``DETECTOR_DIR.watch.json``), read at scrape time; absent when there is none.

Tier is the action enforced on the request (allow, throttle, degrade, block); no metric carries
an account id, a key or any text. ``GuardConfig.metrics_token_sha256`` decides whether a scrape
needs a bearer token (see its docstring). The Grafana dashboard ``docs/grafana/stillhouse-guard.json``
uses these names.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stillhouse.guard.app import GuardApp
    from stillhouse.guard.events import TrafficRecord
    from stillhouse.guard.store import DecisionRow

PREFIX = "stillhouse_guard_"
ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
INSTALL = "pip install prometheus-client  (or pip install 'stillhouse[guard]')"


class Histogram:
    """Cumulative-on-export bucket counts; ``observe`` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs ending with +Inf, as the exposition format wants."""
        out, acc = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            acc += n
            out.append((bound, acc))
        return out


class GuardMetrics:
    """Counters the gateway feeds (``record``, ``latency``, ``decision``) and a scrape-time collector."""

    def __init__(self, app: GuardApp):
        self.app = app
        self.requests: Counter[tuple[str, str]] = Counter()
        self.tokens: Counter[tuple[str, str, str]] = Counter()
        self.decisions: Counter[tuple[str, str, str]] = Counter()
        self.added = Histogram(ADDED_BUCKETS)
        self.upstream = Histogram(UPSTREAM_BUCKETS)
        self._registry: Any = None

    # -- the request path -----------------------------------------------------------------
    def record(self, rec: TrafficRecord) -> None:
        """One finished request (answered or refused)."""
        key = (str(rec.status), rec.decision)
        self.requests[key] += 1
        if rec.prompt_tokens:
            self.tokens[("prompt", *key)] += rec.prompt_tokens
        if rec.completion_tokens:
            self.tokens[("completion", *key)] += rec.completion_tokens

    def latency(self, total_s: float, upstream_s: float) -> None:
        """A forwarded request: its whole time in the guard and the part spent on the upstream call."""
        self.upstream.observe(upstream_s)
        self.added.observe(max(total_s - upstream_s, 0.0))

    def decision(self, row: DecisionRow) -> None:
        """A decision taken (not its clearing)."""
        if row.cleared_at is None:
            self.decisions[(row.action, row.source, "true" if row.shadow else "false")] += 1

    # -- the scrape -----------------------------------------------------------------------
    def families(self) -> Iterator[Any]:
        """The metric families of one scrape (prometheus-client objects)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        app = self.app
        c = CounterMetricFamily(PREFIX + "requests", "Requests answered, by HTTP status and enforced tier.",
                                labels=("status", "tier"))
        for (status, tier), n in sorted(self.requests.items()):
            c.add_metric((status, tier), n)
        yield c
        c = CounterMetricFamily(PREFIX + "tokens", "Prompt and completion tokens, by HTTP status and enforced tier.",
                                labels=("kind", "status", "tier"))
        for labels, n in sorted(self.tokens.items()):
            c.add_metric(labels, n)
        yield c
        for name, hist, text in (("added_latency_seconds", self.added, "Time the guard adds before the upstream call."),
                                 ("upstream_latency_seconds", self.upstream,
                                  "Upstream call, with the answer relayed to the client.")):
            h = HistogramMetricFamily(PREFIX + name, text)
            h.add_metric((), hist.buckets(), hist.total)
            yield h
        w = app.writer
        yield GaugeMetricFamily(PREFIX + "log_lag_seconds", "How long the oldest unwritten log record may have "
                                "waited for the log writer.", value=w.lag_s())
        yield GaugeMetricFamily(PREFIX + "log_pending_records", "Records and decisions waiting for the log writer.",
                                value=w.pending)
        for name, value, text in (("log_written", w.written, "Traffic records written to the store."),
                                  ("log_spooled", w.spooled, "Traffic records spooled to disk (store down)."),
                                  ("log_replayed", w.replayed, "Spooled records replayed into the store.")):
            yield CounterMetricFamily(PREFIX + name, text, value=value)
        files = w.spool.files()
        yield GaugeMetricFamily(PREFIX + "spool_files", "Batch files waiting in the disk spool.", value=len(files))
        yield GaugeMetricFamily(PREFIX + "spool_records", "Traffic records waiting in the disk spool.",
                                value=w.spool.pending_records() if files else 0)
        yield GaugeMetricFamily(PREFIX + "store_up", "1 when the last write to the log store succeeded.",
                                value=1.0 if w.store_ok else 0.0)
        remote = app._remote
        depth = remote.stats()["backlog"] if remote is not None else len(app._detect_q)
        yield GaugeMetricFamily(PREFIX + "detector_queue_depth", "Answered requests the detector has not scored yet.",
                                value=depth)
        c = CounterMetricFamily(PREFIX + "decisions", "Decisions taken, by tier, source and shadow mode.",
                                labels=("tier", "source", "shadow"))
        for labels, n in sorted(self.decisions.items()):
            c.add_metric(labels, n)
        yield c
        active: Counter[tuple[str, str]] = Counter((r.action, r.source) for r in app.policy.active())
        g = GaugeMetricFamily(PREFIX + "active_decisions", "Manual and detector decisions in force.",
                              labels=("tier", "source"))
        for pair, n in sorted(active.items()):
            g.add_metric(pair, n)
        yield g
        yield from self._detector_families()
        yield GaugeMetricFamily(PREFIX + "accounts", "Accounts known to this replica.", value=len(app.accounts))
        yield GaugeMetricFamily(PREFIX + "live_keys", "Live API keys known to this replica.",
                                value=sum(1 for r in app.keys.rows() if r.revoked_at is None))

    def _detector_families(self) -> Iterator[Any]:
        """Reloads, the loaded model's age, and the watch's status file (when there is one)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        app = self.app
        rl = app.reloader
        c = CounterMetricFamily(PREFIX + "detector_reloads", "Detector reloads without a restart, by result.",
                                labels=("result",))
        for result in ("ok", "failed"):
            c.add_metric((result,), rl.results.get(result, 0))
        yield c
        if rl.loaded_at is not None:
            yield GaugeMetricFamily(PREFIX + "detector_loaded_timestamp_seconds", "When the scoring detector was "
                                    "loaded (unix seconds).", value=rl.loaded_at)
        if not app.config.detector_dir:
            return
        from stillhouse.guard.detect.watch import default_status_path, read_status

        status = read_status(default_status_path(app.config.detector_dir))
        if status is None:
            return
        psi = (status.get("drift") or {}).get("psi")
        if isinstance(psi, int | float):
            yield GaugeMetricFamily(PREFIX + "detector_drift_psi", "Benign max-score drift of the live model at the "
                                    "watch's last period (PSI; above 0.25 is a significant shift).", value=psi)
        yield GaugeMetricFamily(PREFIX + "detector_watch_alarm", "1 when the watch's last period raised an alarm.",
                                value=1.0 if status.get("alarm") else 0.0)
        if isinstance(status.get("ts"), int | float):
            yield GaugeMetricFamily(PREFIX + "detector_watch_last_run_timestamp_seconds", "Time of the watch's last "
                                    "period (unix seconds; simulated time for a simulated log).", value=status["ts"])

    def collect(self) -> Iterator[Any]:  # the prometheus-client Collector protocol
        yield from self.families()

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of one scrape. Raises ImportError (with the install command) without the library."""
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        except ImportError as exc:
            raise ImportError(f"/metrics needs prometheus-client: {INSTALL}") from exc
        if self._registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)
            self._registry = registry
        return generate_latest(self._registry), CONTENT_TYPE_LATEST
