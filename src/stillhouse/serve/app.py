"""``stillhouse serve``: an OpenAI-compatible HTTP server over a teacher.

Endpoints (plain ASGI on starlette, run by uvicorn):

    POST /v1/chat/completions   stream (SSE), n, temperature, top_p, max_tokens, seed, stop,
                                logprobs, top_logprobs, stream_options.include_usage, tools,
                                tool_choice (auto, none)
    POST /v1/score              log-probabilities of a given completion after a given prompt, with the
                                top-k at each position (vLLM's prompt_logprobs, for one completion):
                                {"messages" | "prompt_token_ids", "completion" | "completion_token_ids",
                                 "top_logprobs": 0..20} -> {"logprobs": {"content": [{token, id, logprob,
                                 bytes, top_logprobs: [{token, id, logprob, bytes}]}]}, "usage"}.
                                What black-box on-policy distillation asks (stillhouse.distill.onpolicy)
    GET  /v1/models             the one model served (its name and the spec string both work)
    GET  /health                {"status": "ok", ...} plus batching counters

A local teacher (``bundled``, ``hf:DIR``, ``gguf:FILE``) decodes concurrent requests in
shared forward passes (continuous batching, see ``batcher.py``): a request that arrives
while others run joins the batch at the next step, and a client that disconnects, streamed
or not, frees its slot at the next step. Other teachers (``fake``, ``http://...``) are
served through their ``chat()``; a stream then carries the whole text in one chunk.

Errors are OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}``:
400 malformed JSON, NaN/Infinity, nesting deeper than 64 levels, a field of the wrong type or
range, ``max_tokens`` over the server's limit, prompt plus ``max_tokens`` over the context
limit (each message names the limit); 413 a body over ``max_body_bytes`` (Content-Length is
checked before reading, a chunked body while reading); 404 unknown model or path; 503 with
Retry-After when ``max_pending`` completions are already queued; 500 when generation itself fails.

Reasoning and tools. A completion that opens with a ``<think>...</think>`` block (or continues one
the chat template's generation prompt opened) is answered with the block's text in
``reasoning_content`` (``reasoning_field``) and the rest as ``content``, streamed as reasoning deltas
then content deltas (``reasoning_parser=off`` returns the text as written). ``tools`` are rendered
into the prompt by the model's chat template when it takes them (``apply_chat_template(tools=...)``);
a template without tool support (SmolLM2's) gets a 400 saying so. Where the template defines a call
format (Hermes ``<tool_call>{...}</tool_call>``) the calls the model writes come back as OpenAI
``tool_calls`` with finish_reason ``tool_calls``; a streamed answer with tools sends its content and
calls once the completion ends. ``tool_choice`` required or naming a function would need constrained
decoding, which this server does not do: a local model gets a 400 for them. Non-local teachers
(``fake``, ``http://``) get ``tools`` and ``tool_choice`` passed on and answer for themselves.

Large prompts never stall the event loop: a prompt with more characters than the context
could hold even at the longest token is refused without tokenizing it, and one longer than
a few thousand characters is tokenized in a worker thread.

Run::

    stillhouse serve --teacher bundled --host 127.0.0.1 --port 8000
    curl -s localhost:8000/v1/chat/completions -d '{"model": "bundled",
         "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}'

In code (tests, benchmarks): ``with ServerThread(create_app(teacher, cfg)) as srv: srv.base_url``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from stillhouse.http.asgi import RequestError, content_length, loads_strict, read_body
from stillhouse.http.server import ServerThread, bind_socket
from stillhouse.serve.schema import (
    APIError,
    ChatRequest,
    completion_json,
    error_json,
    logprob_entries,
    new_completion_id,
    parse_chat_request,
)
from stillhouse.serve.stream import SSEStream, wait_disconnect
from stillhouse.teacher.base import ChatResult, Completion, Teacher
from stillhouse.teacher.message import field_reasoning, parse_tool_calls, split_think
from stillhouse.teacher.template import TemplateTraits, render_ids, traits
from stillhouse.watermark.green import DEFAULT_PARAMS, RowWatermark, WatermarkParams

__all__ = ["ChatServer", "ServeConfig", "ServerThread", "create_app", "load_teacher", "run"]

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request

    from stillhouse.teacher.local import LocalTeacher

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ServeConfig:
    """Everything ``stillhouse serve`` needs; saved as JSON with ``--save-config``."""

    teacher: str = "bundled"
    """Teacher spec: bundled, hf:DIR, gguf:FILE, http://HOST:PORT/v1[#MODEL] or fake."""
    host: str = "127.0.0.1"
    """Interface to bind. Keep 127.0.0.1 unless a gateway on another host must reach it."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed at start)."""
    max_batch: int = 32
    """Most completions decoded together; 1 disables batching."""
    batch_window_ms: float = 5.0
    """When idle, wait this long after a request for others to share its first forward pass."""
    continuous: bool = True
    """Let requests join a running batch at the next step (False: batches run to completion)."""
    max_tokens_limit: int = 2048
    """Largest max_tokens a request may ask for; more gets 400 naming this limit."""
    default_max_tokens: int = 512
    """max_tokens when a request gives none (capped by what the context leaves)."""
    max_context: int | None = None
    """Prompt plus max_tokens may not exceed this; None: the model's max_position_embeddings."""
    max_n: int = 16
    """Most completions per request (n)."""
    max_pending: int = 1024
    """Completions queued or running before new requests get 503 + Retry-After."""
    max_body_bytes: int = 4_000_000
    """Request bodies larger than this get 413 (Content-Length checked before reading the body)."""
    served_name: str | None = None
    """Model id reported and accepted; default: the teacher's own name."""
    dtype: str = "float32"
    """Weights dtype for a local teacher: float32 or bfloat16."""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default. On a shared, oversubscribed machine 1 can be
    several times faster than spinning OpenMP threads that fight other processes for cores."""
    watermark: bool = False
    """Watermark every answer (KGW green lists) with a key chosen per request: the guard's key id from
    its authenticated X-Stillhouse-Watermark header, else this server's own key (server/NAME/0).
    Needs a local teacher and the secret in watermark_secret_env."""
    watermark_secret_env: str = "STILLHOUSE_WATERMARK_SECRET"
    """Environment variable holding the secret shared with the guard (keys and the header's mac derive from it)."""
    watermark_gamma: float = DEFAULT_PARAMS.gamma
    """Green share of the vocabulary per context window (detection must use the same)."""
    watermark_delta: float = DEFAULT_PARAMS.delta
    """Logit bias added to green tokens (larger: stronger mark, more change to the answers). The default, 1.5 with
    the 2.0-nat gate, kept the teacher's arithmetic accuracy (0.243 vs 0.263 plain; delta 2 ungated: 0.107,
    docs/results.md)."""
    watermark_context: int = DEFAULT_PARAMS.context
    """Tokens before each token that seed its green list (KGW's h; detection must use the same)."""
    watermark_entropy: float = DEFAULT_PARAMS.entropy
    """Entropy gate in nats (SWEET): bias only where the teacher's next-token entropy is above it, so confident
    tokens (digits of a sum, code syntax) stay as the model chose them; 0 = bias every token. The default, 2.0
    with delta 1.5, kept the teacher's accuracy (docs/results.md). Detection must use the same (provenance
    text and model --entropy, whose default is this one; it needs the teacher)."""
    watermark_scheme: Literal["kgw", "exp"] = DEFAULT_PARAMS.scheme  # type: ignore[assignment]
    """kgw: the green-list bias on every answer. exp: answers sampled at a temperature above 0 are drawn by EXP
    (Gumbel-max on the key's uniforms: each token's distribution is the model's, so sampled answers lose nothing;
    91/96 development answers at p < 1e-5 within 200 tokens against 69/96 under kgw, docs/results.md); greedy
    answers get the green-list bias as under kgw. Each answer's x-stillhouse-watermark-scheme header names the
    scheme and a guard logs it, so provenance on the guard's log picks the test (on a file: --scheme exp). The
    cost: a draw is a function of the key and the context, so the same prompt asked again by the same account
    (another seed, or n > 1 choices) gets the same answer until a window repeats in it; use kgw where sampled
    variety matters."""
    reasoning_parser: Literal["think", "off"] = "think"
    """think: a <think>...</think> block leading a completion (or one the prompt opened) is answered in the
    reasoning field, the rest as content; off: the text comes back as the model wrote it."""
    reasoning_field: Literal["reasoning_content", "reasoning"] = "reasoning_content"
    """The message field that carries the reasoning (DeepSeek, vLLM: reasoning_content; OpenRouter: reasoning)."""

    def __post_init__(self) -> None:
        from stillhouse.teacher.spec import parse_spec

        parse_spec(self.teacher)  # raises ValueError listing the accepted forms
        if not self.host:
            raise ValueError("host is empty: use 127.0.0.1 (loopback) or an interface address")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r}: must be 0..65535 (0 picks a free port)")
        for name in ("max_batch", "max_tokens_limit", "default_max_tokens", "max_n", "max_pending",
                     "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if not 0.0 <= self.batch_window_ms <= 5000.0:
            raise ValueError(f"batch_window_ms={self.batch_window_ms}: must be between 0 and 5000")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context={self.max_context}: must be at least 2 tokens, or None for the model's")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads={self.threads!r}: must be an integer >= 1, or None for torch's default")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: use float32 or bfloat16")
        if self.reasoning_parser not in ("think", "off"):
            raise ValueError(f"reasoning_parser={self.reasoning_parser!r}: use think or off")
        if self.reasoning_field not in ("reasoning_content", "reasoning"):
            raise ValueError(f"reasoning_field={self.reasoning_field!r}: use reasoning_content or reasoning")
        self.watermark_params()  # raises naming gamma, delta, context or entropy
        if self.watermark and not parse_spec(self.teacher).is_local:
            raise ValueError(f"watermark: needs a local teacher (bundled, hf:DIR, gguf:FILE), not {self.teacher!r}; "
                             "the green-list bias is applied to the model's logits")

    def watermark_params(self) -> WatermarkParams:
        """The scheme's parameters as the watermark module takes them."""
        try:
            return WatermarkParams(self.watermark_gamma, self.watermark_delta, self.watermark_context,
                                   self.watermark_entropy, self.watermark_scheme)
        except ValueError as exc:
            raise ValueError(f"watermark_{exc}") from exc


def load_teacher(config: ServeConfig) -> Teacher:
    """Build the teacher a config names, with its batching settings when it is local."""
    from stillhouse.teacher.batcher import BatchConfig
    from stillhouse.teacher.spec import make_teacher, parse_spec

    ts = parse_spec(config.teacher)
    if ts.is_local:
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        from stillhouse.teacher.local import LocalTeacher

        batch = BatchConfig(max_batch=config.max_batch, batch_window_s=config.batch_window_ms / 1000,
                            continuous=config.continuous)
        return LocalTeacher.from_spec(ts, batch=batch, max_context=config.max_context, dtype=config.dtype)
    return make_teacher(ts)


class ChatServer:
    """The state behind the routes: the teacher, the config, in-flight counters."""

    def __init__(self, teacher: Teacher, config: ServeConfig):
        from stillhouse.teacher.local import LocalTeacher

        self.teacher = teacher
        self.config = config
        self.local: LocalTeacher | None = teacher if isinstance(teacher, LocalTeacher) else None
        self.model_id = config.served_name or teacher.name
        self.aliases = {self.model_id, teacher.name, config.teacher}
        self.created = int(time.time())
        self.pending = 0
        self.requests = 0
        self.max_token_chars = 0
        """Characters of the longest vocabulary entry (local teacher): no token covers more text."""
        self.traits: TemplateTraits | None = None
        """What the local model's chat template renders (tools, tool calls, an opened <think>)."""
        if self.local is not None:
            self.max_token_chars = max(map(len, self.local.tokenizer.get_vocab()), default=0)
            self.traits = traits(self.local.tokenizer)
        self.watermarks: dict[str, RowWatermark] = {}
        """Per key id, the processor (holding the derived key); never logged or answered."""
        self._wm_secret = b""
        if config.watermark:
            from stillhouse.watermark.keys import load_secret

            if self.local is None:
                raise ValueError("watermark: needs a local teacher; the bias is applied to the model's logits")
            self._wm_secret = load_secret(config.watermark_secret_env)
            self._wm_params = config.watermark_params()
            self._wm_default = f"server/{_quote(self.model_id)}/0"

    def watermark_for(self, headers: Any) -> RowWatermark | None:
        """The processor for one request: the guard's authenticated key id, else this server's own key.

        Raises APIError 401 when a watermark header is present but does not authenticate."""
        if not self.config.watermark:
            return None
        from stillhouse.watermark.keys import HEADER, ChannelError, derive_key, key_u64, verify_header

        value = headers.get(HEADER)
        kid = self._wm_default
        if value is not None:
            try:
                kid = str(verify_header(self._wm_secret, value, time.time()))
            except ChannelError as exc:
                raise APIError(401, str(exc), code="watermark_unauthenticated") from None
        wm = self.watermarks.get(kid)
        if wm is None and self.local is not None:  # (always local: checked in __init__)
            from stillhouse.watermark.green import vocab_hashes

            vocab = int(self.local.model.get_output_embeddings().weight.shape[0])
            if len(self.watermarks) > 4096:  # one per key id seen; rotation retires old ones
                self.watermarks.clear()
            wm = self.watermarks[kid] = RowWatermark(key_u64(derive_key(self._wm_secret, kid)), self._wm_params,
                                                     vocab_hashes(vocab), key_id=kid)
        return wm

    @property
    def context_limit(self) -> int:
        """Prompt plus max_tokens limit: the config's, capped by the model's."""
        model_limit = self.local.max_context if self.local is not None else 1 << 30
        return min(model_limit, self.config.max_context or model_limit)

    # -- routes ---------------------------------------------------------------------
    async def health(self, request: Request) -> Any:
        from starlette.responses import JSONResponse

        body: dict[str, Any] = {"status": "ok", "model": self.model_id, "revision": self.teacher.revision,
                                "pending": self.pending, "requests": self.requests,
                                "watermark": self.config.watermark}
        if self.local is not None:
            b = self.local.batcher
            body.update(active=b.active, decode_steps=b.steps, max_batch_seen=b.max_rows_seen,
                        max_batch=b.config.max_batch, max_context=self.context_limit)
        return JSONResponse(body)

    async def models(self, request: Request) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "stillhouse",
             "root": self.teacher.revision}]})

    async def chat(self, request: Request) -> Any:
        from starlette.responses import JSONResponse

        try:
            return await self._chat(request)
        except APIError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    # -- score ----------------------------------------------------------------------
    async def score(self, request: Request) -> Any:
        from starlette.responses import JSONResponse

        try:
            return JSONResponse(await self._score(request))
        except APIError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def _score(self, request: Request) -> dict[str, Any]:
        from stillhouse.serve.score import parse_score_request

        try:
            raw = await read_body(request.receive, self.config.max_body_bytes,
                                  content_length(request.scope["headers"]))
            body = loads_strict(raw)
        except RequestError as exc:
            raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
        model, prompt, completion, k = parse_score_request(body)
        if model is not None and model not in self.aliases:
            raise APIError(404, f"the model {model!r} does not exist here; this server serves "
                                f"{self.model_id!r} (see GET /v1/models)", param="model", code="model_not_found")
        self.requests += 1
        try:
            if self.local is not None:  # check the ids and this server's context limit before any work
                prompt, completion = self.local.score_ids(prompt, completion)
                if len(prompt) + len(completion) > self.context_limit:
                    raise APIError(400, f"this model's context limit is {self.context_limit} tokens, but the prompt "
                                        f"has {len(prompt)} and the completion {len(completion)}: score less",
                                   param="completion_token_ids", code="context_length_exceeded")
            result = await self.teacher.score(prompt, completion, k)
        except APIError:
            raise
        except ValueError as exc:  # bad ids, empty completion, over the context (ContextTooLong)
            raise APIError(400, str(exc), param="completion_token_ids") from exc
        except Exception as exc:
            log.exception("scoring failed")
            raise APIError(500, f"scoring failed: {type(exc).__name__}: {exc}") from exc
        lp = result.logprobs
        entries = self._entries(lp.tokens, lp.token_ids, lp.logprobs, lp.top_tokens, lp.top_ids, lp.top_logprobs)
        if lp.token_ids is not None:
            for e, tid, top_ids in zip(entries, lp.token_ids, lp.top_ids or [[]] * len(entries)):
                e["id"] = tid
                for t, i in zip(e["top_logprobs"], top_ids):
                    t["id"] = i
        return {"object": "score", "model": self.model_id, "logprobs": {"content": entries},
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(entries),
                          "total_tokens": result.prompt_tokens + len(entries)}}

    # -- chat -----------------------------------------------------------------------
    async def _chat(self, request: Request) -> Any:
        from starlette.responses import JSONResponse

        cfg = self.config
        try:
            length = content_length(request.scope["headers"])
            raw = await read_body(request.receive, cfg.max_body_bytes, length)
            body = loads_strict(raw)
        except RequestError as exc:  # 413 too large; 400 not JSON, NaN/Infinity, too deep
            raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
        req = parse_chat_request(body, max_tokens_limit=cfg.max_tokens_limit,
                                 default_max_tokens=cfg.default_max_tokens, max_n=cfg.max_n)
        if req.model is not None and req.model not in self.aliases:
            raise APIError(404, f"the model {req.model!r} does not exist here; this server serves "
                                f"{self.model_id!r} (see GET /v1/models)", param="model", code="model_not_found")
        wm = self.watermark_for(request.headers)
        wm_headers = dict(wm.applied_headers()) if wm is not None else None
        prompt_ids: list[int] | None = None
        if self.local is not None:
            self._check_tools(req)
            prompt_ids, req = await self._encode(self.local, req)
        n = req.params.n
        if self.pending + n > cfg.max_pending:
            raise APIError(503, f"the server has {self.pending} completions queued or running (limit "
                                f"{cfg.max_pending}); retry shortly", code="overloaded",
                           headers={"Retry-After": "1"})
        self.requests += 1
        if req.stream:
            return SSEStream(self, req, prompt_ids, wm)
        self.pending += n
        try:
            result = await self._complete(request, req, prompt_ids, wm)
        finally:
            self.pending -= n
        if result is None:  # the client went away; nobody reads this
            return JSONResponse(error_json("client disconnected"), status_code=499)
        completions = [self.shape(c, req) for c in result.completions]
        body_out = completion_json(new_completion_id(), self.model_id, completions,
                                   [self._choice_logprobs(c) if req.params.logprobs else None
                                    for c in completions], self.teacher.revision[:32])
        return JSONResponse(body_out, headers=wm_headers)

    # -- reasoning and tools ----------------------------------------------------------
    def _check_tools(self, req: ChatRequest) -> None:
        """400 for tools or tool calls the local model's chat template cannot render, and for a
        tool_choice that would need constrained decoding."""
        tr = self.traits
        if tr is None:
            return
        if req.tools and not tr.tools:
            raise APIError(400, f"the model {self.model_id!r} has a chat template without tool support (it does "
                                "not render 'tools'), so it cannot be offered tools; remove 'tools' and "
                                "'tool_choice', or serve a model whose template takes tools", param="tools",
                           code="tools_unsupported")
        if not tr.tool_calls and any(m.get("tool_calls") for m in req.messages):
            raise APIError(400, f"the model {self.model_id!r} has a chat template that cannot render an assistant "
                                "turn's 'tool_calls'; send the conversation without them", param="messages",
                           code="tools_unsupported")
        if req.tool_choice not in (None, "auto", "none"):
            raise APIError(400, "'tool_choice' required or naming a function needs constrained decoding, which this "
                                "server does not do; send \"auto\" (the model chooses) or \"none\"",
                           param="tool_choice", code="unsupported_value")

    def parses_tools(self, req: ChatRequest) -> bool:
        """Whether tool calls are read out of this request's completions (a local model whose template
        defines a call format, offered tools, tool_choice not none)."""
        return bool(self.local is not None and req.tools and req.tool_choice != "none" and self.traits is not None
                    and self.traits.tool_call_format == "hermes")

    def reasoning_opened(self) -> bool:
        """The prompt ends inside an open <think> block (the model's text starts as reasoning)."""
        return bool(self.traits is not None and self.traits.opens_think)

    def shape(self, c: Completion, req: ChatRequest) -> Completion:
        """A completion as answered: a <think> block split into the reasoning field, tool calls read out."""
        text, msg = c.text, dict(c.message or {})
        finish = c.finish_reason
        if self.config.reasoning_parser == "think" and field_reasoning(msg) is None:
            thought, answer = split_think(text, self.reasoning_opened())
            if thought is not None:
                msg[self.config.reasoning_field] = thought
                text = answer
        if self.parses_tools(req) and not msg.get("tool_calls"):
            content, calls = parse_tool_calls(text)
            if calls:
                text = content
                msg["tool_calls"] = calls
                if not content:
                    msg["content"] = None
                if finish == "stop":
                    finish = "tool_calls"
        if text == c.text and msg == (c.message or {}):
            return c
        return replace(c, text=text, message=msg or None, finish_reason=finish)

    async def _encode(self, local: LocalTeacher, req: ChatRequest) -> tuple[list[int], ChatRequest]:
        """The prompt's token ids, and ``req`` with max_tokens fitted to the context when none was given.

        A prompt longer in characters than the context could hold even at the longest token is
        refused without tokenizing it; a long one is tokenized in a worker thread, not on the loop."""
        from stillhouse.teacher.local import ContextTooLong

        limit = self.context_limit
        chars = _prompt_chars(req.messages)
        floor = -(-chars // self.max_token_chars) if self.max_token_chars else 0  # tokens it needs at least
        if floor + (req.params.max_tokens if req.max_tokens_given else 1) > limit:
            raise APIError(400, f"this model's context limit is {limit} tokens, but the messages hold "
                                f"{chars} characters, at least {floor} tokens: shorten the messages",
                           param="messages", code="context_length_exceeded")
        encode: Any = local.encode
        if req.tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in req.messages):
            def encode(messages: list[dict[str, Any]]) -> list[int]:  # through the template, tools and all
                import jinja2

                try:
                    return render_ids(local.tokenizer, _template_messages(messages), tools=req.tools,
                                      add_generation_prompt=True)
                except (jinja2.TemplateError, TypeError) as exc:  # the template refused them
                    raise ValueError(f"the model's chat template cannot render these messages: {exc}") from exc
        try:
            if chars <= INLINE_TOKENIZE_CHARS:
                prompt_ids = encode(req.messages)
            else:
                prompt_ids = await asyncio.to_thread(encode, req.messages)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        if not req.max_tokens_given:
            room = limit - len(prompt_ids)
            req = _with_max_tokens(req, max(1, min(req.params.max_tokens, room)))
        if len(prompt_ids) + req.params.max_tokens > limit:
            too_long = ContextTooLong(len(prompt_ids), req.params.max_tokens, limit)
            raise APIError(400, str(too_long), param="messages", code="context_length_exceeded")
        return prompt_ids, req

    async def _complete(self, request: Request, req: ChatRequest, prompt_ids: list[int] | None,
                        wm: RowWatermark | None = None) -> ChatResult | None:
        """Run a non-streamed request; None when the client disconnects first (its slots freed)."""
        if self.local is None:
            work: asyncio.Future[Any] = asyncio.ensure_future(self.teacher.chat(req.messages, req.params))
            handles: list[Any] = []
        else:
            handles = [self.local.submit(prompt_ids or [], req.params, index=i, row_processor=wm)
                       for i in range(req.params.n)]
            work = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(h.future) for h in handles)))
        gone = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                for h in handles:
                    h.cancel()
                _discard(work)
                return None
            try:
                done = work.result()
            except Exception as exc:
                log.exception("generation failed")
                raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}") from exc
            if self.local is None:
                return done  # type: ignore[no-any-return]
            return ChatResult(completions=list(done), model=self.model_id)
        finally:
            gone.cancel()
            if not work.done():
                _discard(work)

    def _choice_logprobs(self, c: Completion) -> dict[str, Any] | None:
        lp = c.logprobs
        if lp is None:
            return {"content": []}
        return {"content": self._entries(lp.tokens, lp.token_ids, lp.logprobs, lp.top_tokens, lp.top_ids,
                                         lp.top_logprobs)}

    def _entries(self, tokens: list[str] | None, ids: list[int] | None, lps: list[float],
                 top_tokens: list[list[str]] | None, top_ids: list[list[int]] | None,
                 top_lps: list[list[float]]) -> list[dict[str, Any]]:
        if self.local is not None and ids is not None:
            tt = self.local.batcher.token_text
            tokens = [tt.text(t) for t in ids]
            raw = [tt.raw(t) for t in ids]
            tids = top_ids or []
            top_tokens = [[tt.text(t) for t in row] for row in tids]
            top_raw = [[tt.raw(t) for t in row] for row in tids]
        else:
            tokens = tokens or []
            raw = [t.encode() for t in tokens]
            top_tokens = top_tokens or []
            top_raw = [[t.encode() for t in row] for row in top_tokens]
        return logprob_entries(tokens, raw, lps, top_tokens, top_raw, top_lps)


INLINE_TOKENIZE_CHARS = 4096
"""Prompts up to this many characters are tokenized on the event loop (a few ms); longer ones in a thread."""


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _prompt_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of the messages' text (content strings and text parts)."""
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):
            n += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return n


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Request messages for the chat template: text content, developer as system, tool fields kept."""
    from stillhouse.teacher.local import message_text

    out = []
    for m in messages:
        mm = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id", "name")}
        if mm.get("role") == "developer":
            mm["role"] = "system"
        if mm.get("content") is not None:
            mm["content"] = message_text(mm["content"])
        out.append(mm)
    return out


def _discard(fut: asyncio.Future[Any]) -> None:
    """Cancel work whose result nobody will read, and read its outcome when it settles.

    A cancelled ``asyncio.gather`` does not end cancelled: it settles later with a
    CancelledError set as its exception, which asyncio logs as "exception was never
    retrieved" once the future is collected (once per cancelled request)."""
    fut.cancel()
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def _with_max_tokens(req: ChatRequest, max_tokens: int) -> ChatRequest:
    from dataclasses import replace

    return replace(req, params=replace(req.params, max_tokens=max_tokens))


def create_app(teacher: Teacher, config: ServeConfig | None = None, *, close_teacher: bool = False) -> Starlette:
    """The ASGI app over ``teacher``. ``close_teacher`` closes it on shutdown."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    server = ChatServer(teacher, config or ServeConfig(teacher="fake"))

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        msg = (f"no route {request.method} {request.url.path}; this server has POST /v1/chat/completions, "
               "POST /v1/score, GET /v1/models and GET /health")
        return JSONResponse(error_json(msg, code="not_found" if status == 404 else "method_not_allowed"),
                            status_code=status)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_json(f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                            status_code=500)

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        if close_teacher:
            await teacher.aclose()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", server.chat, methods=["POST"]),
            Route("/chat/completions", server.chat, methods=["POST"]),
            Route("/v1/score", server.score, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: not_found, 404: not_found, 405: not_found, 500: server_error},
        lifespan=lifespan,
    )
    app.state.server = server
    return app


def run(config: ServeConfig, teacher: Teacher | None = None) -> None:
    """Load the teacher, bind, print the address and serve until interrupted."""
    import sys

    import uvicorn

    if config.watermark:  # fail fast, before the model loads
        from stillhouse.watermark.keys import load_secret

        load_secret(config.watermark_secret_env)
    sock = bind_socket(config.host, config.port)  # fail fast, before the model loads
    t0 = time.perf_counter()
    if teacher is None:
        print(f"stillhouse serve: loading teacher {config.teacher!r} ...", file=sys.stderr, flush=True)
        teacher = load_teacher(config)
    app = create_app(teacher, config, close_teacher=True)
    host, port = sock.getsockname()[:2]
    print(f"stillhouse serve: {teacher.name} ({teacher.revision[:19]}) loaded in "
          f"{time.perf_counter() - t0:.1f} s; listening on http://{host}:{port}/v1 "
          f"(max_batch={config.max_batch})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
