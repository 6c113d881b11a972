"""Redaction of prompt and response text before it is written to the traffic log.

Modes (``GuardConfig.redact``):

- ``none``: store the text as sent;
- ``patterns``: e-mail addresses, phone numbers, card-like digit runs and the config's
  ``redact_patterns`` become ``[REDACTED]``;
- ``hash``: store only ``sha256:<hex>`` of each text (near-duplicate detection across the
  log still works on exact repeats);
- ``drop``: store empty strings.

The detector sees the unredacted record in-process; only what is persisted is redacted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

from stillhouse.guard.events import TrafficRecord

BUILTIN_PATTERNS = (
    r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}",   # e-mail
    r"\b(?:\d[ \-]?){13,19}\b",                              # card-like digit runs
    r"\+?\d{1,3}[ \-.]?\(?\d{2,4}\)?[ \-.]?\d{3,4}[ \-.]?\d{3,4}",  # phone numbers
)


class Redactor:
    """Applies one redaction mode to a TrafficRecord (returns a copy)."""

    def __init__(self, mode: str = "none", patterns: tuple[str, ...] = ()):
        if mode not in ("none", "patterns", "hash", "drop"):
            raise ValueError(f"redact={mode!r}: use none | patterns | hash | drop")
        self.mode = mode
        self._re = re.compile("|".join(f"(?:{p})" for p in (*BUILTIN_PATTERNS, *patterns)))

    def text(self, s: str) -> str:
        if self.mode == "none" or not s:
            return s
        if self.mode == "drop":
            return ""
        if self.mode == "hash":
            return "sha256:" + hashlib.sha256(s.encode()).hexdigest()
        return self._re.sub("[REDACTED]", s)

    def _content(self, content: Any) -> Any:
        if isinstance(content, str):
            return self.text(content)
        if isinstance(content, list):
            return [{**part, "text": self.text(part["text"])} if isinstance(part, dict)
                    and isinstance(part.get("text"), str) else part for part in content]
        return content

    def record(self, rec: TrafficRecord) -> TrafficRecord:
        if self.mode == "none":
            return rec
        messages = [{**m, "content": self._content(m.get("content"))} if isinstance(m, dict) else m
                    for m in rec.messages]
        return dataclasses.replace(rec, messages=messages, response_text=self.text(rec.response_text))
