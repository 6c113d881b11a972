"""Continuous batching for an in-process transformers model.

One worker thread owns the model. Callers submit requests (prompt token ids plus
sampling parameters) from any thread and get a :class:`Handle` back: a
``concurrent.futures.Future`` of the :class:`Completion`, an optional per-step event
callback for streaming, and ``cancel()``.

How a step works. The active rows share one KV cache, left-padded so that every row's
real tokens end at the same slot. Each loop the worker

1. drops cancelled rows (a client that went away frees its slot at once);
2. admits waiting requests into free slots: it prefills them together in one
   left-padded forward pass (identical prompts, e.g. ``n>1``, are prefilled once),
   samples their first token, and splices their cache into the running one by
   left-padding the shorter of the two along the time axis;
3. runs one decode forward pass for all rows (each row at its own RoPE position),
   applies the logits-processor hook (batch-wide processors, then each request's own
   ``row_processor``, so rows with different watermark keys share a batch), takes
   logprobs and top-k from the processed logits, picks each row's token (greedy, or temperature/top-p with the row's own
   seeded generator; a watermark that ``samples`` (EXP) picks a sampled row's token itself, from the unbiased
   logits), and finishes rows on EOS, a stop string or ``max_tokens``;
4. removes finished rows and trims cache columns no row still needs.

Caches whose layers are not plain ``DynamicLayer`` (sliding-window models) cannot be
spliced; for those the worker admits new requests only when the batch is empty.

Logprobs are ``log_softmax`` of the logits after the processor hook and before
temperature and top-p, so they describe the model (plus watermark), not the sampler.

Errors: a failed forward pass fails the futures of the rows in that batch with the
exception and the worker carries on; a cancelled request's future raises
:class:`RequestCancelled`; submitting after ``close()`` raises ``RuntimeError``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stillhouse.teacher.base import Completion, SamplingParams, TokenLogprobs
from stillhouse.teacher.decoding import (
    TokenText,
    find_stop,
    safe_prefix_len,
    sample_rows,
    seed_for,
    tokens_covering,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LogitsProcessor = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""``(input_ids [B, L] left-padded prompt+generated ids, scores [B, V]) -> scores``."""
RowProcessor = Callable[[list[int], "torch.Tensor"], "torch.Tensor"]
"""``(one row's prompt+generated ids, that row's scores [V]) -> scores``: a request's own processor
(e.g. a watermark with the request's key), applied after the batch-wide ones. One whose ``samples`` attribute is
true (:class:`stillhouse.watermark.green.RowWatermark` under EXP) instead picks a sampled row's token with
``choose(ids, answer_start, scores, temperature, top_p) -> token | None`` (None: sample as usual)."""


@dataclass(frozen=True)
class BatchConfig:
    """How the worker batches requests."""

    max_batch: int = 32
    """Most rows decoded together. 1 disables batching (one request at a time)."""
    batch_window_s: float = 0.005
    """When the batch is empty, wait this long after the first request for others to join."""
    continuous: bool = True
    """Let new requests join a running batch; False runs each batch to completion first."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch!r}: must be an integer >= 1 (1 disables batching)")
        if not (0.0 <= self.batch_window_s <= 5.0):
            raise ValueError(f"batch_window_s={self.batch_window_s}: must be between 0 and 5 seconds")


class RequestCancelled(Exception):
    """The request was cancelled (its client went away) before it finished."""


@dataclass
class StepEvent:
    """What one step added to a streamed completion. ``completion`` is set on the last event."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    finish_reason: str | None = None
    completion: Completion | None = None


@dataclass
class Request:
    """One completion to generate (a request with ``n`` completions is ``n`` of these)."""

    prompt_ids: list[int]
    params: SamplingParams
    index: int = 0
    """Completion index within its request; offsets the seed."""
    on_event: Callable[[StepEvent], None] | None = None
    """Called from the worker thread after each step that committed text, and at the end."""
    row_processor: RowProcessor | None = None
    """This request's own logits processor (applied to its row only, every step)."""
    future: Future[Completion] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Handle:
    """What :meth:`Batcher.submit` returns."""

    def __init__(self, request: Request):
        self._request = request

    @property
    def future(self) -> Future[Completion]:
        return self._request.future

    def cancel(self) -> None:
        """Free the request's batch slot at the next step; its future raises RequestCancelled."""
        self._request.cancelled.set()


class _Row:
    """The worker's state for one active request."""

    def __init__(self, req: Request, seed: int | None):
        import torch

        self.req = req
        self.p = req.params
        self.ids = list(req.prompt_ids)
        self.prompt_len = len(req.prompt_ids)
        self.pos = self.prompt_len  # RoPE position of the next token fed to the model
        self.pending = -1  # sampled token not yet in the cache
        self.gen: list[int] = []
        self.lps: list[float] = []
        self.top_ids: list[list[int]] = []
        self.top_lps: list[list[float]] = []
        self.prefix_lens: list[int] = []
        self.text = ""
        self.emitted_chars = 0
        self.emitted_tokens = 0
        self.finish: str | None = None
        self.generator: torch.Generator | None = None
        if self.p.temperature > 0:
            self.generator = torch.Generator()
            s = seed if seed is not None else int.from_bytes(os.urandom(8), "big") >> 1
            self.generator.manual_seed(seed_for(s, req.index))


class Batcher:
    """Owns a model and a worker thread that decodes submitted requests in shared batches."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: BatchConfig = BatchConfig(),
        logits_processors: Sequence[LogitsProcessor] = (),
        model_lock: threading.Lock | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.logits_processors: list[LogitsProcessor] = list(logits_processors)
        self.model_lock = model_lock or threading.Lock()
        self.token_text = TokenText(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model, tokenizer)
        self._inbox: queue.Queue[Request | None] = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None
        self._splice_ok = True
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.steps = 0
        """Decode forward passes run so far (for tests and benchmarks)."""
        self.max_rows_seen = 0
        """The largest batch decoded so far."""

    # -- public ---------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        """Queue a request; the worker starts on first use."""
        if self._closed:
            raise RuntimeError("this teacher is closed: create a new one")
        self._ensure_thread()
        self._inbox.put(request)
        return Handle(request)

    @property
    def active(self) -> int:
        """Rows in the running batch right now."""
        return len(self._rows)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the worker; requests still queued or running fail with RuntimeError."""
        self._closed = True
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout_s)
            self._thread = None

    # -- worker ---------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stillhouse-batcher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                if not self._collect():
                    break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._rows:
                        self._decode_step()
                except Exception as exc:  # fail this batch, keep serving the next
                    log.exception("batch failed")
                    for row in self._rows:
                        _settle(row.req.future, exc=exc)
                    self._rows, self._cache, self._mask = [], None, None
        err = RuntimeError("the teacher was closed before this request finished")
        for row in self._rows:
            _settle(row.req.future, exc=err)
        for req in list(self._waiting):
            _settle(req.future, exc=err)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                _settle(item.future, exc=err)

    def _collect(self) -> bool:
        """Move submitted requests into the waiting line; False when closing."""
        def take(item: Request | None) -> bool:
            if item is None:
                return False
            self._waiting.append(item)
            return True

        if not self._rows and not self._waiting:
            while True:
                try:
                    item = self._inbox.get(timeout=1.0)
                    break
                except queue.Empty:
                    continue
            if not take(item):
                return False
            deadline = time.monotonic() + self.config.batch_window_s
            while len(self._waiting) < self.config.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    if not take(self._inbox.get(timeout=left)):
                        return False
                except queue.Empty:
                    break
        while True:
            try:
                if not take(self._inbox.get_nowait()):
                    return False
            except queue.Empty:
                return True

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._waiting if _cancelled(r)]:
            self._waiting.remove(req)
            _settle(req.future, exc=RequestCancelled())
        if any(_cancelled(r.req) for r in self._rows):
            for r in self._rows:
                if _cancelled(r.req):
                    r.finish = "cancelled"
            self._remove_finished()

    def _admit(self) -> None:
        free = self.config.max_batch - len(self._rows)
        if free <= 0 or not self._waiting:
            return
        if self._rows and not (self.config.continuous and self._splice_ok):
            return
        new = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        rows = [_Row(req, req.params.seed) for req in new]
        try:
            logits, cache, mask = self._prefill([r.req.prompt_ids for r in rows])
        except Exception as exc:
            for req in new:
                _settle(req.future, exc=exc)
            raise
        self._merge(cache, mask)
        self._rows.extend(rows)
        self._choose(rows, logits)
        self._remove_finished()

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, Any, Any]:
        import torch
        from transformers import DynamicCache

        unique: dict[tuple[int, ...], int] = {}
        expand = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        uniq = [list(k) for k in unique]
        width = max(len(p) for p in uniq)
        ids = torch.full((len(uniq), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(uniq), width), dtype=torch.long)
        for i, p in enumerate(uniq):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        with self.model_lock:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                             use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        if len(uniq) != len(prompts):
            index = torch.tensor(expand, dtype=torch.long)
            cache.batch_select_indices(index)
            logits, mask = logits[index], mask[index]
        return logits, cache, mask

    def _merge(self, cache: Any, mask: Any) -> None:
        """Splice a freshly prefilled cache into the running one (left-padding the shorter)."""
        import torch
        from transformers.cache_utils import DynamicLayer

        self._splice_ok = all(type(layer) is DynamicLayer for layer in cache.layers)
        if not self._rows:
            self._cache, self._mask = cache, mask
            return
        ta, tb = self._mask.shape[1], mask.shape[1]
        width = max(ta, tb)

        def lpad(x: torch.Tensor, t: int) -> torch.Tensor:
            if t == width:
                return x
            shape = list(x.shape)
            shape[-2 if x.dim() == 4 else -1] = width - t
            pad = torch.zeros(shape, dtype=x.dtype)
            return torch.cat([pad, x], dim=-2 if x.dim() == 4 else -1)

        for la, lb in zip(self._cache.layers, cache.layers):
            la.keys = torch.cat([lpad(la.keys, ta), lpad(lb.keys, tb)], dim=0)
            la.values = torch.cat([lpad(la.values, ta), lpad(lb.values, tb)], dim=0)
        self._mask = torch.cat([lpad(self._mask, ta), lpad(mask, tb)], dim=0)

    def _decode_step(self) -> None:
        import torch

        feed = torch.tensor([[r.pending] for r in self._rows], dtype=torch.long)
        pos = torch.tensor([[r.pos] for r in self._rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=torch.long)], dim=1)
        with self.model_lock:
            out = self.model(input_ids=feed, attention_mask=self._mask, position_ids=pos, cache=self._cache,
                             use_cache=True, logits_to_keep=1)
        for r in self._rows:
            r.pos += 1
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        self._choose(self._rows, out.logits[:, -1, :].float())
        self._remove_finished()

    def _choose(self, rows: list[_Row], scores: torch.Tensor) -> None:
        """Apply the hook, record logprobs, pick each row's next token and check for the end."""
        import torch

        if self.logits_processors:
            width = max(len(r.ids) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            for proc in self.logits_processors:
                scores = proc(ids, scores)
        forced: dict[int, int] = {}  # rows whose watermark drew the token itself (EXP on a sampled row)
        for i, r in enumerate(rows):
            row_proc: Any = r.req.row_processor
            if row_proc is None:
                continue
            if r.p.temperature > 0 and getattr(row_proc, "samples", False):
                tok = row_proc.choose(r.ids, len(r.ids) - len(r.gen), scores[i], r.p.temperature, r.p.top_p)
                if tok is not None:
                    forced[i] = tok
            else:
                scores[i] = row_proc(r.ids, scores[i])
        need_lp = any(r.p.logprobs for r in rows)
        logp = torch.log_softmax(scores, dim=-1) if need_lp else None
        k = max((r.p.top_logprobs for r in rows), default=0)
        top = torch.topk(logp, k, dim=-1) if (k and logp is not None) else None
        picks = torch.argmax(scores, dim=-1)
        sampled = [i for i, r in enumerate(rows) if r.p.temperature > 0]
        if sampled:
            index = torch.tensor(sampled, dtype=torch.long)
            picks[index] = sample_rows(scores[index], [rows[i].p.temperature for i in sampled],
                                       [rows[i].p.top_p for i in sampled], [rows[i].generator for i in sampled])
        for i, tok in forced.items():
            picks[i] = tok
        for i, r in enumerate(rows):
            tok = int(picks[i])
            r.pending = tok
            if tok in self.eos_ids:
                r.finish = "stop"
            else:
                r.ids.append(tok)
                r.gen.append(tok)
                if logp is not None and r.p.logprobs:
                    r.lps.append(float(logp[i, tok]))
                    kk = r.p.top_logprobs
                    if top is not None and kk:
                        r.top_ids.append(top.indices[i, :kk].tolist())
                        r.top_lps.append(top.values[i, :kk].tolist())
                r.text = self.tokenizer.decode(r.gen, skip_special_tokens=True)
                r.prefix_lens.append(len(r.text))
                cut = find_stop(r.text, r.p.stop) if r.p.stop else None
                if cut is not None:
                    r.finish = "stop"
                    r.text = r.text[:cut]
                    keep = tokens_covering(r.prefix_lens, cut)
                    for lst in (r.gen, r.lps, r.top_ids, r.top_lps, r.prefix_lens):
                        del lst[keep:]
                elif len(r.gen) >= r.p.max_tokens:
                    r.finish = "length"
            self._emit(r)

    def _emit(self, r: _Row) -> None:
        """Send newly committed text (and its tokens) to a streaming caller; resolve at the end."""
        if r.finish is not None:
            end_chars, end_tokens = len(r.text), len(r.gen)
        elif r.req.on_event is None:
            return
        else:
            end_chars = safe_prefix_len(r.text, r.p.stop)
            end_tokens = min(len(r.gen), _tokens_within(r.prefix_lens, end_chars))
        completion = self._completion(r) if r.finish is not None else None
        if r.req.on_event is not None and (end_chars > r.emitted_chars or end_tokens > r.emitted_tokens
                                           or completion is not None):
            a, b = r.emitted_tokens, end_tokens
            event = StepEvent(
                text=r.text[r.emitted_chars:end_chars], token_ids=r.gen[a:b],
                logprobs=r.lps[a:b], top_ids=r.top_ids[a:b], top_logprobs=r.top_lps[a:b],
                finish_reason=r.finish, completion=completion,
            )
            r.emitted_chars, r.emitted_tokens = end_chars, end_tokens
            try:
                r.req.on_event(event)
            except Exception:  # a broken consumer must not take the batch down
                log.exception("stream consumer failed; cancelling its request")
                r.req.cancelled.set()
        if completion is not None:
            _settle(r.req.future, completion)

    def _completion(self, r: _Row) -> Completion:
        lp = None
        if r.p.logprobs:
            tt = self.token_text
            lp = TokenLogprobs(
                tokens=[tt.text(t) for t in r.gen], logprobs=list(r.lps), token_ids=list(r.gen),
                top_tokens=[[tt.text(t) for t in ids] for ids in r.top_ids],
                top_logprobs=[list(v) for v in r.top_lps], top_ids=[list(ids) for ids in r.top_ids],
            )
        return Completion(text=r.text, finish_reason=r.finish,  # type: ignore[arg-type]
                          prompt_tokens=r.prompt_len, completion_tokens=len(r.gen),
                          token_ids=list(r.gen), logprobs=lp)

    def _remove_finished(self) -> None:
        import torch

        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        if len(keep) == len(self._rows):
            return
        for r in self._rows:
            if r.finish == "cancelled":
                _settle(r.req.future, exc=RequestCancelled())
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        lead = int((self._mask.sum(0) > 0).long().argmax())  # first column any row still uses
        if lead > 0 and self._splice_ok:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, lead:, :]
                layer.values = layer.values[:, :, lead:, :]


def _cancelled(req: Request) -> bool:
    """Cancelled through its handle, or its future cancelled by the caller (e.g. an asyncio wrapper)."""
    return req.cancelled.is_set() or req.future.cancelled()


def _settle(future: Future[Completion], result: Completion | None = None,
            exc: BaseException | None = None) -> None:
    """Resolve a caller's future unless it is already done.

    The caller may cancel the future from another thread at any moment (``asyncio.wrap_future``
    does when its task is cancelled), also between a ``done()`` check and ``set_result``; that
    race raised InvalidStateError here and failed every other row of the batch with it."""
    if future.done():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass  # cancelled by its caller meanwhile: nobody is waiting for this result


def _tokens_within(prefix_lens: list[int], n_chars: int) -> int:
    """How many leading tokens decode entirely within the first ``n_chars`` characters."""
    count = 0
    for length in prefix_lens:
        if length > n_chars:
            break
        count += 1
    return count


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                   tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids
