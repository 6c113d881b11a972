"""KGW green lists (Kirchenbauer et al., ICML 2023) and EXP sampling (Aaronson 2022), keyed per row, as plain functions.

A token ``t`` that follows the context window ``w`` (the ``context`` tokens before it) is
**green** under key ``k`` when ``PRF(k, w, t) < gamma``; generation adds ``delta`` to the logits
of the green tokens, and detection counts how many scored ``(w, t)`` tuples are green.

The PRF: ``s = seed(k, w)`` chains splitmix64's finaliser over the window's token ids, and
``green(k, w, t) = mix(s XOR T[t]) >> 11 < floor(gamma * 2**53)`` with ``T[t] = mix(t * phi)``.
For distinct tuples the green bits of a key the text never saw are independent Bernoulli(gamma)
(up to the PRF), which is what makes the exact binomial test of :mod:`stillhouse.provenance.detect`
valid at any level once repeated tuples are dropped.

**EXP** (``scheme="exp"``): a *sampled* row draws its token by Gumbel-max from the same PRF's uniforms,
``argmax_t log(1 - u(k, w, t)) / p_t`` with ``p`` the model's distribution at the request's temperature (and top-p).
Over the key that is exactly a draw from ``p`` (distortion-free: no delta, no loss of answer quality), and the token
written has a small ``u``; detection sums ``-log u`` over distinct tuples, a Gamma(n, 1) variable under the null
(:func:`stillhouse.provenance.stats.log_gamma_sf`). A window that already occurred earlier in the answer is sampled
without the key: with one token of context, reusing a window's uniforms locks the text into loops (measured on 96
development answers at T 0.7: 39 with under 30% distinct bigrams, 1 without a watermark, 5 with this rule), and
a repeated window's tuple carries no new evidence anyway. Greedy rows have no randomness to key, so they get
KGW's bias (``delta``, the entropy gate) as under ``scheme="kgw"``: greedy answers are the same under both schemes.
Measured on those development answers at 200 tokens: p < 1e-5 for 91/96 (EXP) against 69/96 (KGW, weighted
score), docs/results.md "EXP".

Why not transformers' ``WatermarkLogitsProcessor``/``WatermarkDetector``: it is built for
``generate()`` with one ``hashing_key`` per processor (the whole batch shares a key), seeds a
``torch.Generator`` and draws a ``randperm`` of the vocabulary per row per step (measured here:
a 49,152-token ``randperm`` costs about as much as the vectorised PRF below for a whole row),
and its detector's z-score counts repeated n-grams unless told otherwise and gives a normal
approximation, not an exact tail. ``synthid-text`` (PyPI) pins transformers 4.43 and torch 2.4
with CUDA wheels (``pip install --dry-run synthid-text`` here), so it cannot share this
environment. The numbers: the mask of 32 rows of SmolLM2's vocabulary costs about 8 ms and
adding it 1 ms on one core, against ~300 ms for a decode step of 32 rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    import torch

M64 = 0xFFFFFFFFFFFFFFFF
PHI = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


@dataclass(frozen=True)
class WatermarkParams:
    """The scheme's parameters; detection must use the ones generation used.

    The defaults are the one place every command's defaults come from (:data:`DEFAULT_PARAMS`: serve, eval,
    bench serve, provenance). Delta 1.5 with the 2.0-nat entropy gate is the setting measured to keep the
    teacher's accuracy: 0.243 on held-out arithmetic against 0.263 without the watermark, where delta 2 without
    the gate gave 0.107 (docs/results.md, "The entropy gate").
    """

    gamma: float = 0.25
    """Share of the vocabulary that is green for each context window."""
    delta: float = 1.5
    """Added to every green token's logit during generation."""
    context: int = 1
    """Tokens in the context window that seeds the green list (KGW's h)."""
    entropy: float = 2.0
    """SWEET's gate (Lee et al. 2023), in nats: bias, and score, only the positions whose next-token entropy
    under the teacher (its raw logits, temperature 1) is above this; 0 = every position (plain KGW).
    Detection then needs the teacher to recompute the entropies (:mod:`stillhouse.provenance.gate`)."""
    scheme: str = "kgw"
    """kgw: every row gets the green-list bias. exp: sampled rows are drawn by EXP (Gumbel-max on the key's
    uniforms, distortion-free), greedy rows get the green-list bias as under kgw."""

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma={self.gamma}: must be in (0, 1), e.g. 0.25")
        if not 0.0 <= self.delta <= 20.0:
            raise ValueError(f"delta={self.delta}: must be in [0, 20], e.g. 1.5")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or not 1 <= self.context <= 8:
            raise ValueError(f"context={self.context!r}: must be an integer 1..8")
        if not 0.0 <= self.entropy <= 20.0:
            raise ValueError(f"entropy={self.entropy}: must be in [0, 20] nats (0 = no gate), e.g. 2.0")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r}: use one of {', '.join(SCHEMES)}")

    @property
    def threshold(self) -> int:
        """``green <=> (mix >> 11) < threshold``; the exact green probability is threshold / 2**53."""
        return int(self.gamma * (1 << 53))


SCHEMES: Final = ("kgw", "exp")
"""kgw: green-list bias on every row; exp: EXP sampling on sampled rows, the green-list bias on greedy ones."""

DEFAULT_PARAMS: Final = WatermarkParams()
"""The scheme's defaults: every config's watermark fields default to these, never to literals of their own."""


def mix(x: int) -> int:
    """splitmix64's finaliser on a Python int (64-bit wraparound)."""
    x &= M64
    x ^= x >> 30
    x = (x * _C1) & M64
    x ^= x >> 27
    x = (x * _C2) & M64
    return x ^ (x >> 31)


def mix_array(x: np.ndarray) -> np.ndarray:
    """:func:`mix` on a uint64 array (numpy wraps uint64 products modulo 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(_C1)
    x ^= x >> np.uint64(27)
    x = x * np.uint64(_C2)
    x ^= x >> np.uint64(31)
    return x


def token_hash(token: int) -> int:
    """``T[t]``: the token's own hash, shared by every key and window."""
    return mix((int(token) * PHI) & M64)


def token_hashes(vocab_size: int) -> np.ndarray:
    """``T`` for a whole vocabulary, as uint64."""
    return mix_array(np.arange(vocab_size, dtype=np.uint64) * np.uint64(PHI))


def seed(key: int, window: Sequence[int]) -> int:
    """The green-list seed of a context window under a 64-bit key."""
    s = key & M64
    for t in window:
        s = mix(s ^ token_hash(t))
    return s


def is_green(key: int, window: Sequence[int], token: int, params: WatermarkParams) -> bool:
    """Whether ``token`` after ``window`` is green under ``key``."""
    return (mix(seed(key, window) ^ token_hash(token)) >> 11) < params.threshold


def green_mask(key: int, window: Sequence[int], hashes: np.ndarray, params: WatermarkParams) -> np.ndarray:
    """The green list of one window as a boolean vector over the vocabulary (``hashes = T``)."""
    s = np.uint64(seed(key, window))
    return (mix_array(hashes ^ s) >> np.uint64(11)) < np.uint64(params.threshold)


def uniforms(key: int, window: Sequence[int], hashes: np.ndarray) -> np.ndarray:
    """The PRF's uniform ``u(k, w, t)`` in [0, 1) for every token of the vocabulary (green <=> ``u < gamma``)."""
    s = np.uint64(seed(key, window))
    return (mix_array(hashes ^ s) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniform(key: int, tup: Sequence[int]) -> float:
    """``u(k, w, t)`` of one ``(window..., token)`` tuple."""
    return (mix(seed(key, tup[:-1]) ^ token_hash(tup[-1])) >> 11) * (1.0 / (1 << 53))


def first_windows(ids: Sequence[int], context: int) -> list[bool]:
    """For each position ``i`` of an answer, whether EXP keyed it: its window ``ids[i - context:i]`` did not occur
    at an earlier position of the answer (positions before ``context`` reach into the prompt: always keyed)."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for i in range(len(ids)):
        if i < context:
            out.append(True)
            continue
        w = tuple(ids[i - context:i])
        out.append(w not in seen)
        seen.add(w)
    return out


def _seen_before(ids: Sequence[int], start: int, h: int) -> bool:
    """Whether the last ``h`` tokens of ``ids`` occurred as a window at an earlier answer position (``>= start + h``)."""
    n = len(ids)
    if h == 1:
        return ids[n - 1] in ids[start:n - 1]
    w = list(ids[n - h:])
    return any(list(ids[j - h:j]) == w for j in range(start + h, n))


def scored_tuples(ids: Sequence[int], context: int, start: int = 0) -> list[tuple[int, ...]]:
    """The ``(window..., token)`` tuples of ``ids[start:]`` that have a full window before them."""
    first = max(start, context)
    return [tuple(ids[i - context:i + 1]) for i in range(first, len(ids))]


def green_flags(key: int, tuples: Sequence[tuple[int, ...]], params: WatermarkParams) -> list[bool]:
    """Green bit of each ``(window..., token)`` tuple under ``key``."""
    memo: dict[tuple[int, ...], int] = {}
    out = []
    for tup in tuples:
        window = tup[:-1]
        s = memo.get(window)
        if s is None:
            s = memo[window] = seed(key, window)
        out.append((mix(s ^ token_hash(tup[-1])) >> 11) < params.threshold)
    return out


def next_token_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(scores)`` over the last axis, computed in float32."""
    import torch

    logp = torch.log_softmax(scores.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gate_open(scores: torch.Tensor, params: WatermarkParams) -> bool:
    """Whether a position with these raw logits is biased (and scored): always without a gate."""
    return params.entropy <= 0.0 or float(next_token_entropy(scores)) > params.entropy


class RowWatermark:
    """A per-row logits processor: ``scores += delta`` on the green list of the row's last window
    (only where the entropy gate is open, when the params have one).

    One object per request (its key); the batcher calls it with the row's prompt plus generated
    token ids and that row's ``[V]`` logits, so rows with different keys share a batch.
    """

    def __init__(self, key: int, params: WatermarkParams, hashes: np.ndarray, key_id: str = ""):
        self.key = key & M64
        self.params = params
        self.hashes = hashes
        self.key_id = key_id

    def __call__(self, ids: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
        import torch

        h = self.params.context
        if len(ids) < h or self.params.delta == 0.0 or not gate_open(scores, self.params):
            return scores
        mask = green_mask(self.key, ids[len(ids) - h:], self.hashes, self.params)
        v = min(scores.shape[-1], mask.shape[0])
        scores[:v].add_(torch.from_numpy(mask[:v].view(np.uint8)), alpha=self.params.delta)
        return scores

    @property
    def samples(self) -> bool:
        """Whether this watermark draws sampled rows' tokens itself (EXP) instead of biasing their logits."""
        return self.params.scheme == "exp"

    def choose(self, ids: Sequence[int], answer_start: int, scores: torch.Tensor, temperature: float,
               top_p: float = 1.0) -> int | None:
        """EXP: the token a sampled row writes after ``ids`` (its answer starts at ``answer_start``), drawn by
        Gumbel-max on the key's uniforms from ``softmax(scores / temperature)`` (top-p filtered); None when the
        window already occurred in the answer (the caller samples as usual)."""
        import torch

        from stillhouse.teacher.decoding import top_p_filter

        h = self.params.context
        n = len(ids)
        if n < h:
            return None
        window = list(ids[n - h:])
        if n - h >= answer_start and _seen_before(ids, answer_start, h):  # key a window's first occurrence only
            return None
        v = min(scores.shape[-1], self.hashes.shape[0])
        p = torch.softmax(scores[:v].double() / temperature, dim=-1)
        if top_p < 1.0:
            p = top_p_filter(p, top_p)
        u = torch.from_numpy(uniforms(self.key, window, self.hashes[:v]))
        val = torch.where(p > 0, torch.log1p(-u) / p.clamp_min(1e-300), torch.tensor(-math.inf, dtype=p.dtype))
        return int(torch.argmax(val))

    def applied_headers(self) -> list[tuple[str, str]]:
        """The response headers that tell the guard which key id and scheme answered (never the key)."""
        from stillhouse.watermark.keys import APPLIED_HEADER, SCHEME_HEADER

        return [(APPLIED_HEADER, self.key_id), (SCHEME_HEADER, self.params.scheme)]

    def __repr__(self) -> str:  # never the key
        return f"RowWatermark(key_id={self.key_id!r}, {self.params})"


def batch_processor(row: RowWatermark) -> Any:
    """``(input_ids [B, L], scores [B, V]) -> scores`` applying one key to every row (for HF ``generate``'s
    ``logits_processor``; left padding is fine, the window is a row's last tokens)."""
    def apply(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i in range(scores.shape[0]):
            scores[i] = row(input_ids[i].tolist(), scores[i])
        return scores
    return apply


def vocab_hashes(vocab_size: int, _cache: dict[int, Any] = {}) -> np.ndarray:  # noqa: B006 - a memo
    """``T`` for a vocabulary size, computed once per process."""
    arr = _cache.get(vocab_size)
    if arr is None:
        arr = _cache[vocab_size] = token_hashes(vocab_size)
    return arr  # type: ignore[no-any-return]
