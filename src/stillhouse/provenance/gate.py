"""The teacher's view of an answer at detection time: the entropy gate, and each token's probability.

The teacher reads prompt plus answer once (teacher-forced, one forward pass per batch) and reports, before each
answer token, its next-token entropy (the gate) and the probability it gave that token at the sampling temperature
(the weighted score's evidence, :func:`stillhouse.provenance.detect.llr_weight`).

With ``WatermarkParams.entropy > 0`` (SWEET, Lee et al. 2023) generation biases only the positions
whose next-token entropy under the teacher is above the threshold, so detection scores only those:
the teacher reads prompt plus answer once (teacher-forced, one forward pass per batch) and the
entropy of its distribution before each answer token decides whether that token is scored.

Validity does not depend on the gate matching generation exactly: the gate is a function of the
text and the teacher, never of the key, so under the null hypothesis the scored tuples' green bits
stay independent Bernoulli(gamma) and the binomial test stays exact. A mismatch (the prompt not
known, float rounding at the threshold) only costs power.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stillhouse.progress import StepProgress


@dataclass
class AnswerView:
    """What the teacher saw before each answer token; ``nan`` for the first token of an answer with no prompt."""

    entropy: list[float]
    """Next-token entropy (nats) at temperature 1, as the gate measures it."""
    prob: list[float]
    """The probability of the token that was written, at the sampling temperature."""


def answer_views(model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                 temperature: float | Sequence[float] = 1.0, batch_size: int = 8, pad_id: int = 0,
                 progress: StepProgress | None = None) -> list[AnswerView]:
    """For each ``(prompt ids, answer ids)``: the teacher's :class:`AnswerView` of every answer token, the
    probabilities at ``temperature`` (one for all rows, or one per row); ``progress`` hears of each batch.

    Position ``i`` describes the distribution that predicts ``answer[i]`` (from the prompt and ``answer[:i]``)."""
    import torch

    from stillhouse.watermark.green import next_token_entropy

    temps = [float(temperature)] * len(rows) if isinstance(temperature, (int, float)) else list(temperature)
    if len(temps) != len(rows):
        raise ValueError(f"{len(temps)} temperatures for {len(rows)} answers")
    for t in temps:
        if not t > 0:
            raise ValueError(f"temperature={t}: the answers' sampling temperature must be > 0 (1 if unknown)")
    out: list[AnswerView] = []
    for start in range(0, len(rows), batch_size):
        chunk = [(list(p), list(a)) for p, a in rows[start:start + batch_size]]
        width = max(len(p) + len(a) for p, a in chunk)
        if width == 0:
            out.extend(AnswerView([], []) for _ in chunk)
            continue
        batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (p, a) in enumerate(chunk):
            ids = p + a
            batch[j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[j, :len(ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()
            ent = next_token_entropy(logits)
            nxt = torch.cat([batch[:, 1:], batch[:, :1]], dim=1)  # position t predicts token t + 1
            temp = torch.tensor(temps[start:start + len(chunk)], dtype=logits.dtype)[:, None, None]
            prob = torch.log_softmax(logits / temp, dim=-1).gather(-1, nxt[..., None])[..., 0].exp()
        for j, (p, a) in enumerate(chunk):
            pos = [len(p) + i - 1 for i in range(len(a))]
            e, q = ent[j].tolist(), prob[j].tolist()
            out.append(AnswerView([e[t] if t >= 0 else float("nan") for t in pos],
                                  [q[t] if t >= 0 else float("nan") for t in pos]))
        if progress is not None:
            progress("teacher reads the answers", len(out), len(rows))
    return out


def gate_masks(views: Sequence[AnswerView], threshold: float) -> list[list[bool]]:
    """Which answer tokens are scored: entropy above ``threshold`` (every token when it is 0)."""
    if threshold <= 0:
        return [[True] * len(v.entropy) for v in views]
    return [[h > threshold for h in v.entropy] for v in views]  # nan (no context) compares False
