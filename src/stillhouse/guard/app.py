"""The guard gateway: a plain ASGI reverse proxy in front of an OpenAI-compatible upstream.

``create_app(config, store, upstream=None, clock=time.time, detector=None)`` returns an ASGI
app (run it with uvicorn; ``stillhouse guard`` does). Per request, in this order:

1. authenticate the ``Authorization: Bearer sk-sh-...`` key (in memory; nothing reaches the
   upstream without a live key) → 401;
2. fail-closed: the log store is down → 503;
3. read the body with a size limit (Content-Length checked before reading) → 413; parse the
   JSON strictly (no NaN/Infinity, nesting depth bounded: ``http/asgi.py``) and check it → 400;
4. policy: block → 403; degrade → cap max_tokens, refuse logprobs / n>1 (403), strip
   reasoning from the answer, and the limits of throttle; throttle → tighter limits;
5. limits: requests/min, tokens/min, concurrent streams → 429 with Retry-After;
6. forward through the pooled upstream client (``Http1Upstream``, over ``http/client.py``, by
   default; aiohttp on request);
   SSE chunks go to the client as they arrive;
   a client disconnect closes the upstream connection; upstream down → 502, silent → 504;
7. log a TrafficRecord (redacted as configured) through the background writer, feed the
   detector (unredacted) and let the policy engine take its verdict. This runs after the
   response is sent: inline when no other request is in flight, else as a later loop callback
   (so answers already waiting go out first); step 4 drains what is queued. A detector in its
   own process (``ProcessDetector``, the CLI's default) gets the record through a pipe and its
   verdicts come back as loop callbacks. An inline detector runs when the request is alone;
   with others in flight its records queue and are observed in short slices between requests,
   so a verdict applies at most ``detect_max_lag`` requests late (``detect_max_lag=0``: strict,
   from the next decision).

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``.
The admin API (``guard/admin.py``) lives under ``/admin/`` behind its own token; the operator
console (``guard/console/``) under ``/console`` behind a login with that token; Prometheus
metrics (``guard/metrics.py``) at ``/metrics``; the OpenAPI schema is served at ``/openapi.json``; ``GET /health`` (no key) answers
``{"status": "ok", "store": "up"|"down", "upstream": URL}`` from memory, and ``/healthz``
(log writer counters, 503 when fail-closed with the store down) is for operators. ``clock`` only stamps records and drives
limits and decisions (the arena injects simulated time); latency is always wall time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stillhouse.guard.config import GuardConfig
from stillhouse.guard.degrade import SSEReasoningStripper, degrade_request, strip_reasoning
from stillhouse.guard.events import AccountInfo, Action, Detector, TrafficRecord
from stillhouse.guard.keys import KeyRing
from stillhouse.guard.limits import Limits, RateLimiter
from stillhouse.guard.metrics import GuardMetrics
from stillhouse.guard.policy import Effective, PolicyEngine
from stillhouse.guard.redact import Redactor
from stillhouse.guard.request import (
    BadRequest,
    check_request,
    estimate_tokens,
    header_fingerprint,
    prompt_text,
    public_url,
)
from stillhouse.guard.response import parse_json_response, parse_sse
from stillhouse.guard.spool import LogWriter, Spool
from stillhouse.guard.store import AccountLimits, DecisionRow, SqlStore
from stillhouse.guard.upstream import Http1Upstream, Upstream, UpstreamError
from stillhouse.http.asgi import ClientGone, Receive, RequestError, Scope, Send, loads_strict, read_body

log = logging.getLogger("stillhouse.guard")

PARAM_KEYS = ("max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "logprobs", "top_logprobs",
              "stream", "seed", "stop", "presence_penalty", "frequency_penalty", "response_format", "tools")
PROXIED = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")}
_JSON = [(b"content-type", b"application/json")]
WATCH_AFTER_S = 0.1
"""A client disconnect is watched for once an upstream call has run this long (see _forward)."""
DETECT_SLICE_S = 0.0005
"""Detector work queued behind requests runs in slices of about this long (at least one record)."""


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


async def send_json(send: Send, status: int, body: bytes | Any,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON, (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def make_upstream(config: GuardConfig) -> Any:
    """The upstream client ``config.upstream_client`` names (both have the ``Upstream`` API)."""
    api_key = os.environ.get(config.upstream_api_key_env, "") if config.upstream_api_key_env else ""
    cls: Any = Http1Upstream if config.upstream_client == "http1" else Upstream
    return cls(config.upstream_url, api_key=api_key, pool_size=config.upstream_pool_size,
               connect_timeout_s=config.upstream_connect_timeout_s, read_timeout_s=config.upstream_timeout_s)


class GuardApp:
    """The ASGI app. Build it with :func:`create_app`."""

    def __init__(self, config: GuardConfig, store: SqlStore, upstream: Any = None,
                 clock: Callable[[], float] = time.time, detector: Detector | None = None):
        self.config = config
        self.store = store
        self.clock = clock
        self.detector = detector
        self._remote: Any = detector if hasattr(detector, "submit") else None
        """A detector in its own process (ProcessDetector): fed by submit, verdicts by callback."""
        self.upstream = upstream or make_upstream(config)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="guard-store")
        self.keys = KeyRing(store)
        self.accounts: dict[str, tuple[AccountInfo, AccountLimits]] = {}
        self.writer = LogWriter(store, Spool(config.spool_dir), self.executor, config.log_flush_interval_s,
                                config.log_batch_size, config.store_retry_s, config.store_timeout_s)
        self.metrics = GuardMetrics(self)
        self.policy = PolicyEngine(config.rules, config.shadow, clock, persist=self._persist_decision)
        self.limiter = RateLimiter(clock)
        self.redactor = Redactor(config.redact, config.redact_patterns)
        self.default_limits = Limits(config.requests_per_min, config.tokens_per_min, config.max_concurrent_streams,
                                     config.requests_per_day)
        self._limits: dict[str, Limits] = {}
        self._started = False
        self._start_lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        self.upstream_calls = 0
        self._id_prefix = uuid.uuid4().hex[:14]
        """Request ids: a random per-process prefix plus a counter (unique across replicas, no syscall)."""
        self._seq = 0
        self._post: collections.deque[tuple[Any, ...]] = collections.deque()
        """Answered requests whose record is still to be parsed, charged, logged and observed."""
        self._post_scheduled = False
        self._inflight = 0
        self._detect_q: collections.deque[tuple[TrafficRecord, AccountInfo]] = collections.deque()
        """Answered requests waiting for the detector (see GuardConfig.detect_max_lag)."""
        self._detect_scheduled = False
        self._wm_secret = b""
        if config.watermark:
            from stillhouse.watermark.keys import load_secret

            self._wm_secret = load_secret(config.watermark_secret_env)  # a one-line error when missing
        from stillhouse.guard.admin import AdminAPI
        from stillhouse.guard.reload import DetectorReloader
        self.admin = AdminAPI(self)
        self.reloader = DetectorReloader(self)
        """Swaps in a promoted detector without a restart (``POST /admin/detector/reload``, the directory poll)."""
        self._console: Any = None
        """The operator console's ASGI app (guard/console/), built on its first request."""

    # -- lifecycle ----------------------------------------------------------------------
    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store call in the store's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _load(self) -> int:
        self.store.init()
        self.keys.load()
        self.accounts = {a.account_id: (a, lim) for a, lim in self.store.list_accounts()}
        self.policy.load(self.store.list_decisions())
        self._last_refresh = self.clock()  # the clock that stamps decision rows
        return self.writer.spool.replay(self.store)

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            replayed = await self.db(self._load)
            if replayed:
                log.warning("guard: replayed %d records left in the spool by an earlier run", replayed)
            await self.writer.start()
            await self.upstream.start()
            if self._remote is not None:
                await self._remote.start(self._take_verdicts)
            if self.config.key_refresh_s > 0:
                self._refresh_task = asyncio.create_task(self._refresh_loop(), name="guard-refresh")
            self.reloader.start()
            self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.reloader.stop()
        self._drain_post()
        self._drain_detect(None)
        if self._remote is not None:
            await self._remote.stop()  # its last verdicts become decisions before the log closes
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh_task
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.writer.close()
        await self.upstream.close()
        await self.db(self.store.close)
        if self._console is not None:
            self._console.close()

    def _refresh(self) -> None:
        since = self._last_refresh - 5.0  # overlap covers clock skew between replicas
        self._last_refresh = self.clock()
        changed = self.keys.refresh()
        for row in self.store.list_decisions(updated_since=since):
            self.policy.apply_row(row)
        if changed or any(r.account_id not in self.accounts for r in self.keys.rows()):
            self.accounts = {a.account_id: (a, lim) for a, lim in self.store.list_accounts()}
            self._limits.clear()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.key_refresh_s)
            if not self.writer.store_ok:
                continue
            try:
                await self.db(self._refresh)
            except Exception as exc:  # noqa: BLE001 - a failed refresh keeps the last known state
                log.warning("guard: key/decision refresh failed: %s", exc)

    # -- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        if not self._started:
            await self.start()
        method, path = scope["method"], scope["path"]
        if (method, path) in PROXIED:
            self._inflight += 1
            try:
                await self._proxy(scope, receive, send, method, path)
            finally:
                self._inflight -= 1
        elif path.startswith("/admin/"):
            await self.admin.handle(scope, receive, send)
        elif path == "/console" or path.startswith("/console/"):
            await self.console(scope, receive, send)
        elif path == "/metrics" and method == "GET":
            await self.serve_metrics(scope, send)
        elif path == "/health" and method == "GET":
            await send_json(send, 200, self.health())
        elif path == "/healthz" and method == "GET":
            ok = self.writer.store_ok
            await send_json(send, 200 if ok or self.config.on_store_failure == "open" else 503,
                            {"ok": ok, "store": "ok" if ok else "down", "mode": self.config.on_store_failure,
                             "log": self.writer.stats(),
                             **({"detector": self._remote.stats()} if self._remote is not None else {})})
        elif path == "/openapi.json" and method == "GET":
            from stillhouse.guard.openapi import openapi_schema
            await send_json(send, 200, openapi_schema())
        elif path in {p for _, p in PROXIED} or path in ("/health", "/healthz", "/openapi.json"):
            await send_json(send, 405, error_body(f"{method} is not allowed on {path}", "invalid_request_error",
                                                  "method_not_allowed"))
        else:
            await send_json(send, 404, error_body(f"unknown path {path}; the guard serves /v1/chat/completions, "
                                                  "/v1/completions, /v1/models, /admin/..., /console and /metrics",
                                                  "invalid_request_error", "not_found"))

    async def console(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/console/...``: the operator console (404 when ``config.console`` is off)."""
        if not self.config.console:
            await send_json(send, 404, error_body("the console is off (GuardConfig.console=false)",
                                                  "invalid_request_error", "not_found"))
            return
        if self._console is None:
            try:
                from stillhouse.guard.console.web import ConsoleApp
            except ImportError as exc:
                await send_json(send, 501, error_body(f"the console needs starlette and jinja2 ({exc}): "
                                                      "pip install 'stillhouse[guard]'", "server_error",
                                                      "console_unavailable"))
                return
            self._console = ConsoleApp(self)
        await self._console(scope, receive, send)

    async def serve_metrics(self, scope: Scope, send: Send) -> None:
        """``GET /metrics``: Prometheus exposition (see guard/metrics.py and GuardConfig.metrics_token_sha256)."""
        auth = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
        token = auth[7:].strip().decode("latin-1") if auth[:7].lower() == b"bearer " else ""
        if not self.config.check_metrics_token(token):
            await send_json(send, 401, error_body("metrics token missing or wrong: send 'Authorization: Bearer "
                                                  "<metrics token>'", "invalid_request_error", "invalid_metrics_token"))
            return
        try:
            body, ctype = self.metrics.exposition()
        except ImportError as exc:
            await send_json(send, 501, error_body(str(exc), "server_error", "metrics_unavailable"))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _persist_decision(self, row: DecisionRow) -> None:
        """The policy engine's decisions: counted for /metrics, then logged through the writer."""
        self.metrics.decision(row)
        self.writer.put_decision(row)

    def _note_verdict(self, v: Any) -> None:
        """Keep the detector's latest verdict on an account for the console (written with the log)."""
        if v is not None:
            self.writer.put_score(v.account_id, self.clock(), float(v.score), v.cluster_id or "", v.reasons)

    def health(self) -> dict[str, str]:
        """``GET /health``: liveness for load balancers and scripts; no key needed.

        Answered from memory: it never calls the upstream or the store (``store`` is the log
        writer's last known state), and the upstream URL loses any credentials, query or fragment."""
        return {"status": "ok", "store": "up" if self.writer.store_ok else "down",
                "upstream": public_url(self.config.upstream_url)}

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:  # noqa: BLE001 - report it to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.stop()
                self.executor.shutdown(wait=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- the proxy ----------------------------------------------------------------------
    def limits_for(self, account_id: str, action: Action) -> Limits:
        """The limits in force for an account under ``action``: its own (or the defaults); a throttled account's
        scaled by ``throttle_factor``; a degraded one's too (degrade is harsher than throttle), and at most
        ``degrade_requests_per_day`` requests a day."""
        key = account_id + "\0" + action
        lim = self._limits.get(key)
        if lim is None:
            over = self.accounts.get(account_id, (None, AccountLimits()))[1]
            d = self.default_limits
            lim = Limits(d.requests_per_min if over.requests_per_min is None else over.requests_per_min,
                         d.tokens_per_min if over.tokens_per_min is None else over.tokens_per_min,
                         d.max_concurrent_streams if over.max_concurrent_streams is None
                         else over.max_concurrent_streams,
                         d.requests_per_day if over.requests_per_day is None else over.requests_per_day)
            if action in ("throttle", "degrade"):
                lim = lim.scaled(self.config.throttle_factor)
            if action == "degrade":
                lim = lim.capped_per_day(self.config.degrade_requests_per_day)
            self._limits[key] = lim
        return lim

    def _finish(self, rec: TrafficRecord, account: AccountInfo | None) -> None:
        """Log the record and let the detector and policy see it (now, or queued: see detect_max_lag)."""
        self.writer.put(self.redactor.record(rec))
        self.metrics.record(rec)
        if self._remote is not None and account is not None:
            self._remote.submit(rec, account)
        elif self.detector is not None and account is not None:
            self.reloader.capture(rec, account)
            q = self._detect_q
            if not q and (self._inflight <= 1 or self.config.detect_max_lag == 0):
                self._observe(rec, account)
                return
            q.append((rec, account))
            if len(q) > self.config.detect_max_lag:  # the bound on the lag: catch up now
                self._drain_detect(None)
            elif not self._detect_scheduled:
                self._detect_scheduled = True
                self._schedule_slice()

    def _take_verdicts(self, verdicts: list[Any]) -> None:
        """Verdicts from the detector process, in the order their requests finished."""
        for v in verdicts:
            self.policy.take_verdict(v)
            self._note_verdict(v)

    def _observe(self, rec: TrafficRecord, account: AccountInfo) -> None:
        try:
            self.detector.observe(rec, account)  # type: ignore[union-attr]
            v = self.detector.verdict(rec.account_id)  # type: ignore[union-attr]
            self.policy.take_verdict(v)
            self._note_verdict(v)
        except Exception:
            log.exception("guard: detector failed on request %s", rec.request_id)

    def _schedule_slice(self) -> None:
        # Two hops: the slice goes behind the callbacks (new requests) queued meanwhile.
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, self._detect_slice)

    def _detect_slice(self) -> None:
        self._drain_detect(DETECT_SLICE_S)
        if self._detect_q:
            self._schedule_slice()
        else:
            self._detect_scheduled = False

    def _drain_detect(self, budget_s: float | None) -> None:
        """Observe queued records in order: all of them, or at least one and until ``budget_s`` is spent."""
        q = self._detect_q
        end = time.perf_counter() + budget_s if budget_s is not None else 0.0
        while q:
            self._observe(*q.popleft())
            if budget_s is not None and time.perf_counter() >= end:
                return

    async def _refuse(self, send: Send, rec: TrafficRecord, account: AccountInfo | None, status: int,
                      message: str, type_: str, code: str, param: str | None = None,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        rec.status = status
        if not rec.decision_reason:
            rec.decision_reason = f"{code}: {message}"
        await send_json(send, status, error_body(message, type_, code, param), headers)
        self._finish(rec, account)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, method: str, path: str) -> None:
        t0 = time.perf_counter()
        cfg = self.config
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        auth = ua = session = fwd = b""
        length = -1
        for k, v in headers:
            if k == b"authorization":
                auth = v
            elif k == b"user-agent":
                ua = v
            elif k == b"x-session-id":
                session = v
            elif k == b"content-length":
                length = int(v) if v.isdigit() else -1
            elif k == b"x-forwarded-for":
                fwd = v
        client = scope.get("client")
        ip = fwd.split(b",")[0].strip().decode("latin-1") if (fwd and cfg.trust_forwarded_for) \
            else (client[0] if client else "")
        self._seq += 1
        rec = TrafficRecord(f"{self._id_prefix}{self._seq:010x}", self.clock(), "", "", ip, ua.decode("latin-1")[:512],
                            header_fingerprint(headers), session_id=session.decode("latin-1")[:200])
        rec.params = {}

        # 1. auth: before anything else, nothing reaches the upstream without a live key.
        token = auth[7:].strip().decode("latin-1") if auth[:7].lower() == b"bearer " else ""
        entry = self.keys.authenticate(token) if token else None
        if entry is None:
            revoked = self.keys.identify_revoked(token) if token else None
            if revoked is not None:
                rec.account_id, rec.key_id = revoked.account_id, revoked.key_id
            msg = ("missing API key: send 'Authorization: Bearer sk-sh-...'" if not token
                   else "invalid or revoked API key")
            await self._refuse(send, rec, None, 401, msg, "invalid_request_error",
                               "missing_api_key" if not token else "invalid_api_key")
            # (the detector is not fed 401s: _finish skips records without an account object)
            return
        rec.account_id, rec.key_id = entry.account_id, entry.key_id
        acct = self.accounts.get(entry.account_id)
        account = acct[0] if acct else AccountInfo(entry.account_id)

        # 2. fail-closed when the log store is down.
        if cfg.on_store_failure == "closed" and not self.writer.store_ok:
            await self._refuse(send, rec, account, 503, "the traffic log is unavailable; the guard fails closed. "
                               "Retry shortly.", "server_error", "log_store_unavailable",
                               headers=[(b"retry-after", b"5")])
            return

        # 3. body.
        body: dict[str, Any] = {}
        raw = b""
        if method == "POST":
            try:
                raw = await read_body(receive, cfg.max_body_bytes, length if length >= 0 else None)
                body = loads_strict(raw)
                check_request(path, body)
            except ClientGone as exc:
                rec.status, rec.decision_reason = 499, str(exc)
                self._finish(rec, account)
                return
            except RequestError as exc:  # 413 too large; 400 not JSON, NaN/Infinity, too deep
                await self._refuse(send, rec, account, exc.status, exc.message, "invalid_request_error",
                                   exc.code, exc.param)
                return
            except BadRequest as exc:
                await self._refuse(send, rec, account, 400, str(exc), "invalid_request_error", exc.code, exc.param)
                return
            rec.model = body["model"]
            rec.params = {k: body[k] for k in PARAM_KEYS if k in body}
            rec.messages = body["messages"] if path == "/v1/chat/completions" else [
                {"role": "user", "content": body["prompt"] if isinstance(body["prompt"], str)
                 else json.dumps(body["prompt"])}]
        stream = bool(body.get("stream"))

        # 4. policy, after the requests already answered are parsed, charged and logged, and (strict
        # mode) observed by the detector.
        if self._post:
            self._drain_post()
        if self._detect_q and cfg.detect_max_lag == 0:
            self._drain_detect(None)
        eff: Effective = self.policy.decide(account)
        rec.decision, rec.decision_reason = eff.action, eff.reason
        if eff.action == "block":
            await self._refuse(send, rec, account, 403, "this account is blocked; contact support",
                               "permission_denied", "account_blocked")
            return
        degraded = eff.action == "degrade"
        if degraded and method == "POST":
            body2, refusal = degrade_request(body, cfg.degrade_max_tokens, cfg.degrade_refuse_logprobs,
                                             cfg.degrade_refuse_n)
            if refusal:
                await self._refuse(send, rec, account, 403, refusal, "permission_denied", "feature_unavailable")
                return
            raw = json.dumps(body2).encode()

        # 5. limits.
        limits = self.limits_for(account.account_id, eff.action)
        refusal_ = self.limiter.admit(account.account_id, limits, stream)
        if refusal_ is not None:
            await self._refuse(send, rec, account, 429, refusal_.message,
                               "tokens" if refusal_.which == "tokens_per_min" else "requests",
                               "rate_limit_exceeded",
                               headers=[(b"retry-after", str(refusal_.retry_after_s).encode())])
            return

        # 6. upstream, with the watermark key id of this account (or its cluster) when watermarking.
        extra = self._watermark_header(rec, account) if cfg.watermark else None
        answer: list[Any] = [b"", False]
        t_up = time.perf_counter()
        try:
            await self._forward(receive, send, rec, method, path, raw if method == "POST" else None,
                                stream, degraded and cfg.degrade_strip_reasoning, answer, extra)
        finally:
            if stream:
                self.limiter.release_stream(account.account_id)
            t_end = time.perf_counter()
            rec.latency_ms = (t_end - t0) * 1000.0
            self.metrics.latency(t_end - t0, t_end - t_up)
            item = (rec, account, limits, body, method, answer[0], answer[1])
            if self._inflight <= 1 and not self._post:
                self._after_response(*item)  # alone: nobody waits behind it
            else:
                # Others are in flight: the response is out, and parsing it, charging tokens, logging
                # and the detector run as a later loop callback, after the requests already waiting.
                # Every policy decision drains this queue first (step 4), so a verdict still applies
                # to every request decided after this one was answered, as if it ran inline.
                self._post.append(item)
                if not self._post_scheduled:
                    self._post_scheduled = True
                    asyncio.get_running_loop().call_soon(self._drain_post)

    def watermark_key_id(self, account_id: str, request_id: str = "") -> str:
        """The key id that answers this account's request now: its own, or its cluster's (``watermark_scope``),
        and with ``watermark_per_request`` that request's own key under it."""
        from stillhouse.watermark.keys import KeyId, epoch_of

        epoch = epoch_of(self.clock(), self.config.watermark_rotate_s)
        cluster = self.policy.cluster_of(account_id) if self.config.watermark_scope == "cluster" else None
        request = request_id if self.config.watermark_per_request else ""
        return str(KeyId("cluster", cluster, epoch, request) if cluster else
                   KeyId("account", account_id, epoch, request))

    def _watermark_header(self, rec: TrafficRecord, account: AccountInfo) -> list[tuple[str, str]]:
        from stillhouse.watermark.keys import HEADER, sign_header

        kid = self.watermark_key_id(account.account_id, rec.request_id)
        # wall time, not self.clock: the upstream checks freshness against its own clock
        return [(HEADER, sign_header(self._wm_secret, kid, rec.request_id, time.time()))]

    def _drain_post(self) -> None:
        """Finish every answered request still queued, in answer order."""
        self._post_scheduled = False
        q = self._post
        while q:
            self._after_response(*q.popleft())

    def _after_response(self, rec: TrafficRecord, account: AccountInfo, limits: Limits, body: dict[str, Any],
                        method: str, data: bytes, sse: bool) -> None:
        """Parse the relayed answer into the record, charge its tokens, log it (never skipped)."""
        try:
            if rec.status == 200 or data:
                text, pt, ct = parse_sse(data) if sse else parse_json_response(data)
                rec.response_text = text
                rec.prompt_tokens = int(pt) if isinstance(pt, int) else 0
                rec.completion_tokens = int(ct) if isinstance(ct, int) else estimate_tokens(text)
            if method == "POST" and not rec.prompt_tokens:
                rec.prompt_tokens = estimate_tokens(prompt_text(body))
            self.limiter.charge_tokens(account.account_id, limits, rec.prompt_tokens + rec.completion_tokens)
        except Exception:  # the record is logged whatever went wrong above
            log.exception("guard: post-processing failed on request %s", rec.request_id)
        self._finish(rec, account)

    async def _forward(self, receive: Receive, send: Send, rec: TrafficRecord, method: str, path: str,
                       raw: bytes | None, stream: bool, strip: bool, answer: list[Any],
                       extra: list[tuple[str, str]] | None = None) -> None:
        """Call the upstream and relay its answer, racing a client disconnect.

        ``answer`` receives [the upstream's body bytes as relayed, whether it was SSE]; ``extra`` are
        headers the guard adds (the watermark channel). Client headers are never forwarded."""
        collected: list[bytes] = []
        started = False
        sse = False
        finished = False

        async def relay() -> None:
            nonlocal started, sse, finished
            self.upstream_calls += 1
            resp = await (self.upstream.send(method, path, raw, extra_headers=extra) if extra
                          else self.upstream.send(method, path, raw))
            try:
                rec.status = resp.status
                if extra:
                    rec.watermark_key_id = getattr(resp, "watermark_key_id", "")
                    rec.watermark_scheme = getattr(resp, "watermark_scheme", "")
                if not stream or resp.status != 200:
                    data = await resp.read()
                    collected.append(data)
                    if strip and resp.status == 200:
                        with contextlib.suppress(Exception):  # an odd body passes through as it came
                            data = json.dumps(strip_reasoning(json.loads(data))).encode()
                    started = True
                    await send({"type": "http.response.start", "status": resp.status,
                                "headers": [(b"content-type", resp.content_type.encode("latin-1", "replace")),
                                            (b"content-length", str(len(data)).encode()),
                                            *resp.passthrough_headers]})
                    await send({"type": "http.response.body", "body": data})
                    finished = True
                    return
                started = sse = True
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", resp.content_type.encode("latin-1", "replace")),
                                        (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                                        *resp.passthrough_headers]})
                stripper = SSEReasoningStripper() if strip else None
                async for chunk in resp.chunks():
                    collected.append(chunk)
                    out = stripper.feed(chunk) if stripper else chunk
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                tail = stripper.flush() if stripper else b""
                await send({"type": "http.response.body", "body": tail, "more_body": False})
                finished = True
            except BaseException:
                resp.close()
                raise
            else:
                resp.release()

        # A watcher task: on a client disconnect it cancels this task, which closes the upstream
        # response (the upstream sees the connection drop and stops generating). It starts only
        # once the call has run WATCH_AFTER_S: most answers are done before that, and a task per
        # request is a measurable share of the guard's CPU.
        me = asyncio.current_task()
        gone = False
        watch_task: asyncio.Future[None] | None = None

        async def wait_disconnect() -> None:
            nonlocal gone
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    # uvicorn also answers http.disconnect once the response is complete: not a hang-up.
                    if not finished and me is not None:
                        gone = True
                        me.cancel()
                    return

        def start_watch() -> None:
            nonlocal watch_task
            if not finished:
                watch_task = asyncio.ensure_future(wait_disconnect())

        timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, start_watch)
        try:
            try:
                await relay()
            except asyncio.CancelledError:
                if not gone or me is None:
                    raise
                me.uncancel()
                rec.status = 499
                rec.decision_reason = (rec.decision_reason + "; " if rec.decision_reason else "") + \
                    "client disconnected; upstream call cancelled"
        except UpstreamError as exc:
            rec.status = exc.status
            rec.decision_reason = (rec.decision_reason + "; " if rec.decision_reason else "") + str(exc)
            if not started:
                await send_json(send, exc.status, error_body(str(exc), "upstream_error",
                                                             "upstream_timeout" if exc.status == 504
                                                             else "upstream_unavailable"))
            else:
                # Headers are already out: end the stream with an SSE error event the client can see.
                ev = b"data: " + error_body(str(exc), "upstream_error", "upstream_stream_broken") + b"\n\n"
                with contextlib.suppress(Exception):  # the client may be gone too
                    await send({"type": "http.response.body", "body": ev, "more_body": False})
        finally:
            timer.cancel()
            if watch_task is not None and not watch_task.done():
                watch_task.cancel()
            answer[0] = collected[0] if len(collected) == 1 else b"".join(collected)
            answer[1] = sse


def create_app(config: GuardConfig, store: SqlStore, upstream: Any = None,
               clock: Callable[[], float] = time.time, detector: Detector | None = None) -> GuardApp:
    """The guard as an ASGI app (lifespan starts the log writer and the upstream pool)."""
    return GuardApp(config, store, upstream, clock, detector)


__all__ = ["DecisionRow", "GuardApp", "create_app"]
