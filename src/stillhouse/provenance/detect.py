"""Score token sequences against candidate keys: deduplicated tuples, exact tests, family-wise control.

The unit of evidence is a **scored tuple** ``(w_1..w_h, t)``: a token with the ``h`` tokens before it.
Under the null hypothesis (the text never saw key ``k``) the green bits of *distinct* tuples are
independent Bernoulli(gamma), so the number of green tuples among the ``N`` distinct ones is
Binomial(N, gamma) and ``P(X >= green)`` is an exact p-value. Repeated tuples are counted once
(a repeated phrase would otherwise count its green bits again and push clean text to tiny
p-values), and tuples that also occur in the prompt are dropped (text copied from a watermarked
prompt carries the prompt's bias, not the answerer's).

**Weighted score** (``levels``): tokens do not carry equal evidence. A token the sampler would have picked anyway
(probability near 1) is green at rate gamma whether or not the text is watermarked; a token it picked against the
odds is green far more often under the watermark. :func:`llr_weight` is the log-likelihood ratio of "green" under
the watermarked sampler against "red", from the token's probability under the teacher at the sampling temperature
(so from text and teacher, never the key); quantised to :data:`WEIGHT_LEVELS` integer levels it weights each
distinct tuple, and ``P(sum of weights of green tuples >= observed)`` under independent Bernoulli(gamma) green bits
is exact (:func:`stillhouse.provenance.stats.log_weighted_sf`). Wrong probabilities (another temperature, a
mismatched teacher) cost power, never validity. Measured (docs/results.md, "the weighted score"): p < 1e-5 within
200 tokens for 82/96 development answers against 72/96 counted, then 78/96 against 71/96 on the held-out split.

**EXP** (answers sampled under ``scheme="exp"``, :mod:`stillhouse.watermark.green`): each distinct tuple's
``-log u(k, w, t)`` is Exp(1) under the null, so their sum over ``n`` tuples has the exact Gamma(n, 1) tail
(:func:`stillhouse.provenance.stats.log_gamma_sf`). Scored are the tuples whose window occurs first in the answer
(EXP keyed only those) and whose token the teacher gave less than :data:`EXP_MAX_PROB` at the sampling temperature
(a token it would have written anyway carries little evidence): a choice from text and teacher, never the key. A body
with greedy answers (KGW-scored) and sampled ones (EXP-scored) combines the two tests' p-values by Fisher's exact
rule for two; the tuples are distinct across both.

``score_keys`` tests every candidate on the same tuples and corrects for trying K keys (Holm; the
Bonferroni figure is reported too): the best key is named only as strongly as its adjusted p-value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from stillhouse.provenance.stats import (
    bonferroni,
    holm,
    log_binom_sf,
    log_fisher2,
    log_gamma_sf,
    log_weighted_sf,
    z_score,
)
from stillhouse.watermark.green import WatermarkParams, first_windows, green_flags, scored_tuples, uniform

Tuple = tuple[int, ...]

GREEDY_TEMPERATURE = 0.1
"""Greedy answers (temperature 0) are weighed as if sampled at this: a token that is not the teacher's first choice
(written only because the watermark raised it) counts fully, its first choice by a clear margin about nothing."""

EXP_MAX_PROB = 0.7
"""EXP scores a token only if the teacher gave it less than this at the sampling temperature. Chosen on 96
development answers at T 0.7 (p < 1e-5 within 200 tokens: 91/96 with it, 81/96 scoring every first window; 0.9
gave 89/96, an entropy gate of 1 nat 88/96), docs/results.md "EXP"."""

WEIGHT_LEVELS = 16
"""Integer weight levels of the weighted score (a token's evidence rounded to 1/16 of the most a token can carry;
4 levels scored the development answers within 0.2 of log10 p of 16)."""


@dataclass
class KeyScore:
    """One candidate key's evidence on one body of text."""

    key_id: str
    scored: int
    """Distinct tuples scored."""
    green: int
    """Of them, green under this key."""
    p: float
    """Exact one-sided binomial p-value, ``P(Binomial(scored, gamma) >= green)``."""
    p_holm: float = 1.0
    """``p`` adjusted for the keys tried (Holm)."""
    p_bonferroni: float = 1.0
    """``p`` adjusted for the keys tried (Bonferroni)."""
    z: float = 0.0
    """KGW's z-score, for comparison only."""
    log10_p: float = 0.0
    """``log10(p)``, finite where ``p`` itself underflows to 0."""
    test: str = "binomial"
    """binomial (every tuple counts 1), weighted (each tuple's weight level; ``p`` is that sum's exact tail), exp
    (the Gamma tail of ``sum -log u``; ``green`` still counts ``u < gamma``), or ``exp+binomial``/``exp+weighted``
    (Fisher's combination of the two, over disjoint tuples)."""

    @property
    def rate(self) -> float:
        return self.green / self.scored if self.scored else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate}


def prompt_tuples(prompts: Iterable[Sequence[int]], context: int) -> set[Tuple]:
    """Every tuple of the prompts (to drop from what is scored)."""
    out: set[Tuple] = set()
    for ids in prompts:
        out.update(scored_tuples(list(ids), context))
    return out


def unique_positions(seqs: Sequence[Sequence[int]], context: int,
                     exclude: set[Tuple] | frozenset[Tuple] = frozenset(), dedup: bool = True,
                     keep: Sequence[Sequence[bool]] | None = None) -> list[tuple[int, int]]:
    """Where the tuples to score end, ``(sequence j, token i)`` in first-seen order: each distinct tuple once (at its
    first occurrence), none from ``exclude``.

    ``keep[j][i]`` (the entropy gate, :mod:`.gate`) says whether token ``i`` of sequence ``j`` is scored."""
    seen: set[Tuple] = set()
    out: list[tuple[int, int]] = []
    for j, ids in enumerate(seqs):
        gate = keep[j] if keep is not None else None
        if gate is not None and len(gate) != len(ids):
            raise ValueError(f"keep[{j}] has {len(gate)} flags for {len(ids)} tokens")
        for i in range(context, len(ids)):
            if gate is not None and not gate[i]:
                continue
            tup = tuple(ids[i - context:i + 1])
            if tup in exclude or (dedup and tup in seen):
                continue
            seen.add(tup)
            out.append((j, i))
    return out


def unique_tuples(seqs: Iterable[Sequence[int]], context: int, exclude: set[Tuple] | frozenset[Tuple] = frozenset(),
                  dedup: bool = True, keep: Sequence[Sequence[bool]] | None = None) -> list[Tuple]:
    """The tuples to score (:func:`unique_positions`), in first-seen order."""
    seqs = [list(ids) for ids in seqs]
    return select(seqs, range(len(seqs)), context, exclude, dedup, keep).tuples


@dataclass
class Selection:
    """The distinct tuples to score and, for the weighted score, each one's weight level (None: count them)."""

    tuples: list[Tuple]
    levels: list[int] | None = None
    exp: list[bool] | None = None
    """Which tuples the EXP score takes (answers sampled under the exp scheme); None: none of them."""


def select(seqs: Sequence[Sequence[int]], rows: Sequence[int], context: int,
           exclude: set[Tuple] | frozenset[Tuple] = frozenset(), dedup: bool = True,
           keep: Sequence[Sequence[bool]] | None = None, levels: Sequence[Sequence[int]] | None = None,
           exp: Sequence[bool] | None = None) -> Selection:
    """:func:`unique_positions` of ``seqs[rows]`` as a :class:`Selection`; ``levels[j][i]`` is token ``i`` of
    sequence ``j``'s weight level (:func:`weight_levels`), ``keep`` the gate, both indexed like ``seqs``;
    ``exp[j]`` whether sequence ``j`` is EXP-scored."""
    part = [seqs[j] for j in rows]
    pos = unique_positions(part, context, exclude, dedup, None if keep is None else [keep[j] for j in rows])
    return Selection([tuple(part[a][i - context:i + 1]) for a, i in pos],
                     None if levels is None else [levels[rows[a]][i] for a, i in pos],
                     None if exp is None or not any(exp) else [bool(exp[rows[a]]) for a, _ in pos])


def llr_weight(prob: float, delta: float, gamma: float) -> float:
    """``log P(token | green) / P(token | red)`` under a sampler that adds ``delta`` (already divided by the sampling
    temperature) to the green logits, for a token of probability ``prob`` without the watermark; the rest of the
    green list is taken at its mean mass ``gamma (1 - prob)``. ``delta`` at ``prob`` 0, falling to 0 at ``prob`` 1."""
    a = math.expm1(delta)
    q = min(max(prob, 0.0), 1.0)
    return delta + math.log1p(a * gamma * (1.0 - q)) - math.log1p(a * (gamma + (1.0 - gamma) * q))


def weight_levels(probs: Sequence[float], delta: float, gamma: float, levels: int = WEIGHT_LEVELS) -> list[int]:
    """Each token's :func:`llr_weight` as an integer ``0..levels`` (``levels`` = ``delta``, the most a token carries);
    a token with no probability (``nan``: no context before it) gets 0."""
    if delta <= 0:
        raise ValueError(f"delta={delta}: the weighted score needs the watermark's delta (> 0)")
    return [0 if math.isnan(q) else round(levels * llr_weight(q, delta, gamma) / delta) for q in probs]


def exp_keep(ids: Sequence[int], probs: Sequence[float], context: int,
             max_prob: float = EXP_MAX_PROB) -> list[bool]:
    """Which tokens of an EXP-sampled answer are scored: first occurrence of their window, teacher's probability
    below ``max_prob`` (:data:`EXP_MAX_PROB`; ``nan``, no context before the token: not scored)."""
    return [f and q < max_prob for f, q in zip(first_windows(ids, context), probs)]


def binomial_score(green: int, n: int, params: WatermarkParams, key_id: str = "") -> KeyScore:
    """``green`` green ones among ``n`` distinct tuples (or (key, tuple) triples): the exact binomial p-value."""
    gamma = params.threshold / float(1 << 53)  # the exact green probability
    log_p = log_binom_sf(green, n, gamma) if n else 0.0
    return KeyScore(key_id, n, green, math.exp(log_p), z=z_score(green, n, gamma), log10_p=log_p / math.log(10))


def weighted_score(flags: Sequence[bool], levels: Sequence[int], params: WatermarkParams, key_id: str = "") -> KeyScore:
    """Green bits of distinct tuples with their weight levels: the exact tail of the green tuples' summed weight."""
    if len(flags) != len(levels):
        raise ValueError(f"{len(levels)} weight levels for {len(flags)} tuples")
    top = max(levels, default=0)
    counts, greens = [0] * (top + 1), [0] * (top + 1)
    for g, u in zip(flags, levels):
        counts[u] += 1
        greens[u] += bool(g)
    gamma = params.threshold / float(1 << 53)
    log_p = log_weighted_sf(counts, greens, gamma)
    green, n = sum(greens), len(flags)
    return KeyScore(key_id, n, green, math.exp(log_p), z=z_score(green, n, gamma), log10_p=log_p / math.log(10),
                    test="weighted")


def green_test(flags: Sequence[bool], params: WatermarkParams, key_id: str = "",
               levels: Sequence[int] | None = None) -> KeyScore:
    """The green-list test on distinct tuples' (or triples') green bits: weighted when ``levels`` are given, else
    the binomial count."""
    if levels is not None:
        return weighted_score(flags, levels, params, key_id)
    return binomial_score(sum(flags), len(flags), params, key_id)


def exp_score(key: int, tuples: Sequence[Tuple], params: WatermarkParams, key_id: str = "") -> KeyScore:
    """The EXP test of one key on distinct tuples: ``P(Gamma(n, 1) >= sum -log u)``."""
    return score_uniforms([uniform(key, t) for t in tuples], params, key_id, exp=[True] * len(tuples))


def score_uniforms(us: Sequence[float], params: WatermarkParams, key_id: str = "", levels: Sequence[int] | None = None,
                   exp: Sequence[bool] | None = None) -> KeyScore:
    """The exact test on distinct tuples' uniforms ``u`` under one key (green <=> ``u < gamma``, exactly): the
    green-list test (weighted when ``levels`` are given), the EXP test on the tuples flagged in ``exp``, Fisher's
    combination of the two when both kinds are there."""
    gamma = params.threshold / float(1 << 53)  # the exact green probability: u < gamma <=> green
    if exp is not None and any(exp):
        sampled = [u for u, e in zip(us, exp) if e]
        total = sum(-math.log(u) if u > 0 else 745.0 for u in sampled)  # u = 0 has probability 2**-53
        log_p = log_gamma_sf(len(sampled), total)
        green = sum(u < gamma for u in sampled)
        test = "exp"
        if not all(exp):
            rest = [i for i, e in enumerate(exp) if not e]
            other = score_uniforms([us[i] for i in rest], params, key_id,
                                   None if levels is None else [levels[i] for i in rest])
            log_p = log_fisher2(log_p, other.log10_p * math.log(10))
            green += other.green
            test = f"exp+{other.test}"
        return KeyScore(key_id, len(us), green, math.exp(log_p), z=z_score(green, len(us), gamma),
                        log10_p=log_p / math.log(10), test=test)
    return green_test([u < gamma for u in us], params, key_id, levels)


def score_key(key: int, tuples: Sequence[Tuple], params: WatermarkParams, key_id: str = "",
              levels: Sequence[int] | None = None, exp: Sequence[bool] | None = None) -> KeyScore:
    """Green count and exact p-value of one key on already-deduplicated tuples (weighted when ``levels`` are given);
    the tuples flagged in ``exp`` take the EXP test, combined with the rest's by Fisher when both are there."""
    if exp is not None and any(exp):
        return score_uniforms([uniform(key, t) for t in tuples], params, key_id, levels, exp)
    return green_test(green_flags(key, tuples, params), params, key_id, levels)


def adjust(scores: Sequence[KeyScore]) -> None:
    """Holm and Bonferroni over every hypothesis in ``scores`` together (in place)."""
    ps = [s.p for s in scores]
    for s, ph, pb in zip(scores, holm(ps), bonferroni(ps)):
        s.p_holm, s.p_bonferroni = ph, pb


def score_keys(tuples: Sequence[Tuple], keys: Mapping[str, int], params: WatermarkParams,
               levels: Sequence[int] | None = None, exp: Sequence[bool] | None = None) -> list[KeyScore]:
    """Every candidate on the same tuples (weight levels, EXP flags), Holm- and Bonferroni-adjusted, best (smallest
    p) first."""
    scores = [score_key(k, tuples, params, kid, levels, exp) for kid, k in keys.items()]
    adjust(scores)
    return sorted(scores, key=lambda s: (s.p, -s.rate, s.key_id))


def tokens_to_detect(ids: Sequence[int], key: int, params: WatermarkParams, alpha: float,
                     keep: Sequence[bool] | None = None, levels: Sequence[int] | None = None) -> int | None:
    """The fewest leading tokens of ``ids`` whose deduplicated (and gated, ``keep``) tuples reach ``p < alpha``
    (None: never); weighted by ``levels[i]`` (token ``i``'s weight level) when given.

    Descriptive only: stopping at the first prefix below ``alpha`` is not a level-``alpha`` test (looking
    after every token inflates false alarms); a decision uses the p-value at a length fixed in advance."""
    gamma = params.threshold / float(1 << 53)
    seen: set[Tuple] = set()
    n = green = 0
    flags: list[bool] = []
    used: list[int] = []
    ids = list(ids)
    for i in range(params.context, len(ids)):
        tup = tuple(ids[i - params.context:i + 1])
        if (keep is not None and not keep[i]) or tup in seen:
            continue
        seen.add(tup)
        flag = green_flags(key, [tup], params)[0]
        if levels is not None:
            flags.append(flag)
            used.append(levels[i])
            p = weighted_score(flags, used, params).p
        else:
            n += 1
            green += flag
            p = math.exp(log_binom_sf(green, n, gamma))
        if p < alpha:
            return i + 1
    return None
