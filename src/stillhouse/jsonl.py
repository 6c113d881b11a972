"""Reading JSON Lines files: one JSON value per line, blank lines skipped, every error naming its line.

Training data, task items, curation input, guard logs, account files, review labels and provenance
texts are all JSONL; each reader raises its own error type (DataError, LogError, ...) so its verb can
print a one-line message, and words that message in terms of what the file should hold. This is the
one loop they share. Lines are split on ``\\n`` (and ``\\r\\n``) only: ``str.splitlines`` would also split
at U+2028 and other separators, which JSON written with ``ensure_ascii=False`` holds inside strings.
(The prompt loader keeps its own loop: it reads bytes through orjson, reports bad rows instead of
raising, and is the harvester's hot path.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TOO_DEEP = "nested too deeply to parse (about 1,000 levels of arrays/objects)"


def iter_jsonl(path: str | Path, error: type[Exception], expect: str,
               objects: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of ``path``.

    A line that is not JSON, nests too deeply, or (with ``objects``) is not a JSON object raises
    ``error("PATH:LINE: what is wrong; expected EXPECT")``; a file that is not UTF-8 raises
    ``error("PATH: not UTF-8 text; expected EXPECT")``.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise error(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected {expect}") from None
                except RecursionError:
                    raise error(f"{path}:{lineno}: {TOO_DEEP}; expected {expect}") from None
                if objects and not isinstance(value, dict):
                    raise error(f"{path}:{lineno}: a JSON {_kind(value)}, not an object; expected {expect}")
                yield lineno, value
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; expected {expect}") from None


def _kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)
