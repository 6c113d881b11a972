"""The streamed answer of ``stillhouse serve``: OpenAI chunks as server-sent events.

Plain ASGI: ``SSEStream`` is returned by the chat route and called with
``(scope, receive, send)``. It submits one completion per choice with a per-step callback,
relays each step as a ``chat.completion.chunk`` (``logprobs.content`` entries included when
asked), ends with a usage chunk (``stream_options.include_usage``) and ``data: [DONE]``, and
cancels its completions the moment ``receive`` reports ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from stillhouse.http.asgi import Receive, Scope, Send
from stillhouse.teacher.base import ChatResult, Completion
from stillhouse.serve.schema import (
    ChatRequest,
    chunk_json,
    error_json,
    new_completion_id,
    usage_json,
)

from stillhouse.watermark.keys import APPLIED_HEADER

if TYPE_CHECKING:
    from stillhouse.teacher.batcher import StepEvent
    from stillhouse.watermark.green import RowWatermark
    from stillhouse.serve.app import ChatServer

log = logging.getLogger(__name__)


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEStream:
    """A plain-ASGI streamed response: OpenAI chunks as server-sent events, then ``[DONE]``.

    It watches ``receive`` for ``http.disconnect`` and cancels its completions the moment
    the client goes away, so their batch slots free up at the next step.
    """

    def __init__(self, server: ChatServer, req: ChatRequest, prompt_ids: list[int] | None,
                 watermark: RowWatermark | None = None):
        self.server = server
        self.req = req
        self.prompt_ids = prompt_ids
        self.watermark = watermark

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        srv, req = self.server, self.req
        n = req.params.n
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        handles: list[Any] = []
        fallback: asyncio.Future[Any] | None = None
        gone = asyncio.ensure_future(wait_disconnect(receive))
        srv.pending += n
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                *([(APPLIED_HEADER.encode(), self.watermark.key_id.encode())] if self.watermark else [])]})
            cid, created, fp = new_completion_id(), int(time.time()), srv.teacher.revision[:32]

            async def emit(obj: Any) -> None:
                data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                            "more_body": True})

            if srv.local is not None:
                for i in range(n):
                    def on_event(ev: StepEvent, i: int = i) -> None:
                        loop.call_soon_threadsafe(events.put_nowait, (i, ev))
                    handles.append(srv.local.submit(self.prompt_ids or [], req.params, index=i, on_event=on_event,
                                                    row_processor=self.watermark))
            else:
                fallback = asyncio.ensure_future(srv.teacher.chat(req.messages, req.params))
                fallback.add_done_callback(lambda f: events.put_nowait((-1, f)))
            for i in range(n):
                await emit(chunk_json(cid, srv.model_id, created, i, {"role": "assistant", "content": ""},
                                      fingerprint=fp))
            finished: dict[int, Completion] = {}
            while len(finished) < n:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return  # client gone: finally cancels the completions
                i, item = getter.result()
                if i == -1:  # a non-local teacher answered all choices at once
                    result: ChatResult = item.result()
                    for j, c in enumerate(result.completions):
                        await self._send_completion(emit, cid, created, fp, j, c)
                        finished[j] = c
                    continue
                ev: StepEvent = item
                if ev.text or ev.token_ids:
                    lp = None
                    if req.params.logprobs:
                        lp = {"content": srv._entries(None, ev.token_ids, ev.logprobs, None, ev.top_ids,
                                                      ev.top_logprobs)}
                    await emit(chunk_json(cid, srv.model_id, created, i, {"content": ev.text}, lp,
                                          fingerprint=fp))
                if ev.finish_reason is not None and ev.completion is not None:
                    await emit(chunk_json(cid, srv.model_id, created, i, {}, None, ev.finish_reason,
                                          fingerprint=fp))
                    finished[i] = ev.completion
            if req.include_usage:
                done = list(finished.values())
                await emit({"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": srv.model_id, "system_fingerprint": fp, "choices": [],
                            "usage": usage_json(done[0].prompt_tokens if done else 0,
                                                sum(c.completion_tokens for c in done))})
            await emit("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            return  # the socket closed under us: same as a disconnect
        except Exception as exc:
            log.exception("stream failed")
            try:
                err = error_json(f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
                await send({"type": "http.response.body", "body": f"data: {json.dumps(err)}\n\n".encode(),
                            "more_body": False})
            except Exception:
                pass
        finally:
            for h in handles:
                h.cancel()
            if fallback is not None and not fallback.done():
                fallback.cancel()
            gone.cancel()
            srv.pending -= n

    async def _send_completion(self, emit: Callable[[Any], Awaitable[None]], cid: str, created: int,
                               fp: str, i: int, c: Completion) -> None:
        srv = self.server
        lp = None
        if self.req.params.logprobs:
            lp = srv._choice_logprobs(c) if c.logprobs is not None else {"content": []}
        await emit(chunk_json(cid, srv.model_id, created, i, {"content": c.text}, lp, fingerprint=fp))
        await emit(chunk_json(cid, srv.model_id, created, i, {}, None, c.finish_reason, fingerprint=fp))
