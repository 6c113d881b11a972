"""Detect: distillation campaigns in gateway traffic, per request, per account, across accounts.

- :mod:`.config`    — ``DetectConfig`` (the one frozen config);
- :mod:`.requests`  — per-request signals;
- :mod:`.text`      — MinHash band keys (datasketch's scheme, vectorized), stable hashes;
- :mod:`.embed`     — hashed bag-of-words and MiniLM prompt embeddings;
- :mod:`.account`   — an account's sliding window as additive sums, and its features;
- :mod:`.links`     — cross-account links and clusters;
- :mod:`.stats`     — the maths (surprisals, MMD, entropy, thresholds) as plain functions;
- :mod:`.detector`  — ``WindowDetector``: the ``Detector`` protocol, calibration, save/load;
- :mod:`.offline`   — read a traffic log (JSONL or the guard's store) and score it;
- :mod:`.logwindow` — a time window of the guard's log, accounts under a decision or labelled campaign left out;
- :mod:`.calibrate` — the operator path: fit on a window of the guard's own log (``detect --fit --since --until``);
- :mod:`.check`     — check a fitted detector on a later window before enforcing (``detect check``);
- :mod:`.drift`     — the population stability index of the benign score distribution;
- :mod:`.promote`   — versions beside the model and atomic promotion (a symlink renamed over the model);
- :mod:`.watch`     — refit on a schedule, alarm on drift, promote a checked candidate (``detect watch``);
- :mod:`.rebuild`   — a loaded detector's window rebuilt from the log (the guard's reload without a restart).

Run: ``stillhouse detect --help``.
"""

from stillhouse.guard.detect.config import DetectConfig
from stillhouse.guard.detect.detector import NotFittedError, WindowDetector

__all__ = ["DetectConfig", "NotFittedError", "WindowDetector"]
