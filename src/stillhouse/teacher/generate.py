"""White-box batched generation: a local model completes many prompts in fixed batches.

What eval (every model's answers), train (scoring each pass on a validation set) and the
harvest of a local teacher (``HarvestConfig.local_batch``) run::

    from stillhouse.teacher.generate import chat_prompt_ids, generate
    prompts = [chat_prompt_ids(tok, messages) for messages in conversations]
    gens = generate(model, tok, prompts, max_new_tokens=16, batch_size=64, top_logprobs=20)
    gens[0].text, gens[0].token_ids, gens[0].finish_reason, gens[0].top_ids

Prompts are sorted by length (stable) and cut into batches of ``batch_size``, each left-padded.
When every prompt of a batch has the same length and they share a prefix (a chat template, a
system prompt, "What is "), the prefix runs once and its KV cache is copied across the batch
(HF ``generate`` continues from a given cache, its prefix-caching recipe): on 64 of the ceiling
experiment's teacher prompts (47 tokens, 38 shared) a batch took 8.7 s instead of 12.3 s with
the same greedy outputs (one thread, session 5); decoding is the rest.

Unlike the continuous batcher behind :class:`~stillhouse.teacher.local.LocalTeacher` (requests
join and leave a running batch; what ``serve`` uses), a batch here starts and ends together:
no stop strings and at most one logits processor, but a generation depends only on its batch, so a
rerun gives the same answers. ``top_logprobs`` are the model's own distribution (temperature 1)
at every generated position, the stop position included (one row more than ``token_ids`` when
the model stopped): a student trained on them learns to end its answer too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Generation:
    """One completion of one prompt."""

    text: str
    token_ids: list[int]
    """The completion's tokens, the stop token excluded."""
    finish_reason: str
    """'stop' (the model ended its turn) or 'length' (max_new_tokens reached)."""
    stop_id: int | None = None
    """The token that ended the completion (not in ``token_ids``), when it stopped."""
    logprobs: list[float] = field(default_factory=list)
    """Logprob of each token of ``token_ids`` (when logprobs were asked for)."""
    top_ids: list[list[int]] = field(default_factory=list)
    """The k most likely tokens at each position, the stop position included."""
    top_logprobs: list[list[float]] = field(default_factory=list)


def chat_prompt_ids(tok: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a chat prompt, ending with the assistant generation header."""
    ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def stop_ids(tok: Any) -> set[int]:
    """The tokens that end a turn: EOS, and ``<|im_end|>`` when the vocabulary has it."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id:
        ids.add(im_end)
    return ids


def generate(
    model: Any,
    tok: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    batch_size: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    logprobs: bool = False,
    top_logprobs: int = 0,
    seed: int | None = None,
    prefix_cache: bool = True,
    progress: Callable[[int], None] | None = None,
    logits_processor: Any = None,
) -> list[Generation]:
    """One completion per prompt (token-id lists), in the prompts' order.

    Batches of ``batch_size`` after a stable sort by length; sampling (``temperature > 0``) seeds
    torch with ``seed + i`` before the batch that starts at sorted position ``i``. ``progress``
    gets the number of prompts done after each batch. The model is put in eval mode meanwhile.
    ``logits_processor``: ``(input_ids, scores) -> scores`` applied at every step (a watermark).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            gens = generate_batch(model, tok, [prompts[i] for i in idx], max_new_tokens, temperature=temperature,
                                  top_p=top_p, logprobs=logprobs, top_logprobs=top_logprobs,
                                  seed=None if seed is None else seed + start, prefix_cache=prefix_cache,
                                  logits_processor=logits_processor)
            for i, g in zip(idx, gens):
                out[i] = g
            if progress is not None:
                progress(min(start + batch_size, len(order)))
    finally:
        model.train(was_training)
    return [g for g in out if g is not None]


def generate_batch(
    model: Any,
    tok: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int = 16,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    logprobs: bool = False,
    top_logprobs: int = 0,
    seed: int | None = None,
    prefix_cache: bool = True,
    logits_processor: Any = None,
) -> list[Generation]:
    """Complete ``prompts`` as one left-padded batch (see the module docstring). ``logprobs``: each
    token's logprob; ``top_logprobs`` (implies logprobs): the k most likely tokens at each position."""
    import torch

    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = stop_ids(tok)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p):] = 1
    if seed is not None:
        torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad,
                              "eos_token_id": sorted(stops) or None,
                              "return_dict_in_generate": True, "output_logits": logprobs or top_logprobs > 0}
    shared = _shared_prefix(prompts) if prefix_cache else 0
    if shared:
        with torch.inference_mode():
            cache = model(input_ids=input_ids[:1, :shared].to(device), use_cache=True).cache
        cache.batch_repeat_interleave(len(prompts))
        kwargs["cache"] = cache
    if logits_processor is not None:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([logits_processor])
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kwargs)
    seqs = out.sequences[:, width:].cpu()
    logp = topv = topi = None
    if logprobs or top_logprobs:
        logp = torch.log_softmax(torch.stack(out.logits, dim=1).float().cpu(), -1)  # (B, steps, V), temperature 1
    if logp is not None and top_logprobs:
        topv, topi = logp.topk(top_logprobs, dim=-1)
    results = []
    for i in range(len(prompts)):
        ids = seqs[i].tolist()
        n, finish, stop_id = len(ids), "length", None
        for j, t in enumerate(ids):
            if t in stops:
                n, finish, stop_id = j, "stop", t
                break
        g = Generation(tok.decode(ids[:n], skip_special_tokens=True), ids[:n], finish, stop_id)
        if logp is not None:
            g.logprobs = logp[i, torch.arange(n), seqs[i, :n]].tolist()
        if topv is not None and topi is not None:
            m = min(n + 1, len(ids))  # the stop position too: the student learns to end its answer
            g.top_ids = topi[i, :m].tolist()
            g.top_logprobs = [[round(x, 5) for x in row] for row in topv[i, :m].tolist()]
        results.append(g)
    return results


def _shared_prefix(prompts: Sequence[list[int]], min_len: int = 4) -> int:
    """Length of the prefix every prompt shares, kept at least one token short of the shortest prompt
    (generate needs a new token to start from); 0 when the prompts differ in length (left padding would
    shift the prefix) or share fewer than ``min_len`` tokens."""
    if len(prompts) < 2 or len({len(p) for p in prompts}) != 1:
        return 0
    n = 0
    for column in zip(*prompts):
        if any(t != column[0] for t in column):
            break
        n += 1
    n = min(n, len(prompts[0]) - 1)
    return n if n >= min_len else 0
