"""Loading a fitted detector from its directory, with an error that names the fix.

Errors: ``DetectorLoadError(ValueError)`` — the directory is missing or holds no fitted
detector; the message names the directory and the command that writes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DetectorLoadError(ValueError):
    """The guard's detector directory is missing or does not hold a fitted detector."""


FIT_HINT = "fit one on benign traffic with `stillhouse detect --fit --log BENIGN_LOG --model {dir}`"


def load_detector(directory: str | Path) -> Any:
    """The fitted ``WindowDetector`` saved in ``directory`` (by ``stillhouse detect --fit``).

    Raises DetectorLoadError, naming the directory and the fix, when it is missing, has no
    ``detector.json``/``detector.npz`` or they do not hold a fitted detector."""
    import json
    import zipfile

    from stillhouse.config import ConfigError
    from stillhouse.guard.detect.detector import WindowDetector

    d = Path(directory)
    hint = FIT_HINT.format(dir=d)
    if not d.is_dir():
        raise DetectorLoadError(f"detector directory {d} does not exist; {hint}")
    missing = [name for name in ("detector.json", "detector.npz") if not (d / name).is_file()]
    if missing:
        raise DetectorLoadError(f"{d} is not a fitted detector (no {' or '.join(missing)}); {hint}")
    try:
        det = WindowDetector.load(d)
    except (OSError, KeyError, TypeError, ValueError, ConfigError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DetectorLoadError(f"{d} is not a fitted detector ({type(exc).__name__}: {exc}); "
                                f"{hint} again") from exc
    if not det.fitted:
        raise DetectorLoadError(f"{d} holds an unfitted detector (no thresholds); {hint}")
    return det


