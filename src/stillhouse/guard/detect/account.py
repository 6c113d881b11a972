"""One account's sliding window, kept as additive sums so that every feature is O(1) to update.

Each request adds a fixed contribution to the account's sums; when it leaves the
window (older than ``window_s``, or beyond ``window_max_requests``) the same
contribution is subtracted. Features are read off the sums (:func:`features`), and a
cluster's pooled features are the same function of its members' summed sums — so an
account, a cluster of accounts, online and offline all go through one formula.

Layout of the sums vector (``Layout``): counts and token totals, the per-request
signal totals, template and duplicate totals, log-gap moments, the user-turn hits of
the rare asks (counted as evidence by the detector), 24 hour-of-day bins,
the embedding sum, the random-Fourier-feature sum and its squared norms, topic counts.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from stillhouse.guard.detect.requests import EVIDENCE_SIGNALS, QUERY_SIGNALS, REQUEST_SIGNALS
from stillhouse.guard.detect.stats import (
    log_int,
    mean_pair_cosine,
    mmd2_unbiased_from_sums,
)

try:
    from collections import _count_elements  # type: ignore[attr-defined]  # the C helper behind Counter.update
except ImportError:  # pragma: no cover - other Pythons
    def _count_elements(mapping: dict, iterable) -> None:  # type: ignore[no-redef, type-arg, no-untyped-def]
        for item in iterable:
            mapping[item] = mapping.get(item, 0) + 1


FEATURES = ("volume", "tokens", "cot", "step_by_step", "grader", "persona", "max_tokens", "multi", "labelled",
            "first_turn",
            "template", "duplicate", "regularity", "around_clock", "output_share", "concentration",
            "narrowness", "mmd", "cot_asks", "grader_asks")
"""Account features, each oriented so that larger is more suspicious."""

FAMILIES = {
    "content": ("cot", "step_by_step", "grader", "labelled", "persona"),
    "sampling": ("max_tokens", "multi"),
    "volume": ("volume", "tokens", "output_share"),
    "automation": ("first_turn", "regularity", "around_clock"),
    "repetition": ("template", "duplicate"),
    "topic": ("concentration", "narrowness"),
    "shift": ("mmd",),
    "asks": ("cot_asks", "grader_asks"),
}
"""Correlated features grouped: the score counts each family once (its most surprising member),
so an account that is merely machine-like (a batch service: regular, 24/7, single-turn) is not
scored as if each of those were independent evidence. "topic" (the account asks about one narrow
thing) and "shift" (its prompts are unlike benign prompts) are separate evidence: a benchmark
runner pasting many GSM8K questions has the first, not the second. "asks" is the *count* of rare asks
(chain-of-thought elicitation, grader prompts in wording uncommon among benign accounts), scored by the
detector as a binomial tail: a rate is diluted by cover traffic, a count is not, so the two are kept apart
(the rate is the "content" family's evidence)."""
_F = {name: i for i, name in enumerate(FEATURES)}
_QUERIES = 3 + REQUEST_SIGNALS.index("first_turn")  # Layout.SIGNALS + the first_turn slot: opened conversations
FAMILY_INDEX = tuple(tuple(FEATURES.index(f) for f in members) for members in FAMILIES.values())

FEATURE_HELP = {
    "volume": "log(1 + requests in the window)",
    "tokens": "log(1 + completion tokens in the window)",
    "cot": "rate of chain-of-thought / internal-reasoning elicitation",
    "step_by_step": "rate of everyday 'step by step' / 'show your work' asks",
    "grader": "rate of grader, rubric or reward-model prompts",
    "persona": "rate of long system prompts",
    "max_tokens": "rate of max_tokens at the served maximum",
    "multi": "rate of n>1 or logprobs requests",
    "labelled": "rate of labelled output templates",
    "first_turn": "share of requests that open a conversation (single-turn traffic)",
    "template": "mean share of a prompt's shingles already sent by this account (template reuse)",
    "duplicate": "rate of near-duplicate prompts (MinHash LSH)",
    "regularity": "1 / (1 + std of log inter-arrival gaps): machine-regular pacing",
    "around_clock": "entropy of the hour-of-day histogram (24/7 activity)",
    "output_share": "completion tokens / all tokens",
    "concentration": "share of the account's prompts in its most frequent topic",
    "narrowness": "mean pairwise cosine of prompt embeddings (low dispersion)",
    "mmd": "unbiased MMD^2 of prompt embeddings against benign traffic",
    "cot_asks": "user turns with chain-of-thought asks in wording uncommon among benign accounts (a count)",
    "grader_asks": "user turns with grader prompts in wording uncommon among benign accounts (a count)",
}


@dataclass(frozen=True)
class Layout:
    """Index map of the sums vector for embedding dim ``d``, ``rff`` features and ``k`` topics."""

    d: int
    rff: int
    k: int

    COUNT = 0
    COMPLETION = 1
    PROMPT = 2
    SIGNALS = 3  # len(REQUEST_SIGNALS) slots
    TEMPLATE = SIGNALS + len(REQUEST_SIGNALS)
    DUP = TEMPLATE + 1
    GAP_N = DUP + 1
    GAP_SUM = GAP_N + 1
    GAP_SQ = GAP_SUM + 1
    EVIDENCE = GAP_SQ + 1  # len(EVIDENCE_SIGNALS) slots: user-turn hits of the rare asks
    HOURS = EVIDENCE + len(EVIDENCE_SIGNALS)
    EMB = HOURS + 24

    @cached_property
    def phi(self) -> int:
        return self.EMB + self.d

    @cached_property
    def phi_sq(self) -> int:
        return self.phi + self.rff

    @cached_property
    def topics(self) -> int:
        return self.phi_sq + 1

    @cached_property
    def size(self) -> int:
        return self.topics + self.k


@dataclass
class Entry:
    """What one request added to its account (kept until it leaves the window)."""

    ts: float
    scalars: np.ndarray
    """float64[Layout.HOURS]: count, tokens, signals, template, dup, gap moments, user-turn hits."""
    hour: int
    emb: np.ndarray | None
    """float16 embedding (exactly what was added); None for a follow-up turn of a conversation, which adds
    nothing to the query statistics (embedding, topics, templates, duplicates): "continue", or a prompt
    edited and resent within one conversation, is how people chat, not a new query."""
    phi: np.ndarray | None
    """float16 random Fourier features (exactly what was added); None with ``emb``."""
    topic: int
    shingles: tuple[int, ...]
    dup_keys: tuple[int, ...]


@dataclass
class AccountState:
    """An account's window: its entries, their sums, and the counters the next request is compared with."""

    layout: Layout
    sums: np.ndarray = field(init=False)
    entries: deque[Entry] = field(default_factory=deque)
    shingle_counts: Counter[int] = field(default_factory=Counter)
    dup_counts: Counter[int] = field(default_factory=Counter)
    last_ts: float | None = None
    total_requests: int = 0
    """All requests ever seen (the window's count is ``sums[COUNT]``)."""

    def __post_init__(self) -> None:
        self.sums = np.zeros(self.layout.size, dtype=np.float64)

    def add(self, entry: Entry) -> None:
        self._apply(entry, +1.0)
        self.entries.append(entry)
        _count_elements(self.shingle_counts, entry.shingles)  # Counter.update without its Mapping check
        _count_elements(self.dup_counts, entry.dup_keys)
        self.total_requests += 1

    def evict(self, now: float, window_s: float, max_requests: int) -> None:
        while self.entries and (self.entries[0].ts < now - window_s or len(self.entries) > max_requests):
            entry = self.entries.popleft()
            self._apply(entry, -1.0)
            for counter, keys in ((self.shingle_counts, entry.shingles), (self.dup_counts, entry.dup_keys)):
                for key in keys:
                    left = counter[key] - 1
                    if left > 0:
                        counter[key] = left
                    else:
                        del counter[key]

    def _apply(self, entry: Entry, sign: float) -> None:
        # Adding -x is subtracting x in IEEE arithmetic, and float16 -> float64 is exact, so in-place
        # ufuncs on views give the same sums as ``s += sign * x.astype(float64)``, without temporaries.
        lay = self.layout
        s = self.sums
        op = np.add if sign > 0 else np.subtract
        head = s[: lay.HOURS]
        op(head, entry.scalars, out=head)
        s[lay.HOURS + entry.hour] += sign
        if entry.emb is None:  # a follow-up turn: no query of its own (see ``Entry``)
            return
        if entry.phi is None:
            raise ValueError("Entry.phi is None but Entry.emb is set: give both or neither (see Entry)")
        emb = s[lay.EMB: lay.phi]
        op(emb, entry.emb, out=emb)
        phi = entry.phi.astype(np.float64)
        rff = s[lay.phi: lay.phi_sq]
        op(rff, phi, out=rff)
        s[lay.phi_sq] += sign * float(phi @ phi)
        s[lay.topics + entry.topic] += sign


def features(sums: np.ndarray, layout: Layout, prior: float, mu_ref: np.ndarray | None,
             ref_sq: float, members: int = 1, full: int = 0) -> np.ndarray:
    """The account features (order of :data:`FEATURES`) of a sums vector (an account or a pooled cluster).

    For a cluster (``members`` > 1) volume and tokens are per member: a large legitimate
    organisation is many ordinary accounts, not one enormous one. Rates are shrunk toward 0 with
    weight ``prior``, as if measured on at most ``full`` requests (:func:`shrunk`; 0: no cap).
    """
    return np.array(feature_values(sums, layout, prior, mu_ref, ref_sq, members, full), dtype=np.float64)


def shrunk(hits: float, n: float, prior: float, full: int = 0) -> float:
    """``hits / (n + prior)``: a rate shrunk toward 0, so that 1 of 1 is weak evidence; for ``n`` past ``full``
    (when ``full`` > 0) the rate ``hits / n`` shrunk as if measured on ``full`` requests.

    Uncapped, the shrunk rate of an account whose every request hits grows with n toward 1, so a benign
    account busier than every calibration account lands beyond the calibration table for no higher a rate.
    Capped, every account that measured a rate on ``full`` or more requests is compared on the rate alone.
    """
    if not full or n <= full:
        return hits / (n + prior)
    return hits / n * (full / (full + prior))


def feature_values(sums: np.ndarray, layout: Layout, prior: float, mu_ref: np.ndarray | None,
                   ref_sq: float, members: int = 1, full: int = 0) -> list[float]:
    """:func:`features` as a list of Python floats (the request path's form: no array round trip)."""
    lay = layout
    head = sums[: lay.EMB].tolist()  # the scalar slots as Python floats: the same IEEE arithmetic, less overhead
    n = head[lay.COUNT]
    out: list[float] = [0.0] * len(FEATURES)
    if n <= 0:
        return out
    queries = head[_QUERIES]  # requests that open a conversation: the query statistics' denominator
    f = _F
    completion = head[lay.COMPLETION]
    out[f["volume"]] = _log1p_count(n / members)
    out[f["tokens"]] = _log1p_count(max(completion, 0.0) / members)
    for j, name in enumerate(REQUEST_SIGNALS):
        out[f[name]] = shrunk(head[lay.SIGNALS + j], queries if name in QUERY_SIGNALS else n, prior, full)
    out[f["template"]] = shrunk(head[lay.TEMPLATE], queries, prior, full)
    out[f["duplicate"]] = shrunk(head[lay.DUP], queries, prior, full)
    gap_n = round(head[lay.GAP_N])
    if gap_n >= 2:
        mean = head[lay.GAP_SUM] / gap_n
        std = math.sqrt(max(head[lay.GAP_SQ] / gap_n - mean * mean, 0.0))  # sqrt is correctly rounded
        out[f["regularity"]] = (1.0 / (1.0 + std)) * shrunk(gap_n - 1, gap_n - 1, prior, full)
    out[f["around_clock"]] = _hour_entropy(head[lay.HOURS: lay.EMB]) * shrunk(n, n, prior, full)
    tokens = completion + head[lay.PROMPT]
    out[f["output_share"]] = completion / tokens if tokens > 0 else 0.0
    out[f["concentration"]] = shrunk(max(sums[lay.topics: lay.size].tolist()), queries, prior, full)  # never NaN
    ni = round(queries)
    pair_shrink = shrunk(ni - 1, ni - 1, prior, full) if ni >= 2 else 0.0
    out[f["narrowness"]] = mean_pair_cosine(ni, sums[lay.EMB: lay.phi], float(ni)) * pair_shrink
    out[f["cot_asks"]] = head[lay.EVIDENCE]
    out[f["grader_asks"]] = head[lay.EVIDENCE + 1]
    if mu_ref is not None:
        out[f["mmd"]] = mmd2_unbiased_from_sums(ni, sums[lay.phi: lay.phi_sq], float(sums[lay.phi_sq]), mu_ref,
                                                ref_sq) * pair_shrink
    return [float(x) for x in out]


_ENTROPY: dict[tuple[float, ...], float] = {}


def _hour_entropy(hours: list[float]) -> float:
    """``normalized_entropy(np.maximum(hours, 0))``, memoized on the nonzero counts in hour order.

    The entropy depends only on those (in that order: numpy's summation order), and accounts of
    ordinary volume repeat a few small histograms, so many requests hit the memo. On a miss it is
    the same numpy expression on the nonzero counts; their total is exact in any order, because
    hour bins hold whole request counts.
    """
    key = tuple([h for h in hours if h > 0])
    value = _ENTROPY.get(key)
    if value is None:
        if len(_ENTROPY) >= 20_000:
            _ENTROPY.clear()
        if key:
            p = np.array(key, dtype=np.float64) / float(sum(key))
            value = float(-np.add.reduce(p * np.log(p)) / log_int(len(hours)))
        else:
            value = 0.0
        _ENTROPY[key] = value
    return value


@lru_cache(maxsize=65536)
def _log1p_count(x: float) -> float:
    """np.log1p of a request or token count (per member), memoized: counts repeat."""
    return float(np.log1p(x))
