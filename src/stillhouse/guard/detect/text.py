"""Text fingerprints: MinHash band keys for near-duplicates and templates, stable hashes.

The MinHash is datasketch's ``affine32`` scheme (MurmurHash3 pre-mix, then
``a*h + b`` in uint32) with datasketch's own permutations, applied to a whole batch
of shingles in one numpy expression: the same hash values as
``datasketch.MinHash(num_perm, seed, hashfunc=zlib.crc32)`` (tested), at a few
microseconds instead of ~90 us per sketch, so it fits the guard's request path.

Band keys: the signature is cut into ``bands`` runs of ``rows`` values; two texts
share a band key with probability ~ 1 - (1 - J^rows)^bands for Jaccard J (LSH).
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

import numpy as np

_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


def stable_hash(text: str) -> int:
    """A 32-bit hash that is the same in every process (Python's ``hash`` is salted)."""
    return zlib.crc32(text.encode("utf-8", "replace"))


_SPACE_OUT = bytes(c if 48 <= c <= 57 or 97 <= c <= 122 else 32 for c in range(256))


_UWORD = re.compile(r"[^\W_]+")
_CJK_LO, _CJK_HI = 0x2E80, 0x9FFF  # CJK radicals, kana, ideographs (scripts written without spaces)


def unicode_words(low: str) -> list[str]:
    """The words of lower-cased non-ASCII text: maximal runs of letters and digits in any script, a run
    holding CJK or kana characters cut into overlapping character pairs (those scripts put no spaces
    between words, so a whole sentence would otherwise be one 'word'). ASCII runs are as ``[a-z0-9]+``."""
    out: list[str] = []
    for tok in _UWORD.findall(low):
        if len(tok) == 1 or not any(_CJK_LO <= ord(ch) <= _CJK_HI for ch in tok):
            out.append(tok)
        else:
            out.extend(tok[i:i + 2] for i in range(len(tok) - 1))
    return out


def words(text: str) -> list[str]:
    """Lower-cased words (numbers kept: they are the variable part of many templates).

    For ASCII text (nearly all prompts) the maximal runs of ``[a-z0-9]``, found by mapping every other
    byte to a space and splitting (twice as fast as the regex, the same list); otherwise
    :func:`unicode_words` (letters of every script, CJK as character pairs: before it, text in Chinese
    or Japanese had no words at all, so every such prompt had the same embedding and looked like one
    template repeated).
    """
    low = text.lower()
    if low.isascii():
        return low.encode("ascii").translate(_SPACE_OUT).decode("ascii").split()
    return unicode_words(low)


def text_word_hashes(text: str) -> np.ndarray:
    """``word_hashes(words(text))``: for ASCII text straight from the bytes (crc32 of each run of
    ``[a-z0-9]`` bytes is crc32 of the word's UTF-8), without building the words as strings."""
    low = text.lower()
    if low.isascii():
        tokens = low.encode("ascii").translate(_SPACE_OUT).split()
        return np.fromiter(map(zlib.crc32, tokens), dtype=np.uint32, count=len(tokens))
    return word_hashes(unicode_words(low))


_WORD_CACHE: dict[str, int] = {}


def word_hashes(tokens: list[str]) -> np.ndarray:
    """crc32 of each word (cached: vocabularies are small next to traffic)."""
    cache = _WORD_CACHE
    try:  # the common case, every word seen before: one C-level pass (~4x faster than a Python loop)
        return np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint32, count=len(tokens))
    except KeyError:
        pass
    if len(cache) > 1_000_000:
        cache.clear()
    for w in tokens:
        if w not in cache:
            cache[w] = zlib.crc32(w.encode())
    return np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint32, count=len(tokens))


_MIX = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35))


_SHIFT = np.uint32(15)


def combine(*parts: np.ndarray, start: int = 0) -> np.ndarray:
    """Order-sensitive uint32 combination of equally long hash arrays (for n-gram hashes).

    ``combine(a, b, c) == combine(combine(a, b), c, start=1)``: an n-gram's hash extends its
    (n-1)-gram prefix's, so word-pair hashes can be reused for 3-word shingles. uint32 arrays wrap
    silently on overflow (numpy checks overflow only for scalars).
    """
    h = parts[0]
    if len(parts) == 1:
        return h.copy()
    for i, p in enumerate(parts[1:], start):
        h = (h * _MIX[i % 3]) ^ p
        h ^= h >> _SHIFT
    return h


def pair_hashes(hashes: np.ndarray) -> np.ndarray:
    """Hashes of each pair of adjacent words (``combine`` of the word hashes and their successors)."""
    return combine(hashes[:-1], hashes[1:])


def shingle_hashes(tokens: list[str] | None, k: int = 3, hashes: np.ndarray | None = None,
                   pairs: np.ndarray | None = None) -> np.ndarray:
    """32-bit hashes of each k-word shingle (one hash of the whole text when it is shorter than k).

    ``hashes``: the tokens' :func:`word_hashes` (then ``tokens`` may be None), ``pairs``: their
    :func:`pair_hashes`, when the caller already has them.
    """
    if hashes is None:
        hashes = word_hashes(tokens or [])
    wh = hashes
    count = wh.size
    if not count:
        return np.zeros(0, dtype=np.uint32)
    if count < k:
        return combine(*[wh[i:i + 1] for i in range(count)])
    n = count - k + 1
    if k == 3 and pairs is not None:
        return combine(pairs[:n], wh[2:2 + n], start=1)
    return combine(*[wh[i:i + n] for i in range(k)])


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutations for (num_perm, seed)."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def _permuted(hashes: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """The permuted hash matrix (len(hashes) x num_perm) of datasketch's affine32 scheme."""
    a, b = permutations(num_perm, seed)
    s1, m1, s2, m2, s3 = _FMIX
    hv = hashes.reshape(-1, 1)
    if hv.dtype != np.uint32:
        hv = hv.astype(np.uint32)
    hv = hv ^ (hv >> s1)  # a new array: the in-place steps below leave the caller's hashes alone
    hv *= m1  # uint32 arrays wrap silently on overflow
    hv ^= hv >> s2
    hv *= m2
    hv ^= hv >> s3
    hv = hv * a
    hv += b
    return hv


def minhash(hashes: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signature (uint32[num_perm]) of a set of 32-bit element hashes; all-max when empty."""
    if hashes.size == 0:
        return np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    return np.minimum.reduce(_permuted(hashes, num_perm, seed), axis=0)  # == .min(axis=0), minus a wrapper


def band_keys(signature: np.ndarray, bands: int, salt: str = "") -> tuple[int, ...]:
    """One stable key per LSH band of a signature (``salt`` keeps key spaces apart)."""
    rows = signature.size // bands
    raw = signature.tobytes()
    width = rows * signature.itemsize
    return tuple(map(zlib.crc32, [raw[i:i + width] for i in range(0, bands * width, width)],
                     range(_SALTS[salt], _SALTS[salt] + bands)))


_SALTS = {"h": 1000, "t": 2000, "f": 3000}


def fingerprints(text: str, edge_words: int, num_perm: int, bands: int, seed: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(template keys, near-duplicate keys) of a prompt, from one pass over its shingles.

    Template keys are the band keys of the prompt's two ends (the first and last
    ``edge_words`` words): templated prompts share their fixed wording at the ends
    while the filled-in question in the middle varies, so the ends match across a
    campaign while two different human questions rarely do. Near-duplicate keys are
    the band keys of the whole text.
    """
    tokens = words(text)
    if not tokens:
        return (), ()
    hashes = shingle_hashes(tokens)
    phv = _permuted(hashes, num_perm, seed)
    dup = band_keys(phv.min(axis=0), bands, "f")
    n_edge = max(0, min(edge_words, len(tokens) // 2) - 2)  # shingles fully inside each end
    if n_edge < 2:
        return (), dup
    keys = band_keys(phv[:n_edge].min(axis=0), bands, "h") + band_keys(phv[-n_edge:].min(axis=0), bands, "t")
    return keys, dup
