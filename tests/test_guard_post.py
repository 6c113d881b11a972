"""After the answer: parsing, token charging, logging and the detector, deferred but bounded.

The guard finishes a request after its response is sent: inline when it is the only request
in flight, else as a later loop callback. Every policy decision drains that queue first.
The detector's work, with others in flight, queues and runs in slices between requests: a
verdict applies at most ``detect_max_lag`` requests late (0 = strict: from the next
decision). These tests drive the real app in-process over ASGI (like the arena) against a
real fake upstream.
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

from stillhouse.arena.simulate import asgi_post
from stillhouse.guard.app import create_app
from stillhouse.guard.store import open_store
from stillhouse.testing.fakeserver import FakeServerConfig
from stillhouse.testing.fakeserver import start_in_thread as start_fake
from test_guard import FlagEveryone, chat_body, make_config


class OrderedFlag(FlagEveryone):
    """FlagEveryone that also remembers the order in which it saw requests."""

    def __init__(self, after: int):
        super().__init__(after)
        self.order: list[str] = []

    def observe(self, record: Any, account: Any = None) -> None:
        self.order.append(record.request_id)
        super().observe(record, account)


async def call(app: Any, key: str, body: dict[str, Any]) -> tuple[int, bytes]:
    raw = json.dumps(body).encode()
    headers = [(b"authorization", b"Bearer " + key.encode()), (b"content-type", b"application/json"),
               (b"content-length", str(len(raw)).encode())]
    return await asgi_post(app, "/v1/chat/completions", raw, headers, client=("127.0.0.1", 5000))


def run_app(app: Any, scenario: Any) -> None:
    """Start the guard app, run ``scenario()`` against it, then stop it and its executor."""

    async def main() -> None:
        await app.start()
        try:
            await scenario()
        finally:
            await app.stop()
            app.executor.shutdown(wait=True)

    asyncio.run(main())


def test_strict_mode_observes_every_concurrent_answer_before_the_next_decision(tmp_path) -> None:
    with start_fake(FakeServerConfig(latency_ms=30)) as fake:
        det = OrderedFlag(after=4)
        cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}", detect_max_lag=0)
        app = create_app(cfg, open_store(cfg.db_url), detector=det)

        async def scenario() -> None:
            key = await app.db(_key, app, "ann")
            first = await asyncio.gather(*(call(app, key, chat_body(f"q{i}")) for i in range(6)))
            assert [s for s, _ in first] == [200] * 6  # all decided before any was answered
            # Nothing else is in flight now; whatever was queued must reach the detector before this decision.
            status, body = await call(app, key, chat_body("one more"))
            assert status == 403 and b"account_blocked" in body
            assert len(det.order) == 7  # the six answers, then the refusal itself

        run_app(app, scenario)
        recs = open_store(cfg.db_url).read_records("ann")
        assert len(recs) == 7 and sorted(r.status for r in recs) == [200] * 6 + [403]
        assert all(r.response_text and r.completion_tokens > 0 for r in recs if r.status == 200)


def test_a_queued_record_is_drained_before_the_policy_decides(tmp_path) -> None:
    """Force the deferred path: a record sits in the queue (as when others were in flight)."""
    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        det = OrderedFlag(after=1)
        cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}")
        app = create_app(cfg, open_store(cfg.db_url), detector=det)

        async def scenario() -> None:
            key = await app.db(_key, app, "bo")
            status, _ = await call(app, key, chat_body("first"))
            assert status == 200 and det.seen == {"bo": 1}
            det.seen.clear()
            det.order.clear()
            app.policy._detector.clear()
            app.policy._cache.clear()
            # Re-queue a finished record by hand, with no drain callback scheduled: only the
            # decision of the next request can drain it.
            from stillhouse.guard.events import TrafficRecord

            rec = TrafficRecord("queued-by-hand", 0.0, "bo", "k", status=200)
            app._post.append((rec, _info("bo"), app.limits_for("bo", "allow"), {}, "POST", b"", False))
            status, _ = await call(app, key, chat_body("second"))
            assert status == 403, "the queued record's verdict did not apply to the next decision"
            assert det.order[0] == rec.request_id and len(det.order) == 2  # queued first, then the refusal

        run_app(app, scenario)


def _info(account_id: str) -> Any:
    from stillhouse.guard.events import AccountInfo

    return AccountInfo(account_id)


def _key(app: Any, account_id: str) -> str:
    app.store.put_account(_info(account_id))
    return str(app.keys.issue(account_id, 0.0).key)


class MaxLen(collections.deque):  # type: ignore[type-arg]
    """A deque that remembers the longest it has been."""

    most = 0

    def append(self, x: Any) -> None:
        super().append(x)
        MaxLen.most = max(MaxLen.most, len(self))


def test_relaxed_mode_bounds_the_detector_lag_and_observes_everything_in_order(tmp_path) -> None:
    with start_fake(FakeServerConfig(latency_ms=20)) as fake:
        det = OrderedFlag(after=10**6)
        cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}", detect_max_lag=3)
        app = create_app(cfg, open_store(cfg.db_url), detector=det)
        app._detect_q = MaxLen()
        logged: list[str] = []
        put = app.writer.put

        def spy(rec: Any) -> None:
            logged.append(rec.request_id)
            put(rec)

        app.writer.put = spy  # type: ignore[method-assign]

        async def scenario() -> None:
            key = await app.db(_key, app, "cy")
            # Two more requests counted as in flight until the detector has seen all 12 (as slow
            # streams would be), so answers take the deferred path however the calls interleave
            # (a deferred record's own request has already left the in-flight count).
            app._inflight += 2
            try:
                out = await asyncio.gather(*(call(app, key, chat_body(f"q{i}")) for i in range(12)))
                assert [s for s, _ in out] == [200] * 12
                for _ in range(100):
                    if len(det.order) == 12:
                        break
                    await asyncio.sleep(0.01)
            finally:
                app._inflight -= 2

        run_app(app, scenario)
        assert MaxLen.most >= 1, "nothing was queued: the test did not exercise the deferred path"
        assert MaxLen.most <= 3 + 1, "the queue outgrew detect_max_lag"
        assert det.order == logged, "the detector must see records in the order they were logged"
