"""Distillation losses as plain functions of tensors.

Conventions shared by every function here:

* ``*_logits`` are ``(B, T, V)`` and already aligned with their targets: position ``t``
  of the logits is scored against position ``t`` of ``labels`` / the teacher tensors
  (use :func:`shift_for_next_token` to align a causal LM's output with its inputs).
* ``mask`` is a ``(B, T)`` bool tensor of the positions that count (assistant tokens).
* Every loss is the mean over the masked positions of a per-position quantity; the
  per-position KL/JSD sums over the vocabulary. A mask with no True entry gives 0.

The losses:

* :func:`sft_loss` - sequence-level KD: cross-entropy on the teacher's text.
* :func:`forward_kl` - KL(teacher || student), mode-covering (classic Hinton KD).
* :func:`reverse_kl` - KL(student || teacher), mode-seeking (MiniLLM).
* :func:`generalized_jsd` - TRL's ``generalized_jsd_loss``: beta=0 is forward KL,
  beta=1 reverse KL, in between the beta-skewed Jensen-Shannon divergence.
* :func:`topk_kd` - forward KL against harvested top-k logprobs with one tail bucket,
  for API teachers that give only the k most likely tokens at each position.
* :func:`mix_losses` - ``alpha * CE + (1 - alpha) * KD``, returning both terms so the
  known weak spot (a KD term too small beside CE to matter) is visible in every log.

On-policy distillation (GKD, Agarwal et al. 2024; :mod:`stillhouse.distill.onpolicy`) scores the
student's own samples. A white-box teacher gives its full distribution at each of them, so the dense
:func:`generalized_jsd` applies. A black-box teacher (``POST /v1/score``) gives only the log-probability
of each sampled token and its top-k, for which:

* :func:`topk_generalized_jsd` - the generalized JSD between the two distributions folded onto the
  teacher's known tokens plus one tail bucket (the rest of the vocabulary): every beta, forward KL
  (beta=0, equal to :func:`topk_kd`) and reverse KL (beta=1) included. Folding never increases a
  divergence, so this is a lower bound of the dense one, equal to it when the known tokens cover the
  vocabulary;
* :func:`sampled_reverse_kl` - the Monte-Carlo reverse KL from the sampled tokens alone (no top-k),
  with the score-function gradient, as on-policy distillation with an API's logprobs does.

Temperature follows TRL: both distributions are softened by dividing logits by T, and
the loss is not rescaled by T^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported inside functions so that importing this module stays cheap
    import torch

IGNORE_INDEX = -100
"""Label value for positions that carry no loss (prompt tokens, padding)."""


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0) or math.isinf(temperature):
        raise ValueError(f"temperature={temperature}: must be a positive finite number (1.0 = no softening)")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, T) over ``mask`` (B, T); 0 (with a graph) when nothing is masked in."""
    if values.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(values.shape)}")
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a causal LM's ``logits`` (B, T, V) with next-token ``labels`` (B, T).

    Returns ``(logits[:, :-1], labels[:, 1:])``, so that position t predicts token t+1.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    return logits[:, :-1, :], labels[:, 1:]


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Token-level cross-entropy on positions whose label is not ``ignore_index``.

    Sequence-level KD is exactly this, on the teacher's generated text, with the prompt
    tokens set to ``ignore_index`` (assistant-only loss).
    """
    import torch.nn.functional as F

    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    mask = labels != ignore_index
    per_pos = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).reshape(labels.shape)
    return _masked_mean(per_pos, mask)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    import torch.nn.functional as F

    _check_temperature(temperature)
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _jsd_per_position(s: torch.Tensor, t: torch.Tensor, beta: float,
                      kl: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """beta KL(t || m) + (1 - beta) KL(s || m), m = (1 - beta) s + beta t as a mixture of probabilities (log space,
    ``s`` and ``t`` log-probabilities); ``kl(log_p, log_q)`` is the per-position KL over the vocabulary or buckets."""
    import torch

    log_m = torch.logsumexp(torch.stack([s + math.log(1.0 - beta), t + math.log(beta)]), dim=0)
    return beta * kl(t, log_m) + (1.0 - beta) * kl(s, log_m)


def _kl_per_position(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last axis, with 0 * log 0 = 0."""
    import torch

    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _paired_log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs at one temperature; dense KD needs one shared vocabulary."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ: the two models must share a tokenizer (vocabulary) for dense KD"
        )
    return _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over masked positions of KL(teacher || student)."""
    s, t = _paired_log_probs(student_logits, teacher_logits, temperature)
    return _masked_mean(_kl_per_position(t, s), mask)


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over masked positions of KL(student || teacher)."""
    s, t = _paired_log_probs(student_logits, teacher_logits, temperature)
    return _masked_mean(_kl_per_position(s, t), mask)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The generalized Jensen-Shannon divergence of GKD (as TRL's ``generalized_jsd_loss``).

    With the mixture M = beta * teacher + (1 - beta) * student (in probability space),
    the loss is ``beta * KL(teacher || M) + (1 - beta) * KL(student || M)``; the
    end points are defined as the KLs they tend to in TRL: beta=0 gives forward KL
    KL(teacher || student) and beta=1 gives reverse KL KL(student || teacher).
    """
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta={beta}: must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    s, t = _paired_log_probs(student_logits, teacher_logits, temperature)
    return _masked_mean(_jsd_per_position(s, t, beta, _kl_per_position), mask)


def topk_kd(
    student_logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    tail_eps: float = 1e-12,
) -> torch.Tensor:
    """Forward KL from a teacher known only through its top-k logprobs, with a tail bucket.

    ``top_ids`` (B, T, K) are the teacher's k most likely token ids at each position and
    ``top_logprobs`` (B, T, K) their log-probabilities (as harvested, at temperature 1).
    Entries of ``-inf`` mark unused slots (probability 0), so a position with fewer than
    K candidates can be padded. The teacher's distribution becomes K + 1 buckets: its
    top-k tokens plus one tail holding ``1 - sum(top-k)``; the student's distribution is
    folded onto the same buckets (its probabilities of those ids, and all the rest as
    its tail). The loss is KL(teacher buckets || student buckets). With K equal to the
    vocabulary size the tail is empty and this equals :func:`forward_kl`.

    ``temperature`` softens only the student (harvested teacher logprobs cannot be
    re-tempered without the full distribution); keep it at 1 unless you mean that.
    """
    import torch

    if top_ids.shape != top_logprobs.shape:
        raise ValueError(f"top_ids {tuple(top_ids.shape)} and top_logprobs {tuple(top_logprobs.shape)} differ")
    if top_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"top-k tensors {tuple(top_ids.shape)} and student logits {tuple(student_logits.shape)} "
            "disagree on (B, T)"
        )
    if top_ids.shape[-1] > student_logits.shape[-1]:
        raise ValueError(f"k={top_ids.shape[-1]} exceeds the vocabulary size {student_logits.shape[-1]}")
    s = _log_probs(student_logits, temperature)
    t_lp = top_logprobs.float()
    used = torch.isfinite(t_lp)
    # Padding slots point at id 0; they carry no teacher mass and are excluded from the student's sum.
    ids = torch.where(used, top_ids, torch.zeros_like(top_ids)).long()
    s_top = torch.gather(s, -1, ids)
    # A large finite negative (not -inf) keeps logsumexp and its gradient finite even at
    # positions where every slot is padding.
    s_top = torch.where(used, s_top, torch.full_like(s_top, -1e9))
    t_lp = torch.where(used, t_lp, torch.zeros_like(t_lp))

    t_p = torch.where(used, t_lp.exp(), torch.zeros_like(t_lp))
    kl_top = (t_p * (t_lp - s_top)).sum(-1)

    t_tail = (1.0 - t_p.sum(-1)).clamp(min=0.0)
    s_in = torch.logsumexp(s_top, dim=-1).clamp(max=0.0)
    # log(1 - exp(x)) for x <= 0, clamped so an empty tail never produces inf/nan gradients.
    s_tail_log = torch.log((-torch.expm1(s_in)).clamp(min=tail_eps))
    t_tail_log = torch.log(t_tail.clamp(min=tail_eps))
    kl_tail = torch.where(t_tail > tail_eps, t_tail * (t_tail_log - s_tail_log), torch.zeros_like(t_tail))
    return _masked_mean(kl_top + kl_tail, mask)


def mix_losses(ce: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * ce + (1 - alpha) * kd``; alpha=1 is plain SFT, alpha=0 pure KD."""
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha={alpha}: must be in [0, 1] (weight of the cross-entropy term)")
    return alpha * ce + (1.0 - alpha) * kd


def _log1mexp(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, floored at ``log(eps)`` so an empty bucket keeps finite gradients."""
    import torch

    return torch.log((-torch.expm1(x.clamp(max=0.0))).clamp(min=eps))


def topk_buckets(
    student_logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    temperature: float = 1.0,
    tail_eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities on K + 1 buckets: the K known ids and one tail.

    Returns ``(teacher (B, T, K+1), student (B, T, K+1), used (B, T, K+1) bool)``; the last bucket is
    the tail. Slots whose teacher logprob is ``-inf`` are padding: unused, excluded from both sides.
    A bucket with (near) zero mass holds ``log(tail_eps)``; ``used`` is False there and it carries
    no loss. Ids must be distinct within a position.
    """
    import torch

    if top_ids.shape != top_logprobs.shape:
        raise ValueError(f"top_ids {tuple(top_ids.shape)} and top_logprobs {tuple(top_logprobs.shape)} differ")
    if top_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"top-k tensors {tuple(top_ids.shape)} and student logits {tuple(student_logits.shape)} "
                         "disagree on (B, T)")
    if top_ids.shape[-1] > student_logits.shape[-1]:
        raise ValueError(f"k={top_ids.shape[-1]} exceeds the vocabulary size {student_logits.shape[-1]}")
    s = _log_probs(student_logits, temperature)
    t_lp = top_logprobs.float()
    used = torch.isfinite(t_lp)
    ids = torch.where(used, top_ids, torch.zeros_like(top_ids)).long()
    floor = math.log(tail_eps)
    s_top = torch.where(used, torch.gather(s, -1, ids), torch.full_like(t_lp, -1e9))
    t_top = torch.where(used, t_lp, torch.full_like(t_lp, -1e9))
    t_tail = _log1mexp(torch.logsumexp(t_top, -1), tail_eps)
    s_tail = _log1mexp(torch.logsumexp(s_top, -1), tail_eps)
    teacher = torch.cat([torch.where(used, t_top, torch.full_like(t_top, floor)), t_tail.unsqueeze(-1)], -1)
    student = torch.cat([torch.where(used, s_top, torch.full_like(s_top, floor)), s_tail.unsqueeze(-1)], -1)
    used_all = torch.cat([used, (t_tail > floor + 1e-6).unsqueeze(-1)], -1)
    return teacher, student, used_all


def topk_generalized_jsd(
    student_logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`generalized_jsd` between a teacher known through top-k logprobs and the student, on
    K + 1 buckets (:func:`topk_buckets`: the known ids and a tail holding the rest of each side's mass).

    beta=0 is the bucketed forward KL (:func:`topk_kd`), beta=1 the bucketed reverse KL. With every id
    known (K = V) the tail is empty and this equals the dense loss. ``temperature`` softens the student
    only (the teacher's logprobs arrive at temperature 1).
    """
    import torch

    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta={beta}: must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
    t, s, used = topk_buckets(student_logits, top_ids, top_logprobs, temperature)
    zero = torch.zeros_like(t)

    def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # KL(p || q) over the used buckets
        return torch.where(used, log_p.exp() * (log_p - log_q), zero).sum(-1)

    if beta == 0.0:
        per_pos = kl(t, s)
    elif beta == 1.0:
        per_pos = kl(s, t)
    else:
        per_pos = _jsd_per_position(s, t, beta, kl)
    return _masked_mean(per_pos, mask)


def sampled_reverse_kl(
    student_logits: torch.Tensor,
    tokens: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Reverse KL estimated from the student's own sampled ``tokens`` (B, T) and the teacher's logprob of
    each (B, T): no top-k needed.

    The value is the mean over masked positions of ``log s(y) - log t(y)`` (an unbiased estimate of
    KL(student || teacher) per position when ``y`` was sampled from the student at this temperature);
    the gradient is the score-function one, ``(log s(y) - log t(y)) * grad log s(y)``, per position
    (each token's own term; later tokens' terms are not credited back to it).
    """
    import torch

    if tokens.shape != student_logits.shape[:2] or teacher_token_logprobs.shape != tokens.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)}, teacher logprobs {tuple(teacher_token_logprobs.shape)} "
                         f"and student logits {tuple(student_logits.shape)} disagree on (B, T)")
    s = torch.gather(_log_probs(student_logits, temperature), -1, tokens.clamp(min=0).long().unsqueeze(-1))
    s = s.squeeze(-1)
    gap = (s - teacher_token_logprobs.float()).detach()
    surrogate = gap * s
    return _masked_mean(surrogate - surrogate.detach() + gap, mask)
