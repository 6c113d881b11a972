"""The guard's one frozen config, and a typed loader that fails loudly.

``GuardConfig`` holds everything the gateway needs: where the upstream and the
log store are, body and rate limits, degrade modes, the failure mode of the log
store, redaction, and the policy rules. It validates itself in ``__post_init__``
with errors that name the field and the fix.

Secrets never live in it: the admin token is kept as its SHA-256 (``admin_token_sha256``)
and the upstream's API key is read from the environment variable named by
``upstream_api_key_env``. So a saved config can be committed or attached to a report.

``load_guard_config(path)`` reads a JSON file and insists that *every* field is
present and of the right type (write a complete one with
``stillhouse guard --print-config``); ``config_from_dict`` in ``stillhouse.config``
is the lenient variant used for overrides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stillhouse.config import ConfigError, read_json_object
from stillhouse.guard.events import ACTIONS, Action

RedactMode = Literal["none", "patterns", "hash", "drop"]
StoreFailureMode = Literal["closed", "open"]
UpstreamClient = Literal["http1", "aiohttp"]
DetectMode = Literal["process", "inline"]
RuleField = Literal["country", "signup_path", "org", "payment_fingerprint", "score"]
WatermarkScope = Literal["account", "cluster"]


def sha256_hex(text: str) -> str:
    """Hex SHA-256 of a UTF-8 string (admin token, payment fingerprints)."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class PolicyRule:
    """One automatic rule: when ``field`` matches, take ``action``.

    Metadata rules (``country``, ``signup_path``, ``org``, ``payment_fingerprint``) match
    when the account's field equals ``equals``. Score rules (``field="score"``) match when
    the detector's verdict score is at least ``min_score``.
    """

    name: str
    field: RuleField
    action: Action
    equals: str = ""
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("PolicyRule.name: must not be empty (it explains the decision)")
        if self.field not in typing.get_args(RuleField):
            raise ValueError(f"PolicyRule {self.name!r}: field={self.field!r}; use one of {typing.get_args(RuleField)}")
        if self.action not in ACTIONS:
            raise ValueError(f"PolicyRule {self.name!r}: action={self.action!r}; use one of {ACTIONS}")
        if self.field != "score" and not self.equals:
            raise ValueError(f"PolicyRule {self.name!r}: a {self.field} rule needs equals='<value>'")


@dataclass(frozen=True)
class GuardConfig:
    """Configuration of one guard replica."""

    upstream_url: str
    """Base URL of the OpenAI-compatible upstream, e.g. http://127.0.0.1:8000 (paths /v1/... are appended)."""
    admin_token_sha256: str
    """SHA-256 hex of the admin token (``sha256_hex(token)``); the admin API compares against it."""
    db_url: str = "sqlite:///guard.db"
    """Traffic log, accounts, keys and decisions: ``sqlite:///path`` or ``postgresql://user@host:port/db``."""
    host: str = "127.0.0.1"
    """Address to bind. Keep 127.0.0.1 unless clients on other hosts must reach the guard."""
    port: int = 8080
    """Port to listen on."""
    upstream_api_key_env: str = ""
    """Name of an environment variable holding the upstream's API key ("" = send none)."""
    upstream_client: UpstreamClient = "http1"
    """How the guard talks to its upstream: "http1" (the lean keep-alive HTTP/1.1 pool of http/client.py, via
    guard/upstream.py; about 0.2 ms less CPU per request here) or "aiohttp" (aiohttp's ClientSession, for upstreams
    that need more than plain HTTP/1.1). ``stillhouse bench guard --compare-clients`` compares them."""
    upstream_pool_size: int = 512
    """Most open connections to the upstream."""
    upstream_connect_timeout_s: float = 3.0
    """No TCP connection within this → 502."""
    upstream_timeout_s: float = 120.0
    """No byte from the upstream for this long (first byte or between stream chunks) → 504."""
    max_body_bytes: int = 1_000_000
    """Request bodies larger than this get 413."""
    requests_per_min: int = 600
    """Default per-account request rate (0 = unlimited); accounts may override."""
    tokens_per_min: int = 1_000_000
    """Default per-account prompt+completion tokens per minute (0 = unlimited)."""
    max_concurrent_streams: int = 16
    """Default per-account open streaming responses (0 = unlimited)."""
    requests_per_day: int = 0
    """Default per-account requests per day, a bucket refilled continuously (0 = unlimited)."""
    throttle_factor: float = 0.1
    """A throttled account gets its limits multiplied by this."""
    degrade_max_tokens: int = 256
    """A degraded account's max_tokens is capped here."""
    degrade_requests_per_day: int = 50
    """A degraded account may send at most this many requests a day (0 = no daily cap). Degrade is where a
    block score waits for an analyst (``block_requires``), and a paced harvest meets no per-minute limit, so
    without this it is served whole until someone reviews it. 50 keeps 96.6% of benign account-days whole in the
    default arena's calibration traffic (dev; 95th percentile 35 requests, 97.5th 74)."""
    degrade_strip_reasoning: bool = True
    """Degraded responses lose reasoning fields and <think>...</think> blocks."""
    degrade_refuse_logprobs: bool = True
    """Degraded accounts asking for logprobs get 403."""
    degrade_refuse_n: bool = True
    """Degraded accounts asking for n>1 get 403."""
    shadow: bool = False
    """Shadow mode: automatic (rule/detector) decisions are recorded but not enforced."""
    rules: tuple[PolicyRule, ...] = ()
    """Automatic rules (see PolicyRule); the harshest matching one applies."""
    on_store_failure: StoreFailureMode = "closed"
    """Log store down: "closed" answers 503; "open" serves and spools the log to disk."""
    spool_dir: str = "guard-spool"
    """Where log batches that could not be written wait for replay (both modes)."""
    log_flush_interval_s: float = 0.05
    """How often the background writer flushes the traffic log."""
    log_batch_size: int = 1000
    """Most records per write."""
    store_retry_s: float = 0.5
    """How often a down store is probed before replaying the spool."""
    store_timeout_s: float = 5.0
    """A log write that takes longer counts as a store failure (a hung database is down, not slow)."""
    key_refresh_s: float = 2.0
    """How often keys/decisions changed by other replicas are re-read (0 = never; single replica)."""
    redact: RedactMode = "none"
    """Prompt/response text in the log: none | patterns (emails, phone, card-like numbers and
    redact_patterns become [REDACTED]) | hash (SHA-256 only) | drop (empty)."""
    redact_patterns: tuple[str, ...] = ()
    """Extra regular expressions redacted in "patterns" mode."""
    trust_forwarded_for: bool = False
    """Take the client IP from X-Forwarded-For (only behind a trusted proxy)."""
    detector_dir: str = ""
    """A fitted detector (``stillhouse detect --fit --log BENIGN_LOG --model DIR``) scoring every request
    online; its verdicts go to the policy engine ("" = none: manual decisions and rules only)."""
    detect_mode: DetectMode = "process"
    """Where the detector of ``detector_dir`` runs: "process" (a child process fed through a pipe;
    the guard's loop only pickles each finished record, see :mod:`stillhouse.guard.detect.remote`)
    or "inline" (in the guard's loop, paced by ``detect_max_lag``). A detector object handed to
    the app directly (tests, the arena) always runs inline."""
    detect_max_lag: int = 64
    """Inline mode: how many answered requests may wait for the detector while others are in flight. The
    detector then runs in slices of about ``DETECT_SLICE_S`` between requests instead of in
    front of them, and a verdict applies from the first decision after the detector reached
    the request that earned it (at most this many requests later). 0 = strict: every policy
    decision first feeds the detector every answered request (a verdict for request k
    applies from request k+1). A request alone in flight is always observed at once."""
    detector_reload_s: float = 0.0
    """Poll ``detector_dir`` this often (seconds) and reload the detector when it points to a new version
    (``stillhouse detect watch`` promotes one by swapping a symlink); 0 = reload only on ``POST
    /admin/detector/reload``. A reload replays the log's last ``window_s`` into the new model, so its verdicts
    continue those of an offline replay of the log."""
    console: bool = True
    """Serve the operator console at /console (a browser login with the admin token; see guard/console/)."""
    console_session_s: float = 900.0
    """Lifetime of a console login in seconds (the session cookie expires then; 60..86400)."""
    console_secure_cookie: bool = False
    """Mark the console's session cookie Secure (only sent over HTTPS): set it when a TLS proxy fronts the guard."""
    metrics_token_sha256: str = ""
    """GET /metrics: "" = open to anyone who can reach the port (the metrics hold counts only: no account id, key or
    text), like any Prometheus exporter kept on a private network; else the SHA-256 hex of a scrape token that
    must come as ``Authorization: Bearer <token>`` (Prometheus ``authorization: credentials_file``). A separate
    token, so the scraper never holds the admin token."""

    watermark: bool = False
    """Choose a watermark key per request and send its id to the upstream on the authenticated
    X-Stillhouse-Watermark header (the upstream: ``stillhouse serve --watermark`` with the same secret);
    the log records which key id answered each request. Never the key itself."""
    watermark_secret_env: str = "STILLHOUSE_WATERMARK_SECRET"
    """Environment variable holding the secret shared with the upstream (keys and the header's mac derive from it)."""
    watermark_scope: WatermarkScope = "account"
    """Whose key answers a request: "account" (one key per account) or "cluster" (the detector's cluster of
    linked accounts once it has one, else the account's own key)."""
    watermark_per_request: bool = False
    """A key of its own for every request, derived from its account's (or cluster's) key id and the request id
    (key id ``account/ID/EPOCH/REQUEST``, logged; attribution still names the account). Makes the counterfactual
    test exact (``provenance model --test counterfactual``: each answer's rank among answers other keys would have
    drawn is then independent of every other's). No single key then covers an account's answers, so ``provenance
    text --log`` scores each text under the key of the request it answers and pools per account, and ``provenance
    model``'s tuple tests need the log as source with ``--match-keys`` and the accounts as ``--group``s. Turn it on
    to prove what a student learned from a small share of answers: in docs/results.md a student whose data held 5%
    of an account's answers is named at p < 1e-5 and one with 1% at p < 1e-3 (every draw, open weights), where one
    key per account reaches 1e-5 at 5% in two draws of five and misses 1%. The cost: a text is tested only with the
    guard's log and its own prompt or answer text, so text that reached the world without either is not tested."""
    watermark_rotate_s: float = 2_592_000.0
    """Keys rotate every this many seconds of the guard's clock (key id epoch = floor(t / this)); 0 = never."""

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.upstream_url):
            raise ValueError(f"upstream_url={self.upstream_url!r}: give a base URL like http://127.0.0.1:8000")
        if not re.fullmatch(r"[0-9a-f]{64}", self.admin_token_sha256):
            raise ValueError("admin_token_sha256: must be 64 lowercase hex chars; "
                             "compute it with stillhouse.guard.config.sha256_hex(token)")
        if not (self.db_url.startswith("sqlite:///") or self.db_url.startswith(("postgresql://", "postgres://"))):
            raise ValueError(f"db_url={self.db_url!r}: use sqlite:///path/to/guard.db or postgresql://user@host:port/db")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port}: must be 0..65535")
        for name in ("upstream_pool_size", "max_body_bytes", "log_batch_size", "degrade_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        for name in ("requests_per_min", "tokens_per_min", "max_concurrent_streams", "requests_per_day",
                     "degrade_requests_per_day"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 (0 = unlimited)")
        for name in ("upstream_connect_timeout_s", "upstream_timeout_s", "log_flush_interval_s", "store_retry_s",
                     "store_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0 seconds")
        if self.detect_mode not in ("process", "inline"):
            raise ValueError(f"detect_mode={self.detect_mode!r}: use process or inline")
        if self.detector_reload_s < 0:
            raise ValueError(f"detector_reload_s={self.detector_reload_s}: must be >= 0 (0 = only on "
                             "POST /admin/detector/reload)")
        if self.detect_max_lag < 0:
            raise ValueError(f"detect_max_lag={self.detect_max_lag}: must be >= 0 (0 = strict)")
        if not 60 <= self.console_session_s <= 86400:
            raise ValueError(f"console_session_s={self.console_session_s}: must be 60..86400 seconds")
        if self.metrics_token_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.metrics_token_sha256):
            raise ValueError("metrics_token_sha256: must be '' (open /metrics) or 64 lowercase hex chars; "
                             "compute it with stillhouse.guard.config.sha256_hex(token)")
        if self.watermark_scope not in typing.get_args(WatermarkScope):
            raise ValueError(f"watermark_scope={self.watermark_scope!r}: use one of {typing.get_args(WatermarkScope)}")
        if self.watermark_rotate_s < 0:
            raise ValueError(f"watermark_rotate_s={self.watermark_rotate_s}: must be >= 0 (0 = keys never rotate)")
        if self.watermark_per_request and not self.watermark:
            raise ValueError("watermark_per_request: keys per request are watermark keys; add --watermark (and serve "
                             "the upstream with --watermark under the same secret) or drop --watermark-per-request")
        if self.watermark and not self.watermark_secret_env:
            raise ValueError("watermark_secret_env is empty: name the environment variable holding the shared secret")
        if self.key_refresh_s < 0:
            raise ValueError(f"key_refresh_s={self.key_refresh_s}: must be >= 0 (0 = never)")
        if not 0 < self.throttle_factor <= 1:
            raise ValueError(f"throttle_factor={self.throttle_factor}: must be in (0, 1]")
        if self.on_store_failure not in ("closed", "open"):
            raise ValueError(f"on_store_failure={self.on_store_failure!r}: use 'closed' (503) or 'open' (spool)")
        if self.upstream_client not in typing.get_args(UpstreamClient):
            raise ValueError(f"upstream_client={self.upstream_client!r}: use one of {typing.get_args(UpstreamClient)}")
        if self.redact not in typing.get_args(RedactMode):
            raise ValueError(f"redact={self.redact!r}: use one of {typing.get_args(RedactMode)}")
        for pattern in self.redact_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact_patterns: {pattern!r} is not a valid regex: {exc}") from exc
        rules = tuple(PolicyRule(**r) if isinstance(r, dict) else r for r in self.rules)
        if not all(isinstance(r, PolicyRule) for r in rules):
            raise ValueError("rules: each rule must be a PolicyRule or a dict of its fields")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "upstream_url", self.upstream_url.rstrip("/"))

    def check_admin_token(self, token: str) -> bool:
        """Constant-time comparison of a presented admin token with the stored hash."""
        import hmac

        return hmac.compare_digest(sha256_hex(token), self.admin_token_sha256)

    def check_metrics_token(self, token: str) -> bool:
        """Whether a scrape may read /metrics (always, when no metrics token is configured)."""
        import hmac

        return not self.metrics_token_sha256 or hmac.compare_digest(sha256_hex(token), self.metrics_token_sha256)


def _check_type(name: str, value: Any, hint: Any, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{source}: {name}={value!r}; use one of {typing.get_args(hint)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {name} must be a list, got {type(value).__name__}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {name} must be a string, got {value!r}")
        return value
    return value


def guard_config_from_dict(data: dict[str, Any], source: str = "guard config",
                           require_all: bool = True) -> GuardConfig:
    """Build a GuardConfig, type-checking every field; with ``require_all`` every field must be present."""
    data = {k: v for k, v in data.items() if k != "__config__"}
    hints = typing.get_type_hints(GuardConfig)
    names = [f.name for f in dataclasses.fields(GuardConfig)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known: {names}")
    missing = [n for n in names if n not in data]
    if require_all and missing:
        raise ConfigError(f"{source}: missing field(s) {missing}; write a complete file with "
                          "`stillhouse guard --print-config > guard.json` and edit it")
    kwargs = {n: _check_type(n, data[n], hints[n], source) for n in names if n in data}
    try:
        return GuardConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_guard_config(path: str | Path) -> GuardConfig:
    """Read a complete guard config from JSON; fails loudly on a missing, unknown or mistyped key."""
    data = read_json_object(path, what="guard config")
    return guard_config_from_dict(data, source=str(path), require_all=True)

