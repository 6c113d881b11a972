"""The failures of the HTTP client (:mod:`stillhouse.http.client`), below every caller's own tree.

Callers map them into theirs with ``raise ... from``: the OpenAI teacher into
:mod:`stillhouse.teacher.base`'s ``TeacherConnectionError`` / ``TeacherTimeout`` /
``TeacherResponseError``, the guard's upstream into 502 / 504::

    ClientError
    ├── ConnectFailed     refused, reset, no connection in time, or closed before any of the answer
    ├── TimedOut          the deadline passed, or too long a silence while reading
    └── BadResponse       not HTTP/1.x, a body cut off, an undecodable encoding (.raw: what came)
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of every HTTP client failure."""


class ConnectFailed(ClientError):
    """No usable connection, or the server closed it before answering."""


class TimedOut(ClientError):
    """No (complete) answer within the time allowed."""


class BadResponse(ClientError):
    """An answer that cannot be used; ``raw`` keeps what arrived."""

    def __init__(self, message: str, raw: str = ""):
        super().__init__(message)
        self.raw = raw
