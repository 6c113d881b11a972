"""The one Teacher protocol that both sides of the house talk to.

A teacher takes chat messages and sampling parameters and returns completions with,
where the backend can give them, per-token logprobs and top-k logprobs. It also scores a
given completion after a given prompt (:meth:`Teacher.score`: the log-probability of each of
its tokens and the top-k at each position, as vLLM's ``prompt_logprobs``), which on-policy
distillation uses to grade a student's own samples. Three
implementations live beside this file: ``local`` (in-process transformers model,
white-box), ``openai`` (any OpenAI-compatible HTTP endpoint) and ``fake``
(deterministic, for tests). ``spec.py`` turns a spec string into one of them.

Exception tree (every backend maps its own failures into it, with ``raise ... from``)::

    TeacherError
    ├── TeacherConnectionError      could not reach the server (retryable)
    ├── TeacherTimeout              no answer within the per-request timeout (retryable)
    ├── TeacherHTTPError            the server answered with an error status
    │   ├── RateLimited             429; carries retry_after seconds when the server sent it
    │   ├── ServerError             5xx; 503 may carry retry_after (retryable)
    │   └── BadRequest              other 4xx: our request is wrong (not retryable)
    └── TeacherResponseError        2xx with an unusable body (truncated JSON, no choices);
                                    carries the raw body so it can be stored
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Message = dict[str, Any]
"""An OpenAI chat message: ``{"role": "user", "content": "..."}``."""

FinishReason = Literal["stop", "length", "tool_calls", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Mirrors the OpenAI chat-completions fields of the same names."""

    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    max_tokens: int = 256
    """Upper bound on completion tokens."""
    n: int = 1
    """Completions per request."""
    seed: int | None = None
    """Makes sampling reproducible where the backend supports it."""
    stop: tuple[str, ...] = ()
    """Generation ends before any of these strings."""
    logprobs: bool = False
    """Return the logprob of each sampled token."""
    top_logprobs: int = 0
    """Also return the k most likely tokens at each position (0..20; needs logprobs)."""
    extra: str = ""
    """Further request fields, as the JSON text of an object whose fields are sent as they are: ``tools``,
    ``tool_choice``, ``response_format``, ``reasoning_effort``, a server's own fields... "" = none.
    A JSON string keeps the params hashable and the fields' order and bytes exact; :meth:`extra_fields`
    decodes it."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 2.0) or math.isnan(self.temperature):
            raise ValueError(f"temperature={self.temperature}: must be between 0 and 2 (0 = greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be at least 1")
        if self.n < 1:
            raise ValueError(f"n={self.n}: must be at least 1")
        if not (0 <= self.top_logprobs <= 20):
            raise ValueError(f"top_logprobs={self.top_logprobs}: must be between 0 and 20")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True: set both")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a tuple of strings, e.g. stop=('\\n',)")
        if self.extra:
            clash = sorted(set(self.extra_fields()) & _OWN_FIELDS)
            if clash:
                raise ValueError(f"extra sets {', '.join(clash)}, which are fields of their own here "
                                 "(or the request's): set them as such, not as extra request fields")

    def extra_fields(self) -> dict[str, Any]:
        """The further request fields (:attr:`extra`) decoded; {} when none."""
        if not self.extra:
            return {}
        try:
            fields = json.loads(self.extra)
        except ValueError as exc:
            raise ValueError(f"extra={self.extra[:80]!r}: not valid JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise ValueError(  # noqa: TRY004 - a bad value of a str field, as the other checks here
                f"extra must encode a JSON object of request fields, not {type(fields).__name__}")
        return fields

    def to_openai(self) -> dict[str, Any]:
        """The request fields for an OpenAI chat-completions body."""
        body: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "n": self.n,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        if self.logprobs:
            body["logprobs"] = True
            if self.top_logprobs:
                body["top_logprobs"] = self.top_logprobs
        if self.extra:
            body.update(self.extra_fields())
        return body


_OWN_FIELDS = frozenset({"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n",
                         "seed", "stop", "logprobs", "top_logprobs", "stream"})
"""Request fields that SamplingParams (or the request itself) sets; ``extra`` may not repeat them."""


@dataclass
class TokenLogprobs:
    """Per-token logprobs of one completion, position by position.

    ``token_ids``/``top_ids`` are None when the backend gave only token strings
    (an HTTP API); a local teacher always fills them.
    """

    tokens: list[str]
    logprobs: list[float]
    token_ids: list[int] | None = None
    top_tokens: list[list[str]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    top_ids: list[list[int]] | None = None


@dataclass
class Completion:
    """One completion of a chat request."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] | None = None
    logprobs: TokenLogprobs | None = None
    message: dict[str, Any] | None = None
    """The assistant message's fields besides ``role`` and ``content``, as the teacher sent them:
    ``reasoning_content`` or ``reasoning`` (a chain of thought), ``tool_calls``, ... (fields that were
    null or empty are left out); ``"content": None`` when the content itself was null (a tool call).
    None when the message had only role and content. See :mod:`stillhouse.teacher.message`."""

    @property
    def reasoning(self) -> str | None:
        """The chain of thought: a reasoning field, else a ``<think>`` block leading the text; None if none."""
        from stillhouse.teacher.message import reasoning_of

        return reasoning_of(self.text, self.message)

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        """The OpenAI ``tool_calls`` of the answer, or None."""
        return (self.message or {}).get("tool_calls") or None


@dataclass
class ChatResult:
    """The answer to one chat request: ``n`` completions plus provenance."""

    completions: list[Completion]
    model: str
    latency_s: float = 0.0
    raw: dict[str, Any] | None = None
    """The decoded response body, when it came over HTTP."""


@dataclass
class ScoreResult:
    """What a teacher thinks of a given completion after a given prompt (:meth:`Teacher.score`)."""

    logprobs: TokenLogprobs
    """One entry per completion token: its logprob under the teacher and, when asked, the top-k there."""
    prompt_tokens: int
    model: str
    latency_s: float = 0.0


Prompt = list[Message] | list[int]
"""Chat messages (the teacher applies its chat template and the assistant cue) or prompt token ids."""


@runtime_checkable
class Teacher(Protocol):
    """What every teacher implements."""

    @property
    def name(self) -> str:
        """The model name, as an OpenAI ``model`` field would carry it."""
        ...

    @property
    def revision(self) -> str:
        """Something that changes when the weights change (a file hash, a served revision)."""
        ...

    async def resolve(self) -> str:
        """Fix ``name`` and ``revision`` before the first call, and return the name.

        An HTTP teacher asks the server (``GET /v1/models``) and raises a TeacherError when it
        cannot; a local or fake teacher knows both already."""
        ...

    async def chat(self, messages: list[Message], params: SamplingParams) -> ChatResult:
        """Complete one conversation ``params.n`` times."""
        ...

    async def chat_json(self, messages_json: str, params: SamplingParams) -> ChatResult:
        """:meth:`chat` with the messages already JSON-encoded, as the harvester stores them.

        Same answer as ``chat(json.loads(messages_json), params)``; an HTTP teacher sends the
        bytes as they are instead of encoding the messages again."""
        ...

    async def score(self, prompt: Prompt, completion: list[int] | str, top_logprobs: int = 0) -> ScoreResult:
        """Log-probabilities of ``completion``'s tokens after ``prompt``, and the ``top_logprobs``
        (0..20) most likely tokens at each of those positions, at temperature 1, no sampling.

        ``completion`` as token ids scores exactly those tokens (the teacher's tokenizer); as text it is
        tokenized by the teacher. Raises ValueError (or BadRequest over HTTP) for an empty completion
        or one that does not fit the context."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads, memory."""
        ...


async def chat_all(teacher: Teacher, asks: list[tuple[list[Message], SamplingParams]],
                   concurrency: int) -> list[ChatResult]:
    """Every ``(messages, params)`` ask through ``teacher``, at most ``concurrency`` at a time, results in order:
    the teacher resolved first and closed after, however it ends. A TeacherError propagates for the caller to
    name the server it came from."""
    import asyncio

    sem = asyncio.Semaphore(concurrency)

    async def one(messages: list[Message], params: SamplingParams) -> ChatResult:
        async with sem:
            return await teacher.chat(messages, params)

    try:
        await teacher.resolve()
        return list(await asyncio.gather(*(one(m, p) for m, p in asks)))
    finally:
        await teacher.aclose()


class TeacherError(Exception):
    """Base of every teacher failure."""


class TeacherConnectionError(TeacherError):
    """The server could not be reached."""


class TeacherTimeout(TeacherError):
    """No answer within the per-request timeout."""


class TeacherHTTPError(TeacherError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str, body: str = "", retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body
        self.retry_after = retry_after


class RateLimited(TeacherHTTPError):
    """429 Too Many Requests."""


class ServerError(TeacherHTTPError):
    """5xx from the server."""


class BadRequest(TeacherHTTPError):
    """A 4xx other than 429: the request itself is wrong, retrying will not help."""


class TeacherResponseError(TeacherError):
    """A 2xx answer whose body cannot be used; ``raw`` keeps it for the store."""

    def __init__(self, message: str, raw: str):
        super().__init__(message)
        self.raw = raw


RETRYABLE = (TeacherConnectionError, TeacherTimeout, RateLimited, ServerError, TeacherResponseError)
"""Failures worth another attempt."""
