"""Score token sequences against candidate keys: deduplicated tuples, exact tests, family-wise control.

The unit of evidence is a **scored tuple** ``(w_1..w_h, t)``: a token with the ``h`` tokens before it.
Under the null hypothesis (the text never saw key ``k``) the green bits of *distinct* tuples are
independent Bernoulli(gamma), so the number of green tuples among the ``N`` distinct ones is
Binomial(N, gamma) and ``P(X >= green)`` is an exact p-value. Repeated tuples are counted once
(a repeated phrase would otherwise count its green bits again and push clean text to tiny
p-values), and tuples that also occur in the prompt are dropped (text copied from a watermarked
prompt carries the prompt's bias, not the answerer's).

``score_keys`` tests every candidate on the same tuples and corrects for trying K keys (Holm; the
Bonferroni figure is reported too): the best key is named only as strongly as its adjusted p-value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from stillhouse.provenance.stats import bonferroni, holm, log_binom_sf, z_score
from stillhouse.watermark.green import WatermarkParams, green_flags, scored_tuples

Tuple = tuple[int, ...]


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


def unique_tuples(seqs: Iterable[Sequence[int]], context: int, exclude: set[Tuple] | frozenset[Tuple] = frozenset(),
                  dedup: bool = True, keep: Sequence[Sequence[bool]] | None = None) -> list[Tuple]:
    """The tuples to score, in first-seen order: each distinct one once, none from ``exclude``.

    ``keep[j][i]`` (the entropy gate, :mod:`.gate`) says whether token ``i`` of sequence ``j`` is scored."""
    seen: set[Tuple] = set()
    out: list[Tuple] = []
    for j, ids in enumerate(seqs):
        ids = list(ids)
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
            out.append(tup)
    return out


def binomial_score(green: int, n: int, params: WatermarkParams, key_id: str = "") -> KeyScore:
    """``green`` green ones among ``n`` distinct tuples (or (key, tuple) triples): the exact binomial p-value."""
    gamma = params.threshold / float(1 << 53)  # the exact green probability
    log_p = log_binom_sf(green, n, gamma) if n else 0.0
    return KeyScore(key_id, n, green, math.exp(log_p), z=z_score(green, n, gamma), log10_p=log_p / math.log(10))


def score_key(key: int, tuples: Sequence[Tuple], params: WatermarkParams, key_id: str = "") -> KeyScore:
    """Green count and exact p-value of one key on already-deduplicated tuples."""
    return binomial_score(sum(green_flags(key, tuples, params)), len(tuples), params, key_id)


def adjust(scores: Sequence[KeyScore]) -> None:
    """Holm and Bonferroni over every hypothesis in ``scores`` together (in place)."""
    ps = [s.p for s in scores]
    for s, ph, pb in zip(scores, holm(ps), bonferroni(ps)):
        s.p_holm, s.p_bonferroni = ph, pb


def score_keys(tuples: Sequence[Tuple], keys: Mapping[str, int], params: WatermarkParams) -> list[KeyScore]:
    """Every candidate on the same tuples, Holm- and Bonferroni-adjusted, best (smallest p) first."""
    scores = [score_key(k, tuples, params, kid) for kid, k in keys.items()]
    adjust(scores)
    return sorted(scores, key=lambda s: (s.p, -s.rate, s.key_id))


def tokens_to_detect(ids: Sequence[int], key: int, params: WatermarkParams, alpha: float,
                     keep: Sequence[bool] | None = None) -> int | None:
    """The fewest leading tokens of ``ids`` whose deduplicated (and gated, ``keep``) tuples reach ``p < alpha``
    (None: never).

    Descriptive only: stopping at the first prefix below ``alpha`` is not a level-``alpha`` test (looking
    after every token inflates false alarms); a decision uses the p-value at a length fixed in advance."""
    gamma = params.threshold / float(1 << 53)
    seen: set[Tuple] = set()
    n = green = 0
    ids = list(ids)
    for i in range(params.context, len(ids)):
        tup = tuple(ids[i - params.context:i + 1])
        if (keep is not None and not keep[i]) or tup in seen:
            continue
        seen.add(tup)
        n += 1
        green += green_flags(key, [tup], params)[0]
        if math.exp(log_binom_sf(green, n, gamma)) < alpha:
            return i + 1
    return None
