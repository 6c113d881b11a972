"""Deduplication: exact (normalized text) and near (MinHash LSH over word n-gram shingles).

Both are order-preserving and deterministic: the first occurrence of a cluster is kept,
later ones point back to it. That lets curation put the rows it prefers (greedy samples,
earlier prompts) first and know which survive.

Shingles are word n-grams over lowercased tokens where numbers and symbols are tokens of
their own, so "What is 12 + 30?" and "What is 12 + 31?" are *different* items (they
share few 3-grams), while two copies of one answer that differ in a word or in spacing are
near-duplicates.

    from stillhouse.distill.dedup import exact_duplicates, NearDeduper
    exact_duplicates(["a b", "a  b", "c"])          # [None, 0, None]
    NearDeduper(threshold=0.8, seed=1).fit_predict(texts)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens; every symbol is a token (``"12+3"`` → ``["12", "+", "3"]``)."""
    return _TOKEN.findall(text.lower())


def normalize(text: str) -> str:
    """The text as a canonical token string: case and whitespace do not matter."""
    return " ".join(tokenize(text))


def exact_duplicates(texts: Sequence[str], normalized: bool = True) -> list[int | None]:
    """For each text, the index of its first exact copy earlier in the list, or None."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, t in enumerate(texts):
        key = normalize(t) if normalized else t
        digest = hashlib.sha256(key.encode()).hexdigest()
        if digest in first:
            out.append(first[digest])
        else:
            first[digest] = i
            out.append(None)
    return out


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the text (the whole text when it has fewer than ``n`` tokens)."""
    toks = tokenize(text)
    if len(toks) < n:
        return {" ".join(toks).encode()} if toks else set()
    return {" ".join(toks[i : i + n]).encode() for i in range(len(toks) - n + 1)}


@dataclass(frozen=True)
class NearDup:
    """Item ``index`` near-duplicates the earlier kept item ``of`` (estimated Jaccard)."""

    of: int
    jaccard: float


class NearDeduper:
    """Greedy near-duplicate removal with MinHash LSH (datasketch), seeded.

    ``__init__`` only stores parameters; ``fit_predict`` fills ``lsh_`` and
    ``minhashes_``. An item is a near-duplicate when its estimated Jaccard similarity to
    an earlier *kept* item is at least ``threshold``.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 3, seed: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold}: a Jaccard similarity in (0, 1], e.g. 0.8")
        if num_perm < 16:
            raise ValueError(f"num_perm={num_perm}: use at least 16 permutations (128 is usual)")
        if ngram < 1:
            raise ValueError(f"ngram={ngram}: shingle size must be >= 1")
        self.threshold = threshold
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed

    def fit_predict(self, texts: Sequence[str]) -> list[NearDup | None]:
        """For each text, None (kept) or the :class:`NearDup` it collapses into."""
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("near-dedup needs datasketch: pip install 'stillhouse[curate]'") from exc

        self.lsh_ = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        # bulk: one set of permutations for all (drawing them is the slow part of MinHash())
        self.minhashes_: list[Any] = MinHash.bulk([sorted(shingles(t, self.ngram)) for t in texts],
                                                  num_perm=self.num_perm, seed=self.seed)
        out: list[NearDup | None] = []
        for i, m in enumerate(self.minhashes_):
            best: NearDup | None = None
            for key in self.lsh_.query(m):
                j = int(key)
                sim = float(m.jaccard(self.minhashes_[j]))
                if sim >= self.threshold and (best is None or sim > best.jaccard or
                                              (sim == best.jaccard and j < best.of)):
                    best = NearDup(j, sim)
            if best is None:
                self.lsh_.insert(str(i), m)
            out.append(best)
        return out
