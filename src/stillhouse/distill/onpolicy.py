"""On-policy distillation (GKD, Agarwal et al. 2024): the student samples, the teacher scores the student's own
tokens, and the loss is a divergence between the two at each of those tokens.

    stillhouse train --loss gkd --data rationales.jsonl --teacher bundled --student pruned:10 --out runs/gkd
    stillhouse train --loss gkd --score-teacher http://127.0.0.1:8000/v1 ...     # black-box teacher

As TRL's ``GKDTrainer`` (``trl.experimental.gkd``): each step, with probability ``lmbda`` (0.5), the batch's
completions are replaced by the student's own samples (``gen_temperature`` 0.9, at most ``max_new_tokens``);
otherwise the data's completions are used as they are (off-policy). The loss on the completion tokens is the
generalized JSD with ``beta`` (0.5; 0 = forward KL, 1 = reverse KL) between teacher and student:

- **white-box** (``score_teacher`` empty): the local ``teacher``'s full next-token distribution at every
  completion position (:func:`stillhouse.distill.losses.generalized_jsd`);
- **black-box** (``score_teacher`` = an OpenAI-compatible base URL with ``POST /v1/score``, e.g.
  ``stillhouse serve``): the teacher's logprob of each completion token and its top-``score_top_k`` there,
  through :meth:`stillhouse.teacher.base.Teacher.score`. The teacher is known on the top-k ids plus the
  scored token; the rest of the vocabulary is one tail bucket on each side, and the loss is the generalized
  JSD between the bucketed distributions (:func:`~stillhouse.distill.losses.topk_generalized_jsd`, a lower
  bound of the dense one, equal when the ids cover the vocabulary). With ``score_top_k=0`` only the scored
  tokens' logprobs are asked for, and the loss is the sampled-token estimate of the reverse KL with its
  score-function gradient (:func:`~stillhouse.distill.losses.sampled_reverse_kl`). Black-box needs teacher
  and student to share a tokenizer (token ids are sent as they are).

The white-box target can be sharpened: ``teacher_temperature`` below 1 divides the teacher's logits alone, leaning
its distribution toward its greedy token at each of the student's positions (the on-policy counterpart of SFT on
greedy answers). On the reasoning task, at 100 prompts, GKD at teacher temperature 0.25 was 1.35x [1.21, 1.51] SFT
at equal teacher tokens over four fresh draws, where GKD at 1 was not above SFT (docs/results.md, "Reasoning").

The choice of on- or off-policy is a function of (seed, step), and the samples are seeded by step, so a run
resumed from a checkpoint draws what the uninterrupted run would have. This module holds the per-step pieces;
the loop, checkpoints and exports are :func:`stillhouse.distill.train.train`'s.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from stillhouse.distill.data import Example
from stillhouse.distill.losses import IGNORE_INDEX


def is_on_policy(seed: int, step: int, lmbda: float) -> bool:
    """Whether step ``step`` trains on the student's own samples (probability ``lmbda``, fixed by seed and step)."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda={lmbda}: must be in [0, 1]")
    return random.Random(seed * 1_000_003 + step).random() < lmbda


def prompt_length(ex: Example) -> int:
    """Tokens before the first labelled one (the prompt with its assistant header)."""
    for i, lab in enumerate(ex.labels):
        if lab != IGNORE_INDEX:
            return i
    return len(ex.labels)


def sample_completions(student: Any, tok: Any, examples: Sequence[Example], max_new_tokens: int,
                       temperature: float, seed: int, max_len: int) -> list[Example]:
    """``examples`` with their completions replaced by the student's samples (the stop token kept, so the
    student is scored on ending too), cut at ``max_len`` tokens."""
    from stillhouse.teacher.generate import generate

    prompts = [ex.input_ids[:prompt_length(ex)] for ex in examples]
    gens = generate(student, tok, prompts, max_new_tokens, batch_size=len(prompts), temperature=temperature,
                    seed=seed)
    out = []
    for p, g in zip(prompts, gens):
        comp = g.token_ids + ([g.stop_id] if g.stop_id is not None else [])
        if not comp:  # cannot happen with max_new_tokens >= 1; keep the batch well-formed anyway
            comp = [tok.eos_token_id]
        out.append(Example((p + comp)[:max_len], ([IGNORE_INDEX] * len(p) + comp)[:max_len]))
    return out


def completion_ids(ex: Example) -> tuple[list[int], list[int]]:
    """``(prompt ids, completion ids)`` of an example."""
    n = prompt_length(ex)
    return ex.input_ids[:n], ex.input_ids[n:]


def with_scores(ex: Example, token_ids: list[int], token_logprobs: list[float], top_ids: list[list[int]],
                top_logprobs: list[list[float]]) -> Example:
    """``ex`` with the teacher's scores of its completion as top-k rows: at each completion position the
    top-k ids and the scored token (added when the top-k lacks it), with their logprobs."""
    n = prompt_length(ex)
    ids: list[list[int]] = [[] for _ in ex.input_ids]
    lps: list[list[float]] = [[] for _ in ex.input_ids]
    for j, (t, lp) in enumerate(zip(token_ids, token_logprobs)):
        row_ids = list(top_ids[j]) if j < len(top_ids) else []
        row_lps = list(top_logprobs[j]) if j < len(top_logprobs) else []
        if t not in row_ids:
            row_ids.append(t)
            row_lps.append(lp)
        ids[n + j], lps[n + j] = row_ids, row_lps
    return Example(ex.input_ids, ex.labels, ids, lps)


class Scorer:
    """A black-box teacher's scores for batches of examples, through :meth:`Teacher.score` (HTTP for an
    ``http://`` spec) with at most ``concurrency`` requests in flight; one event loop for the whole run."""

    def __init__(self, spec: str, top_k: int = 20, concurrency: int = 8, teacher: Any = None):
        from stillhouse.teacher.spec import make_teacher

        if not 0 <= top_k <= 20:
            raise ValueError(f"top_k={top_k}: must be between 0 and 20")
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency}: must be at least 1")
        self.top_k, self.concurrency = top_k, concurrency
        self.teacher = teacher if teacher is not None else make_teacher(spec)
        self._runner = asyncio.Runner()
        self.tokens_scored = 0
        """Completion tokens the teacher has scored so far."""

    @property
    def k(self) -> int:
        """Width of the top-k rows :meth:`annotate` gives (the top-k plus the scored token)."""
        return self.top_k + 1

    def annotate(self, examples: Sequence[Example]) -> list[Example]:
        """The examples with the teacher's scores of their completions (:func:`with_scores`)."""
        return self._runner.run(self._annotate(list(examples)))

    async def _annotate(self, examples: list[Example]) -> list[Example]:
        sem = asyncio.Semaphore(self.concurrency)

        async def one(ex: Example) -> Example:
            prompt, comp = completion_ids(ex)
            async with sem:
                res = await self.teacher.score(prompt, comp, self.top_k)
            lp = res.logprobs
            if lp.token_ids is not None and lp.token_ids != comp:
                raise ValueError("the teacher scored other tokens than were sent: does it share the student's "
                                 "tokenizer?")
            if len(lp.logprobs) != len(comp) or (self.top_k and lp.top_ids is None):
                raise ValueError(f"the teacher at {getattr(self.teacher, 'base_url', self.teacher.name)} gave "
                                 f"{len(lp.logprobs)} logprobs for {len(comp)} tokens"
                                 + (" and no top-k token ids" if self.top_k and lp.top_ids is None else "")
                                 + ": black-box GKD needs POST /v1/score with token ids (stillhouse serve)")
            self.tokens_scored += len(comp)
            return with_scores(ex, comp, lp.logprobs, lp.top_ids or [], lp.top_logprobs or [])

        return list(await asyncio.gather(*(one(ex) for ex in examples)))

    def close(self) -> None:
        """Close the teacher's connections and the event loop."""
        try:
            self._runner.run(self.teacher.aclose())
        finally:
            self._runner.close()


def gkd_loss(cfg: Any, logits: Any, batch: dict[str, Any], sel: tuple[Any, Any], mask: Any,
             teacher_logits: Any | None) -> Any:
    """The GKD divergence at the selected completion positions (see the module docstring)."""
    from stillhouse.distill import losses as L

    if teacher_logits is not None:
        return L.generalized_jsd(logits, teacher_logits, mask, cfg.beta, cfg.temperature)
    rows, cols = sel
    top_ids = batch["top_ids"][rows, cols + 1].unsqueeze(0)
    top_lps = batch["top_logprobs"][rows, cols + 1].unsqueeze(0)
    if cfg.score_top_k == 0:
        targets = batch["labels"][rows, cols + 1].unsqueeze(0)
        return L.sampled_reverse_kl(logits, targets, top_lps[..., 0], mask, cfg.temperature)
    return L.topk_generalized_jsd(logits, top_ids, top_lps, mask, cfg.beta, cfg.temperature)
