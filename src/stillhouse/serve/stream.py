"""The streamed answer of ``stillhouse serve``: OpenAI chunks as server-sent events.

Plain ASGI: ``SSEStream`` is returned by the chat route and called with
``(scope, receive, send)``. It submits one completion per choice with a per-step callback,
relays each step as a ``chat.completion.chunk`` (``logprobs.content`` entries included when
asked), ends with a usage chunk (``stream_options.include_usage``) and ``data: [DONE]``, and
cancels its completions the moment ``receive`` reports ``http.disconnect``.

A ``<think>`` block is streamed as reasoning deltas (``{"reasoning_content": ...}``) and the rest as
content deltas, split as the text arrives (:class:`~stillhouse.teacher.message.ThinkSplitter`; a piece
that may still be a tag waits for the next step, its logprobs with it). With tools whose calls the
server reads out of the text, the content is held until the completion ends, then sent as content and
``tool_calls`` deltas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from stillhouse.http.asgi import Receive, Scope, Send
from stillhouse.serve.schema import (
    ChatRequest,
    chunk_json,
    error_json,
    new_completion_id,
    usage_json,
)
from stillhouse.teacher.base import ChatResult, Completion
from stillhouse.teacher.message import ThinkSplitter, field_reasoning, parse_tool_calls

if TYPE_CHECKING:
    from stillhouse.serve.app import ChatServer
    from stillhouse.teacher.batcher import StepEvent
    from stillhouse.watermark.green import RowWatermark

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
                *[(k.encode(), v.encode()) for k, v in (self.watermark.applied_headers() if self.watermark else [])]]})
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
            field = srv.config.reasoning_field
            split = srv.config.reasoning_parser == "think"
            splitters = [ThinkSplitter(srv.reasoning_opened()) for _ in range(n)]
            hold = srv.parses_tools(req)
            held = [""] * n  # content held back to read tool calls out of it
            lps: list[list[Any]] = [[] for _ in range(n)]  # logprob entries not sent yet

            async def send_text(i: int, thought: str, answer: str, keep: bool = hold) -> None:
                if keep:  # content held back to read tool calls out of it at the end
                    held[i] += answer
                    answer = ""
                for key, piece in ((field, thought), ("content", answer)):
                    if piece:
                        lp = {"content": lps[i]} if req.params.logprobs else None
                        lps[i] = []
                        await emit(chunk_json(cid, srv.model_id, created, i, {key: piece}, lp, fingerprint=fp))

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
                    if req.params.logprobs:
                        lps[i].extend(srv._entries(None, ev.token_ids, ev.logprobs, None, ev.top_ids,
                                                   ev.top_logprobs))
                    if split:
                        await send_text(i, *splitters[i].feed(ev.text))
                    else:
                        await send_text(i, "", ev.text)
                if ev.finish_reason is not None and ev.completion is not None:
                    if split:
                        await send_text(i, *splitters[i].flush())
                    finish: str = ev.finish_reason
                    if hold:
                        content, calls = parse_tool_calls(held[i])
                        held[i] = ""
                        await send_text(i, "", content, keep=False)
                        if calls:
                            await emit(chunk_json(cid, srv.model_id, created, i, {"tool_calls": [
                                {"index": k, **c} for k, c in enumerate(calls)]}, fingerprint=fp))
                            finish = "tool_calls" if finish == "stop" else finish
                    if lps[i]:  # entries of text that never became a delta of its own
                        await emit(chunk_json(cid, srv.model_id, created, i, {"content": ""},
                                              {"content": lps[i]}, fingerprint=fp))
                        lps[i] = []
                    await emit(chunk_json(cid, srv.model_id, created, i, {}, None, finish, fingerprint=fp))
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
        c = srv.shape(c, self.req)
        lp = None
        if self.req.params.logprobs:
            lp = srv._choice_logprobs(c) if c.logprobs is not None else {"content": []}
        found = field_reasoning(c.message)
        if found is not None:
            await emit(chunk_json(cid, srv.model_id, created, i, {found[0]: found[1]}, fingerprint=fp))
        await emit(chunk_json(cid, srv.model_id, created, i, {"content": c.text}, lp, fingerprint=fp))
        calls = c.tool_calls
        if calls:
            await emit(chunk_json(cid, srv.model_id, created, i, {"tool_calls": [
                {"index": k, **call} for k, call in enumerate(calls)]}, fingerprint=fp))
        await emit(chunk_json(cid, srv.model_id, created, i, {}, None, c.finish_reason, fingerprint=fp))
