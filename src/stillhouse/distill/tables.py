"""Reading rows from a Parquet file a row group at a time, with damage reported as plain errors.

``parquet_row_groups(path)`` yields ``(first_row, n_rows, rows, None)`` per row group, or
``(first_row, n_rows, None, why)`` for a row group that cannot be read (a damaged page), so a caller
can skip it (the harvester's non-strict mode) or stop (curation). A file that cannot be opened at
all (not Parquet, truncated: no footer) raises :class:`TableError`, as does a missing pyarrow
(with its pip line). pyarrow's own exceptions never leave this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

FIX = "re-write the file (or give the rows as .jsonl)"


class TableError(ValueError):
    """The file cannot be read as Parquet; the message names the file, the problem and the fix."""


def parquet_row_groups(path: str | Path) -> Iterator[tuple[int, int, list[dict[str, Any]] | None, str | None]]:
    """(index of the group's first row, its row count, its rows as dicts, None) per row group;
    (first, count, None, why) for a damaged one."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise TableError(f"reading {Path(path).name} needs pyarrow: pip install 'stillhouse[data]'") from exc
    try:
        pf = pq.ParquetFile(path)
        groups = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    except (pa.ArrowException, OSError) as exc:
        raise TableError(f"{path}: not a readable Parquet file ({_why(exc)}); {FIX}") from None
    first = 0
    for i, n in enumerate(groups):
        try:
            rows = pf.read_row_group(i).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            yield first, n, None, f"row group {i} is damaged ({_why(exc)}); {FIX}"
        else:
            yield first, n, rows, None
        first += n


def _why(exc: BaseException) -> str:
    """pyarrow's message on one line, with its class (ArrowInvalid, OSError...)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"
