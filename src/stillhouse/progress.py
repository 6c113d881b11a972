"""Progress of long library calls on the terminal: one rich bar per named step.

Library functions that run long take an optional ``progress(step, done, total)`` callback and know nothing of
the terminal; a command opens :func:`step_bars` and hands its callback down::

    with step_bars(console) as progress:
        result = curate_run(run_dir, cfg, progress=progress)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

StepProgress = Callable[[str, int, int], None]
"""``progress(step, done, total)``: ``done`` of ``total`` units of the step named ``step`` are finished."""


@contextmanager
def step_bars(console: Any = None, remaining: bool = True) -> Iterator[StepProgress]:
    """A transient rich display with a bar per step, the first call of a step adding its bar; ``remaining``
    shows the time left, else the time spent. ``console``: a rich Console (stderr keeps stdout clean for JSON)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    clock = TimeRemainingColumn() if remaining else TimeElapsedColumn()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), clock,
                  console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done)

        yield progress
