"""Real replies for the arena's sim upstream: a turn of a real conversation gets the reply it really got.

A :class:`ReplyBook` maps a request to the reply its source conversation holds. The key is
what the upstream can see in the request itself: the system prompt, the last user message
and the assistant message just before it (the reply the client received to its previous
turn, or nothing on a session's first turn). The system prompt is part of the key so that a
service sending a real opener under its own instructions ("respond with JSON only") is not
answered with the opener's chat reply. A chat client drops the oldest exchanges to fit its context
window, never the newest, so the key survives that; a turn whose previous turn was
refused (blocked, rate-limited) or answered with filler no longer matches and gets the
sim teacher's filler instead (:func:`stillhouse.arena.simteacher.answer`).

Token counts of a real reply: about 4/3 tokens per word (the ratio of English text
under common BPE vocabularies); a reply longer than ``max_tokens`` is cut to it, as a
model would stop.

Run: this module is a library; :mod:`.run` builds a book from the planned turns and
hands it to the sim upstream (:class:`~stillhouse.arena.simteacher.SimUpstream`) or the
direct gateway.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from stillhouse.arena.traffic import Turn

TOKENS_PER_WORD = 4 / 3


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def reply_key(user_text: str, previous_reply: str, system: str = "") -> bytes:
    """The book's key of a request whose last user message is ``user_text`` after ``previous_reply``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(system.encode("utf-8", "surrogatepass"))
    h.update(b"\x00\x1d\x00")
    h.update(previous_reply.encode("utf-8", "surrogatepass"))
    h.update(b"\x00\x1e\x00")
    h.update(user_text.encode("utf-8", "surrogatepass"))
    return h.digest()


def request_key(messages: list[dict[str, Any]]) -> bytes | None:
    """:func:`reply_key` of a chat request as the upstream receives it (None when it has no user message)."""
    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            prev = messages[i - 1] if i > 0 and messages[i - 1].get("role") == "assistant" else None
            return reply_key(_text(messages[i].get("content")), _text(prev.get("content")) if prev else "", system)
    return None


class ReplyBook:
    """Request -> the real reply (see the module docstring). Build with :func:`book_from_turns`."""

    def __init__(self) -> None:
        self._replies: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._replies)

    def add(self, user_text: str, previous_reply: str, reply: str, system: str = "") -> None:
        self._replies.setdefault(reply_key(user_text, previous_reply, system), reply)

    def lookup(self, messages: list[dict[str, Any]]) -> str | None:
        key = request_key(messages)
        return None if key is None else self._replies.get(key)

    def answer(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> tuple[list[str], int, int] | None:
        """(choice texts, prompt tokens, completion tokens) of the real reply, or None when the book has none."""
        reply = self.lookup(messages)
        if reply is None:
            return None
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages) + 3 * len(messages)
        cap = int(params.get("max_tokens") or params.get("max_completion_tokens") or 1 << 30)
        words = reply.split()
        tokens = max(1, round(len(words) * TOKENS_PER_WORD))
        if tokens > cap:
            reply = " ".join(words[: max(1, int(cap / TOKENS_PER_WORD))])
            tokens = cap
        n = max(1, int(params.get("n") or 1))
        return [reply] * n, prompt_tokens, tokens * n


def book_from_turns(turns: Iterable[Turn]) -> ReplyBook:
    """A book of every turn that carries a real reply, keyed as the sim client will send it.

    Turns are taken per session in time order; a turn after one without a real reply (filler)
    is left out, since the upstream cannot know the filler it will have been sent.
    """
    sessions: dict[str, list[Turn]] = defaultdict(list)
    for t in turns:
        sessions[t.session_id].append(t)
    book = ReplyBook()
    for session in sessions.values():
        session.sort(key=lambda t: t.ts)
        previous: str | None = ""
        for t in session:
            if t.reply is not None and previous is not None:
                book.add(t.user_text, previous if t.followup else "", t.reply, t.system)
            previous = t.reply
    return book
