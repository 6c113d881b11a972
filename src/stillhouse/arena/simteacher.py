"""The arena's fast stand-in teacher: answers whose *length* behaves like a real model's.

Distillation signals such as output-token share depend on how long answers are, and
a real teacher writes long answers to "show your full reasoning" and short ones to
"reply with JSON only". :func:`answer` reproduces that, deterministically from the
request: a log-normal base length, times 4 when the prompt asks for reasoning, times
0.15 when it asks for a terse or JSON reply, capped by ``max_tokens``; ``n`` choices.
The text itself is filler (only its token count matters to the arena).

:func:`respond` answers a turn of a real conversation with the reply it really got (a
:class:`~stillhouse.arena.replies.ReplyBook`) and anything else as above.

:func:`start_sim_upstream` serves the same answers as an OpenAI-compatible HTTP
server on 127.0.0.1 (aiohttp, in a thread) for runs through the real guard.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

import numpy as np

_REASON = re.compile(r"step|reason|think|derivation|working|explain|thought", re.IGNORECASE)
_TERSE = re.compile(r"json|no prose|one sentence|just the number|concise|short", re.IGNORECASE)
_FILLER = ("so", "we", "get", "the", "value", "then", "check", "it", "and", "next")


def answer(messages: list[dict[str, Any]], params: dict[str, Any]) -> tuple[list[str], int, int]:
    """(choice texts, prompt tokens, completion tokens) for a chat request."""
    prompt = " ".join(str(m.get("content", "")) for m in messages)
    prompt_tokens = len(prompt.split()) + 3 * len(messages)
    seed = zlib.crc32(prompt.encode())
    rng = np.random.default_rng(seed)
    n = int(params.get("n") or 1)
    cap = int(params.get("max_tokens") or params.get("max_completion_tokens") or 2048)
    factor = 4.0 if _REASON.search(prompt) else 1.0
    if _TERSE.search(prompt):
        factor *= 0.15
    texts = []
    total = 0
    for _ in range(n):
        length = int(min(cap, max(3, rng.lognormal(np.log(120 * factor), 0.5))))
        total += length
        shown = min(length, 40)
        texts.append(" ".join(_FILLER[i % len(_FILLER)] for i in range(shown)))
    return texts, prompt_tokens, total


def completion_body(model: str, texts: list[str], prompt_tokens: int, completion_tokens: int) -> bytes:
    return json.dumps({
        "id": f"chatcmpl-sim-{zlib.crc32(''.join(texts).encode())}", "object": "chat.completion", "created": 0,
        "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                    for i, t in enumerate(texts)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }).encode()


def respond(messages: list[dict[str, Any]], params: dict[str, Any], book: Any = None) -> tuple[list[str], int, int]:
    """The real reply when ``book`` (a :class:`~stillhouse.arena.replies.ReplyBook`) has this turn, else :func:`answer`."""
    if book is not None:
        real = book.answer(messages, params)
        if real is not None:
            return real
    return answer(messages, params)


class SimUpstream:
    """A running sim teacher on loopback: ``.base_url`` and ``.stop()`` (a context manager too).

    ``book``: a :class:`~stillhouse.arena.replies.ReplyBook`; turns of real conversations get their real
    replies (:func:`respond`), everything else the length-aware filler.
    """

    def __init__(self, book: Any = None) -> None:
        import asyncio
        import socket
        import threading

        from aiohttp import web

        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            texts, pt, ct = respond(body.get("messages") or [], body, book)
            return web.Response(body=completion_body(str(body.get("model", "sim")), texts, pt, ct),
                                content_type="application/json")

        async def models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": "sim", "object": "model"}]})

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/v1/models", models)
        self._runner = web.AppRunner(app, access_log=None)

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            self.loop.run_until_complete(site.start())
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="sim-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("sim upstream did not start within 10 s")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        import asyncio

        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> SimUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_sim_upstream(book: Any = None) -> SimUpstream:
    return SimUpstream(book)
