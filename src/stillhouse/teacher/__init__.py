"""The model, the ground floor: one Teacher protocol and its implementations (local, openai, fake)."""

from stillhouse.teacher.base import (
    ChatResult,
    Completion,
    Message,
    SamplingParams,
    ScoreResult,
    Teacher,
    TeacherError,
    TokenLogprobs,
)
from stillhouse.teacher.spec import TeacherSpec, make_teacher, parse_spec

__all__ = [
    "ChatResult",
    "Completion",
    "Message",
    "SamplingParams",
    "ScoreResult",
    "Teacher",
    "TeacherError",
    "TeacherSpec",
    "TokenLogprobs",
    "make_teacher",
    "parse_spec",
]
