"""The entropy gate at detection time: which answer tokens the watermark could have biased.

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
from typing import Any


def answer_entropies(model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                     pad_id: int = 0) -> list[list[float]]:
    """For each ``(prompt ids, answer ids)``: the model's next-token entropy (nats) before every answer token.

    ``out[j][i]`` is the entropy of the distribution that predicts ``answer[i]`` (from the prompt and
    ``answer[:i]``); the first answer token needs a non-empty prompt, else its entropy is ``nan``."""
    import torch

    from stillhouse.watermark.green import next_token_entropy

    out: list[list[float]] = []
    for start in range(0, len(rows), batch_size):
        chunk = [(list(p), list(a)) for p, a in rows[start:start + batch_size]]
        width = max(len(p) + len(a) for p, a in chunk)
        if width == 0:
            out.extend([] for _ in chunk)
            continue
        batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (p, a) in enumerate(chunk):
            ids = p + a
            batch[j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[j, :len(ids)] = 1
        with torch.inference_mode():
            ent = next_token_entropy(model(input_ids=batch, attention_mask=mask, use_cache=False).logits)
        for j, (p, a) in enumerate(chunk):
            row = ent[j].tolist()
            out.append([row[len(p) + i - 1] if len(p) + i >= 1 else float("nan") for i in range(len(a))])
    return out


def gate_masks(entropies: Sequence[Sequence[float]], threshold: float) -> list[list[bool]]:
    """Which answer tokens are scored: entropy above ``threshold`` (every token when it is 0)."""
    if threshold <= 0:
        return [[True] * len(e) for e in entropies]
    return [[h > threshold for h in e] for e in entropies]  # nan (no context) compares False
