"""LocalTeacher: an in-process transformers model behind the Teacher protocol (white-box).

It owns the model and a :class:`~stillhouse.teacher.batcher.Batcher` worker thread, so
concurrent ``await teacher.chat(...)`` calls share forward passes and never block the
event loop. Besides the protocol it offers

- ``generate(list_of_message_lists, params)``: synchronous batched generation (continuous batching);
- ``generate_batch(list_of_message_lists, params)``: greedy generation in fixed white-box batches
  (:mod:`stillhouse.teacher.generate`; what a local harvest runs);
- ``submit(prompt_ids, params, index, on_event)``: one completion with per-step events
  (what ``stillhouse serve`` streams from);
- ``logits(sequences)``: full next-token logits of given token sequences, for KD and KL;
- ``score_batch(pairs, top_logprobs)``: logprobs (and top-k) of given completions after given prompts,
  in batched forward passes (what ``score`` and ``serve``'s ``POST /v1/score`` run);
- ``logits_processors``: a hook, a list of ``(input_ids, scores) -> scores`` callables
  applied before sampling and before logprobs are taken (the watermark plugs in here).

Build one with ``LocalTeacher.from_spec(parse_spec("bundled"))`` (what
``make_teacher("bundled")`` does) or from a model and tokenizer you already hold.

Errors: :class:`ContextTooLong` (a ``ValueError``) when prompt plus ``max_tokens`` exceeds
the context limit, ``ValueError`` for malformed messages, ``ModelNotFound`` from loading.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

from stillhouse.teacher.base import (
    ChatResult,
    Completion,
    Message,
    Prompt,
    SamplingParams,
    ScoreResult,
    TokenLogprobs,
)
from stillhouse.teacher.batcher import (
    BatchConfig,
    Batcher,
    Handle,
    LogitsProcessor,
    Request,
    RowProcessor,
    StepEvent,
)
from stillhouse.teacher.spec import TeacherSpec

if TYPE_CHECKING:
    import torch


class ContextTooLong(ValueError):
    """Prompt tokens plus max_tokens exceed the context limit; the message names the limit."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        super().__init__(
            f"this model's context limit is {limit} tokens, but the prompt has {prompt_tokens} tokens "
            f"and max_tokens is {max_tokens} ({prompt_tokens + max_tokens} in all): "
            "shorten the messages or lower max_tokens"
        )
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit


def message_text(content: Any) -> str:
    """The text of an OpenAI message ``content``: a string or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError("message content parts must be {'type': 'text', 'text': '...'}; "
                                 "this teacher reads text only")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of text parts, not {type(content).__name__}")


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Check chat messages and reduce them to ``{"role", "content"}`` strings."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise ValueError(f"messages[{i}].role={role!r}: use 'system', 'user' or 'assistant'")
        out.append({"role": "system" if role == "developer" else role,
                    "content": message_text(m.get("content", ""))})
    return out


def _is_token_ids(prompt: Prompt) -> TypeGuard[list[int]]:
    """Whether every item of ``prompt`` is a token id (an int, not a bool) rather than a chat message."""
    return all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def encode_chat(tokenizer: Any, messages: Any) -> list[int]:
    """The prompt ids a local teacher generates from (:meth:`LocalTeacher.encode`): chat template plus the
    assistant cue, or ``role: content`` lines for a tokenizer without a template."""
    msgs = normalize_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt encodes to zero tokens")
    return list(ids)


class LocalTeacher:
    """A transformers causal LM served in-process with continuous batching."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "local",
        revision: str = "unknown",
        batch: BatchConfig = BatchConfig(),
        max_context: int | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
    ):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer
        self._name = name
        self._revision = revision
        self.model_lock = threading.Lock()
        self.batcher = Batcher(model, tokenizer, batch, logits_processors, self.model_lock)
        model_limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        if max_context is not None and max_context < 2:
            raise ValueError(f"max_context={max_context}: must be at least 2 tokens")
        self.max_context = min(x for x in (max_context, model_limit, 1 << 30) if x is not None)
        """Prompt plus completion tokens may not exceed this."""

    @classmethod
    def from_spec(
        cls,
        spec: TeacherSpec | str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        name: str | None = None,
        batch: BatchConfig | None = None,
        max_context: int | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        **batch_options: Any,
    ) -> LocalTeacher:
        """Load ``bundled``, ``hf:DIR`` or ``gguf:FILE``. ``batch_options`` build a BatchConfig
        (``max_batch``, ``batch_window_s``, ``continuous``) when ``batch`` is not given."""
        from stillhouse.teacher.bundled import load_model, model_name

        model, tokenizer, revision = load_model(spec, dtype=dtype, device=device)
        return cls(model, tokenizer, name=name or model_name(spec), revision=revision,
                   batch=batch or BatchConfig(**batch_options), max_context=max_context,
                   logits_processors=logits_processors)

    # -- protocol -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def revision(self) -> str:
        return self._revision

    @property
    def logits_processors(self) -> list[LogitsProcessor]:
        """The hook: edit this list to add or remove processors (applies to the next step)."""
        return self.batcher.logits_processors

    async def chat(self, messages: list[Message], params: SamplingParams) -> ChatResult:
        t0 = time.perf_counter()
        ids = self.encode(messages)
        self.check_fits(len(ids), params.max_tokens)
        handles = [self.submit(ids, params, index=i) for i in range(params.n)]
        try:
            done = await asyncio.gather(*(asyncio.wrap_future(h.future) for h in handles))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return ChatResult(completions=list(done), model=self.name, latency_s=time.perf_counter() - t0)

    async def resolve(self) -> str:
        return self.name

    async def chat_json(self, messages_json: str, params: SamplingParams) -> ChatResult:
        return await self.chat(json.loads(messages_json), params)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def score(self, prompt: Prompt, completion: list[int] | str, top_logprobs: int = 0) -> ScoreResult:
        t0 = time.perf_counter()
        p, c = self.score_ids(prompt, completion)
        lp = (await asyncio.to_thread(self.score_batch, [(p, c)], top_logprobs))[0]
        return ScoreResult(lp, len(p), self.name, time.perf_counter() - t0)

    def close(self) -> None:
        """Stop the worker thread (the model stays loaded until this object is dropped)."""
        self.batcher.close()

    # -- more than the protocol -----------------------------------------------------
    def encode(self, messages: list[Message]) -> list[int]:
        """Prompt token ids for a conversation, with the chat template and the assistant cue.

        A tokenizer without a chat template (a base model) gets ``role: content`` lines.
        """
        return encode_chat(self.tokenizer, messages)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextTooLong unless ``prompt_tokens + max_tokens`` fits the context."""
        if prompt_tokens + max_tokens > self.max_context:
            raise ContextTooLong(prompt_tokens, max_tokens, self.max_context)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        on_event: Callable[[StepEvent], None] | None = None,
        row_processor: RowProcessor | None = None,
    ) -> Handle:
        """Queue one completion of ``prompt_ids``; ``on_event`` runs in the worker thread;
        ``row_processor`` edits this row's logits each step (a per-request watermark)."""
        return self.batcher.submit(Request(list(prompt_ids), params, index=index, on_event=on_event,
                                           row_processor=row_processor))

    def generate(self, conversations: list[list[Message]], params: SamplingParams) -> list[ChatResult]:
        """Complete many conversations at once (blocking); one ChatResult each, in order."""
        t0 = time.perf_counter()
        encoded = [self.encode(m) for m in conversations]
        for ids in encoded:
            self.check_fits(len(ids), params.max_tokens)
        handles = [[self.submit(ids, params, index=i) for i in range(params.n)] for ids in encoded]
        try:
            results = []
            for hs in handles:
                done: list[Completion] = [h.future.result() for h in hs]
                results.append(ChatResult(completions=done, model=self.name,
                                          latency_s=time.perf_counter() - t0))
            return results
        except BaseException:
            for hs in handles:
                for h in hs:
                    h.cancel()
            raise

    def generate_batch(self, conversations: list[list[Message]], params: SamplingParams,
                       batch_size: int = 64) -> list[Completion]:
        """Complete many conversations greedily in fixed white-box batches (blocking; one Completion each,
        in order): :func:`stillhouse.teacher.generate.generate` under the model lock, without the
        continuous batcher. Faster for a harvest of many short prompts, and a rerun gives the same answers;
        ``top_logprobs`` also cover the stop position. Greedy only, without stop strings or logits
        processors (ValueError otherwise: use :meth:`generate`); ``n`` is ignored (one completion each)."""
        from stillhouse.teacher.generate import generate

        if params.temperature > 0 or params.stop or self.logits_processors:
            raise ValueError("generate_batch is greedy, without stop strings or logits processors: "
                             "use generate() (continuous batching) for these")
        encoded = [self.encode(m) for m in conversations]
        for ids in encoded:
            self.check_fits(len(ids), params.max_tokens)
        with self.model_lock:
            gens = generate(self.model, self.tokenizer, encoded, params.max_tokens, batch_size=batch_size,
                            logprobs=params.logprobs, top_logprobs=params.top_logprobs)
        out = []
        for ids, g in zip(encoded, gens):
            lp = None
            if params.logprobs:
                lp = TokenLogprobs(tokens=self.tokenizer.convert_ids_to_tokens(g.token_ids), logprobs=g.logprobs,
                                   token_ids=g.token_ids, top_logprobs=g.top_logprobs,
                                   top_ids=g.top_ids if params.top_logprobs else None)
            out.append(Completion(text=g.text, finish_reason=g.finish_reason,  # type: ignore[arg-type]
                                  prompt_tokens=len(ids), completion_tokens=len(g.token_ids),
                                  token_ids=g.token_ids, logprobs=lp))
        return out

    def score_ids(self, prompt: Prompt, completion: list[int] | str) -> tuple[list[int], list[int]]:
        """Prompt and completion token ids for :meth:`score`, checked (ValueError, ContextTooLong)."""
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must be a non-empty list of chat messages or of token ids")
        if _is_token_ids(prompt):
            p = list(prompt)
        else:
            p = self.encode(prompt)  # type: ignore[arg-type]
        if isinstance(completion, str):
            c = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        else:
            c = list(completion)
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        if not c:
            raise ValueError("completion is empty: give at least one token to score")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in [*p, *c]):
            raise ValueError(f"token ids must be integers in [0, {vocab}) for this model's vocabulary")
        if len(p) + len(c) > self.max_context:
            raise ContextTooLong(len(p), len(c), self.max_context)
        return p, c

    def score_batch(self, pairs: Sequence[tuple[list[int], list[int]]], top_logprobs: int = 0,
                    batch_size: int = 8) -> list[TokenLogprobs]:
        """For each ``(prompt_ids, completion_ids)``: the logprob of every completion token after what
        precedes it, and the ``top_logprobs`` most likely tokens at each of those positions (temperature 1,
        no logits processors)."""
        import torch

        if not 0 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs={top_logprobs}: must be between 0 and 20")
        if any(not p or not c for p, c in pairs):
            raise ValueError("score_batch: every prompt and completion needs at least one token")
        logits = self.logits([list(p) + list(c) for p, c in pairs], batch_size=batch_size)
        out = []
        for (p, c), row in zip(pairs, logits):
            lp = torch.log_softmax(row[len(p) - 1: len(p) + len(c) - 1].float(), -1)
            ids = torch.tensor(c, dtype=torch.long)
            tok_lp = lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
            res = TokenLogprobs(tokens=self.tokenizer.convert_ids_to_tokens(list(c)), logprobs=tok_lp,
                                token_ids=list(c))
            if top_logprobs:
                vals, top = lp.topk(top_logprobs, -1)
                res.top_ids = top.tolist()
                res.top_logprobs = vals.tolist()
                res.top_tokens = [self.tokenizer.convert_ids_to_tokens(r) for r in res.top_ids]
            out.append(res)
        return out

    def logits(self, sequences: list[list[int]], batch_size: int = 8) -> list[torch.Tensor]:
        """Full next-token logits: for each sequence a float32 ``[len, vocab]`` tensor whose row
        ``t`` is the distribution of the token after position ``t`` (no processors applied)."""
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        out: list[torch.Tensor] = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            if any(len(s) == 0 for s in chunk):
                raise ValueError("logits(): every sequence needs at least one token")
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.batcher.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            with self.model_lock, torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            out.extend(logits[i, :len(s)].clone() for i, s in enumerate(chunk))
        return out

