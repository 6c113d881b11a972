"""Plain functions for decoding: sampling one token, stop strings, token text and bytes.

Everything here is a function of tensors, strings or a tokenizer; the stateful batch
scheduler that calls them lives in ``batcher.py``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def seed_for(seed: int, index: int) -> int:
    """The generator seed of completion ``index`` of a request with ``seed`` (distinct per index)."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability mass reaches ``top_p``.

    ``probs`` is a 1-D probability vector; the most likely token always survives. The
    result is not renormalised (``torch.multinomial`` does not need it).
    """
    import torch

    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    sorted_p = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs)
    out.scatter_(-1, order, sorted_p)
    return out


def sample_token(
    scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Pick the next token from 1-D ``scores`` (logits): argmax at temperature 0, else sample."""
    import torch

    if temperature <= 0.0:
        return int(torch.argmax(scores).item())
    return int(sample_rows(scores[None], [temperature], [top_p], [generator])[0])


def sample_rows(
    scores: torch.Tensor, temperatures: list[float], top_ps: list[float],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Sample one token per row of ``scores`` [B, V] (all temperatures > 0).

    Inverse-CDF sampling with one uniform draw per row from that row's generator, so a
    row's choice depends only on its own logits and seed, never on its batch neighbours.
    (``torch.multinomial`` was ~40x slower here on 49k-token rows.)
    """
    import torch

    temps = torch.tensor(temperatures, dtype=torch.float32)[:, None]
    probs = torch.softmax(scores.float() / temps, dim=-1)
    for i, p in enumerate(top_ps):
        if p < 1.0:
            probs[i] = top_p_filter(probs[i], p)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]) * cdf[:, -1]
    picks = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]
    return picks.clamp_(max=scores.shape[-1] - 1)


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """The index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def safe_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be streamed now without ever having to take it back.

    Holds back a trailing U+FFFD (an incomplete UTF-8 sequence the next token may finish)
    and the longest suffix that could still grow into a stop string.
    """
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                hold = max(hold, k)
                break
    return end - hold


def tokens_covering(prefix_lens: list[int], n_chars: int) -> int:
    """The fewest leading tokens whose decoded text reaches ``n_chars`` characters.

    ``prefix_lens[j]`` is the length of the text decoded from tokens ``0..j``.
    """
    if n_chars <= 0:
        return 0
    for j, length in enumerate(prefix_lens):
        if length >= n_chars:
            return j + 1
    return len(prefix_lens)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    """Maps token ids to their exact UTF-8 bytes and display string, memoised per id.

    Handles byte-level BPE vocabularies (GPT-2, SmolLM2: ``Ġ`` for space) and
    SentencePiece vocabularies (``▁`` for space, ``<0xNN>`` byte fallback).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._memo: dict[int, tuple[str, bytes]] = {}
        probe = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a", add_special_tokens=False))
        self._bytelevel = bool(probe) and str(probe[0]).startswith("\u0120")
        self._byte_decoder: dict[str, int] = {}
        if self._bytelevel:
            self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def raw(self, token_id: int) -> bytes:
        """The exact bytes this token contributes to the text."""
        return self._lookup(token_id)[1]

    def text(self, token_id: int) -> str:
        """The token as a string (invalid UTF-8 fragments shown as U+FFFD)."""
        return self._lookup(token_id)[0]

    def _lookup(self, token_id: int) -> tuple[str, bytes]:
        hit = self._memo.get(token_id)
        if hit is not None:
            return hit
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        piece = "" if piece is None else str(piece)
        raw: bytes
        if token_id in self._special:
            raw = piece.encode()
        elif self._bytelevel and all(c in self._byte_decoder for c in piece):
            raw = bytes(self._byte_decoder[c] for c in piece)
        elif m := _BYTE_TOKEN.match(piece):
            raw = bytes([int(m.group(1), 16)])
        else:
            raw = piece.replace("\u2581", " ").encode()
        hit = (raw.decode("utf-8", errors="replace"), raw)
        self._memo[token_id] = hit
        return hit
