"""Send the planned traffic, in simulated time, through a gateway; record what happened.

Two gateways share one interface (``async send(turn, messages, account) -> Reply``):

- :class:`GuardGateway` — the real ``stillhouse guard`` ASGI app (``create_app`` with the
  simulated clock and the detector injected), called in-process over ASGI, forwarding
  over real HTTP on loopback to the sim teacher (:mod:`.simteacher`) or any
  OpenAI-compatible teacher (``stillhouse serve``). Its policy engine does the enforcing.
- :class:`DirectGateway` — the same record the guard would log, fed straight to the
  detector, with ``block`` verdicts enforced; no HTTP. For unit tests and quick sweeps.

The simulator sends turns one at a time in time order, setting the clock to each
turn's timestamp first, so a week of traffic runs in minutes through the same code
paths as live traffic. A follow-up turn carries the session's earlier turns and the
answers actually received.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from stillhouse.arena.simteacher import respond
from stillhouse.arena.traffic import SimAccount, Turn
from stillhouse.guard.events import AccountInfo, TrafficRecord


class SimClock:
    """The simulated clock the gateway reads; the simulator moves it forward."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    status: int
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Gateway(Protocol):
    async def send(self, turn: Turn, messages: list[dict[str, Any]], account: AccountInfo) -> Reply: ...


def header_fingerprint(names: tuple[str, ...]) -> str:
    return hashlib.sha256(",".join(names).encode()).hexdigest()[:16] if names else ""


class DirectGateway:
    """The guard's logging and detector feed without HTTP; enforces ``block`` verdicts."""

    def __init__(self, detector: Any, clock: SimClock, keep_log: bool = False, book: Any = None):
        self.detector = detector
        self.book = book
        """A :class:`~stillhouse.arena.replies.ReplyBook` of real replies, or None (filler only)."""
        self.clock = clock
        self.blocked: set[str] = set()
        self.log: list[TrafficRecord] = []
        self.keep_log = keep_log
        self._n = 0

    async def send(self, turn: Turn, messages: list[dict[str, Any]], account: AccountInfo) -> Reply:
        if turn.account_id in self.blocked:
            return Reply(403)
        texts, pt, ct = respond(messages, turn.params, self.book)
        self._n += 1
        rec = TrafficRecord(request_id=f"r{self._n:08d}", ts=self.clock(), account_id=turn.account_id,
                            key_id=f"k-{turn.account_id}", client_ip=turn.client_ip, user_agent=turn.user_agent,
                            header_fingerprint=header_fingerprint(turn.header_names), model="sim",
                            params=dict(turn.params), messages=messages, response_text=texts[0],
                            prompt_tokens=pt, completion_tokens=ct, session_id=turn.session_id)
        if self.keep_log:
            self.log.append(rec)
        if self.detector is not None:
            self.detector.observe(rec, account)
            v = self.detector.verdict(turn.account_id)
            if v is not None and v.suggested == "block":
                self.blocked.add(turn.account_id)
        return Reply(200, texts[0], pt, ct)


class GuardGateway:
    """The real guard app, in-process over ASGI, forwarding over loopback HTTP to ``upstream_url``.

    Client IPs reach the guard as ``X-Forwarded-For`` (the arena plays a trusted front proxy);
    headers are sent in each simulated client's own order, so the guard's header fingerprint
    tells client stacks apart as it would live. Rate limits are the guard's defaults unless
    given; enforcement is the guard's policy engine acting on the detector's verdicts (``shadow``: recorded,
    not enforced, as an operator collects a calibration window).
    """

    def __init__(self, run_dir: str, upstream_url: str, detector: Any, clock: SimClock,
                 accounts: list[SimAccount], requests_per_min: int = 600, tokens_per_min: int = 2_000_000,
                 model: str = "sim", shadow: bool = False):
        import secrets
        from pathlib import Path

        from stillhouse.guard.app import create_app
        from stillhouse.guard.config import GuardConfig, sha256_hex
        from stillhouse.guard.store import open_store
        from stillhouse.http.loopback import require_loopback

        require_loopback(upstream_url, "GuardGateway upstream_url")  # campaign traffic stays on this machine
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.db_url = f"sqlite:///{Path(run_dir).resolve() / 'guard.db'}"
        self.store = open_store(self.db_url)
        self.config = GuardConfig(upstream_url=upstream_url, admin_token_sha256=sha256_hex(secrets.token_hex(16)),
                                  db_url=self.db_url, spool_dir=str(Path(run_dir) / "spool"), key_refresh_s=0.0,
                                  trust_forwarded_for=True, requests_per_min=requests_per_min,
                                  tokens_per_min=tokens_per_min, log_flush_interval_s=0.2, log_batch_size=2000,
                                  shadow=shadow)
        self.app = create_app(self.config, self.store, clock=clock, detector=detector)
        self.accounts = accounts
        self.model = model
        """The model name sent in each request (the upstream must serve it)."""
        self.keys: dict[str, str] = {}

    async def start(self) -> None:
        await self.app.start()
        now = time.time()

        def issue() -> None:
            for a in self.accounts:
                self.store.put_account(a.info)
            self.app.accounts = {i.account_id: (i, lim) for i, lim in self.store.list_accounts()}
            for a in self.accounts:
                self.keys[a.info.account_id] = self.app.keys.issue(a.info.account_id, now).key
        await self.app.db(issue)

    async def stop(self) -> None:
        await self.app.stop()
        self.app.executor.shutdown(wait=True)

    async def send(self, turn: Turn, messages: list[dict[str, Any]], account: AccountInfo) -> Reply:
        import json

        body = json.dumps({"model": self.model, "messages": messages, **turn.params}).encode()
        values = {"host": b"guard.local", "user-agent": turn.user_agent.encode(), "accept": b"application/json",
                  "accept-encoding": b"gzip, deflate", "connection": b"keep-alive",
                  "authorization": b"Bearer " + self.keys[turn.account_id].encode(),
                  "content-type": b"application/json", "content-length": str(len(body)).encode(),
                  "origin": b"https://app.example", "accept-language": b"en-US"}
        names = turn.header_names or ("host", "user-agent", "authorization", "content-type", "content-length")
        headers = [(n.encode(), values.get(n, b"x")) for n in names]
        headers += [(b"x-forwarded-for", turn.client_ip.encode()), (b"x-session-id", turn.session_id.encode())]
        status, raw = await asgi_post(self.app, "/v1/chat/completions", body, headers, client=("127.0.0.1", 40000))
        if status != 200:
            return Reply(status)
        data = json.loads(raw)
        usage = data.get("usage") or {}
        text = data["choices"][0]["message"]["content"] if data.get("choices") else ""
        return Reply(200, text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))


class RecordingGateway:
    """Wraps a gateway and keeps every (turn, reply) it passed, in sending order."""

    def __init__(self, inner: Gateway):
        self.inner = inner
        self.sent: list[tuple[Turn, Reply]] = []

    async def send(self, turn: Turn, messages: list[dict[str, Any]], account: AccountInfo) -> Reply:
        reply = await self.inner.send(turn, messages, account)
        self.sent.append((turn, reply))
        return reply


@dataclass
class AccountOutcome:
    sent: int = 0
    accepted: int = 0
    refused: int = 0
    leaked: int = 0
    """Accepted distillation requests (campaign accounts; cover traffic excluded)."""
    leaked_tokens: int = 0
    first_flag: int | None = None
    """Requests sent when the detector first flagged the account (own or cluster), or None."""
    first_flag_tokens: int | None = None
    first_block: int | None = None
    first_degrade: int | None = None
    """Requests sent when the detector first suggested ``degrade`` (a block score sent for review), or None."""
    first_refused: int | None = None
    first_flag_ts: float | None = None

    @property
    def degraded_only(self) -> bool:
        """Degraded for review and never blocked: a block score without the evidence a block needs."""
        return self.first_degrade is not None and self.first_block is None


@dataclass
class RunResult:
    accounts: dict[str, SimAccount]
    outcomes: dict[str, AccountOutcome]
    max_scores: dict[str, float]
    clusters: dict[str, str | None]
    leak_curve: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """campaign id -> [(ts, cumulative leaked)] sampled as the run goes."""
    send_ts: dict[str, list[float]] = field(default_factory=dict)
    """campaign id -> simulated time of each request it sent (sorted), for 'volume before detection'."""
    wall_s: float = 0.0
    requests: int = 0


def chat_context(earlier: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """The newest whole exchanges (user + assistant message pairs) of ``earlier`` whose text fits in
    ``budget`` characters: how a chat client fits a conversation into its model's context window."""
    used = 0
    start = len(earlier)
    while start >= 2:
        size = len(str(earlier[start - 2].get("content", ""))) + len(str(earlier[start - 1].get("content", "")))
        if used + size > budget:
            break
        used += size
        start -= 2
    return earlier[start:]


async def run_traffic(accounts: list[SimAccount], turns: list[Turn], gateway: Gateway, detector: Any,
                      clock: SimClock, progress: Any = None, label: str = "arena", concurrency: int = 1,
                      periodic: tuple[float, Callable[[], Awaitable[None]]] | None = None) -> RunResult:
    """Send every turn in time order through ``gateway``; track flags, blocks and leaks.

    ``concurrency`` > 1 sends up to that many consecutive turns of *different* accounts at once
    (the clock set to the bunch's latest timestamp), so a slow real teacher batches them; 1 (the
    default, and what online == offline checks use) sends strictly one at a time. ``periodic`` =
    ``(every_s, hook)``: the hook runs every ``every_s`` simulated seconds after the first turn, with the
    clock set to its time, before any later turn (the arena's operator working the review queue).
    """
    import asyncio

    if concurrency < 1:
        raise ValueError(f"run_traffic concurrency={concurrency}: must be >= 1")
    by_id = {a.info.account_id: a for a in accounts}
    order = sorted(range(len(turns)), key=lambda i: (turns[i].ts, turns[i].account_id, i))
    history: dict[str, list[dict[str, Any]]] = defaultdict(list)
    outcomes = {aid: AccountOutcome() for aid in by_id}
    leak_curve: dict[str, list[tuple[float, int]]] = defaultdict(list)
    leaked_by_campaign: dict[str, int] = defaultdict(int)
    send_ts: dict[str, list[float]] = defaultdict(list)

    def note_flags(aid: str) -> None:
        o = outcomes[aid]
        if o.first_flag is not None and o.first_block is not None and o.first_degrade is not None:
            return
        v = detector.verdict(aid) if detector is not None else None
        if v is None:
            return
        if v.flagged and o.first_flag is None:
            o.first_flag, o.first_flag_tokens, o.first_flag_ts = o.sent, o.leaked_tokens, clock()
        if v.suggested == "block" and o.first_block is None:
            o.first_block = o.sent
        if v.suggested == "degrade" and o.first_degrade is None:
            o.first_degrade = o.sent

    if detector is not None:
        previous = detector.on_refresh

        def on_refresh(det: Any) -> None:
            for aid in det.cluster_of_:
                if aid in outcomes:
                    note_flags(aid)
            if previous is not None:
                previous(det)
        detector.on_refresh = on_refresh

    task = progress.add_task(label, total=len(order)) if progress is not None else None
    t0 = time.perf_counter()
    def build(turn: Turn) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if turn.system:
            messages.append({"role": "system", "content": turn.system})
        if turn.followup:
            earlier = history[turn.session_id]
            messages.extend(earlier[-8:] if turn.context_chars is None else
                            chat_context(earlier, turn.context_chars - len(turn.user_text) - len(turn.system)))
        messages.append({"role": "user", "content": turn.user_text})
        return messages

    pos = 0
    next_hook = turns[order[0]].ts + periodic[0] if periodic is not None and order else float("inf")
    while pos < len(order):
        bunch = [order[pos]]
        seen = {turns[order[pos]].account_id}
        while len(bunch) < concurrency and pos + len(bunch) < len(order):
            nxt = order[pos + len(bunch)]
            if turns[nxt].account_id in seen:
                break
            seen.add(turns[nxt].account_id)
            bunch.append(nxt)
        due = max(turns[i].ts for i in bunch)
        while periodic is not None and next_hook <= due:
            clock.now = max(clock.now, next_hook)
            await periodic[1]()
            next_hook += periodic[0]
        clock.now = max(clock.now, due)
        if len(bunch) == 1:
            t = turns[bunch[0]]
            replies = [await gateway.send(t, build(t), by_id[t.account_id].info)]
        else:
            replies = list(await asyncio.gather(*(gateway.send(turns[i], build(turns[i]), by_id[turns[i].account_id].info)
                                                  for i in bunch)))
        for i, reply in zip(bunch, replies):
            turn = turns[i]
            acct = by_id[turn.account_id]
            o = outcomes[turn.account_id]
            o.sent += 1
            if acct.malicious:
                send_ts[acct.campaign or ""].append(clock())
            if reply.status == 200:
                o.accepted += 1
                history[turn.session_id].extend([{"role": "user", "content": turn.user_text},
                                                 {"role": "assistant", "content": reply.text}])
                if acct.malicious and not turn.cover:
                    o.leaked += 1
                    o.leaked_tokens += reply.completion_tokens
                    leaked_by_campaign[acct.campaign or ""] += 1
                    if leaked_by_campaign[acct.campaign or ""] % 10 == 1:
                        leak_curve[acct.campaign or ""].append((clock(), leaked_by_campaign[acct.campaign or ""]))
            else:
                o.refused += 1
                if o.first_refused is None:
                    o.first_refused = o.sent - 1
            note_flags(turn.account_id)
        before, pos = pos, pos + len(bunch)
        if task is not None and (before // 500 != pos // 500 or pos == len(order)):
            progress.update(task, completed=pos)
    for cid, n in leaked_by_campaign.items():
        leak_curve[cid].append((clock(), n))
    if detector is not None:
        detector.refresh_clusters()
    max_scores = dict(getattr(detector, "max_score_", {})) if detector is not None else {}
    clusters = {aid: (detector.cluster_of_.get(aid) if detector is not None else None) for aid in by_id}
    return RunResult(accounts=by_id, outcomes=outcomes, max_scores=max_scores, clusters=clusters,
                     leak_curve=dict(leak_curve), send_ts=dict(send_ts), wall_s=time.perf_counter() - t0, requests=len(order))


async def asgi_post(app: Any, path: str, body: bytes, headers: list[tuple[bytes, bytes]],
                    client: tuple[str, int] = ("127.0.0.1", 40000)) -> tuple[int, bytes]:
    """POST ``body`` to an ASGI ``app`` in-process; the status and the whole response body.

    The client stays connected until the response is complete (then disconnects), as a real one
    would, so the app's disconnect watch sees no hang-up while it answers.
    """
    import asyncio

    sent = False
    done = asyncio.Event()
    out: dict[str, Any] = {"status": 0, "body": b""}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "client": client, "server": ("127.0.0.1", 8080)}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")
            if not msg.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return out["status"], out["body"]
