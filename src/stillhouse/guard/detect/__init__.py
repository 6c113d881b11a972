"""Detect: distillation campaigns in gateway traffic, per request, per account, across accounts.

- :mod:`.config`    — ``DetectConfig`` (the one frozen config);
- :mod:`.requests`  — per-request signals;
- :mod:`.text`      — MinHash band keys (datasketch's scheme, vectorized), stable hashes;
- :mod:`.embed`     — hashed bag-of-words and MiniLM prompt embeddings;
- :mod:`.account`   — an account's sliding window as additive sums, and its features;
- :mod:`.links`     — cross-account links and clusters;
- :mod:`.stats`     — the maths (surprisals, MMD, entropy, thresholds) as plain functions;
- :mod:`.detector`  — ``WindowDetector``: the ``Detector`` protocol, calibration, save/load;
- :mod:`.offline`   — read a traffic log (JSONL or the guard's store) and score it.

Run: ``stillhouse detect --help``.
"""

from stillhouse.guard.detect.config import DetectConfig
from stillhouse.guard.detect.detector import NotFittedError, WindowDetector

__all__ = ["DetectConfig", "NotFittedError", "WindowDetector"]
