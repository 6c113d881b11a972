"""Loading a teacher as a trainable HF model.

``load_causal_lm(spec)`` returns ``(model, tokenizer, revision)`` for a local teacher spec
(``bundled``, ``hf:DIR``, ``gguf:FILE``) through ``stillhouse.teacher.bundled.load_model``.
Batched generation lives with the teacher: :mod:`stillhouse.teacher.generate`.
"""

from __future__ import annotations

from typing import Any


def load_causal_lm(spec: str) -> tuple[Any, Any, str]:
    """``(model, tokenizer, revision)`` for a local teacher spec, in eval mode.

    Delegates to :func:`stillhouse.teacher.bundled.load_model` (bundled, hf:DIR, gguf:FILE).
    """
    from stillhouse.teacher.bundled import load_model

    model, tok, rev = load_model(spec)
    return model.eval(), tok, rev
