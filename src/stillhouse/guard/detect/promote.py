"""Atomic promotion of a fitted detector: versions in a directory beside the model, the model a symlink.

Layout, for ``--model runs/detector``::

    runs/detector            -> detector.versions/v20260301T000000Z-1234-0   (a relative symlink)
    runs/detector.versions/  v20260222T000000Z-1234-0/  v20260301T000000Z-1234-0/  ...
    runs/detector.watch.json the watch's status (stillhouse detect watch)

A candidate is written into a new version directory (:func:`new_version`) and every file in it is flushed
to disk; :func:`promote` then points a fresh symlink at it and renames that symlink over the model path.
``rename(2)`` replaces the old link in one step, so a reader (the guard reloading, ``stillhouse detect``)
finds either the old model or the new one, whole, and a process killed at any point before the rename
leaves the old model in place (the tests kill -9 promotions in a loop).

A model directory written by ``stillhouse detect --fit`` is a plain directory: :func:`adopt` moves it into
the versions directory and puts the symlink in its place. Those are two renames, so it first writes the
version's name to ``detector.versions/CURRENT``; :func:`repair` puts the link back from it if a crash fell
between them. The watch adopts and repairs before its first period.

Errors: ``PromoteError(RuntimeError)`` — the model path is something else (a file, a dangling link with no
``CURRENT``); the message names the path and the fix.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

MARKER = "CURRENT"
FILES = ("detector.json", "detector.npz")


class PromoteError(RuntimeError):
    """The model path cannot be promoted to; the message names it and the fix."""


def versions_dir(model: str | Path) -> Path:
    m = Path(model)
    return m.with_name(m.name + ".versions")


def current_version(model: str | Path) -> Path | None:
    """The version directory the model link points to (None when the model is a plain directory or missing)."""
    m = Path(model)
    if not m.is_symlink():
        return None
    return (m.parent / os.readlink(m)).resolve()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


_counter = [0]


def new_version(model: str | Path, now: float | None = None) -> Path:
    """A new, empty version directory for a candidate (named by UTC time, pid and a counter: never reused)."""
    versions = versions_dir(model)
    versions.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    _counter[0] += 1
    d = versions / f"v{stamp}-{os.getpid()}-{_counter[0]}"
    d.mkdir()
    return d


def _link(model: Path, target: Path) -> None:
    """Point ``model`` at ``target`` in one rename (a relative link, so the tree can move)."""
    tmp = model.with_name(f".{model.name}.link-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, model.parent), tmp)
    os.replace(tmp, model)
    _fsync_dir(model.parent)


def repair(model: str | Path) -> bool:
    """Finish an adoption a crash interrupted (model missing, ``CURRENT`` names a version). Returns whether it did."""
    m = Path(model)
    if m.exists() or m.is_symlink():
        return False
    marker = versions_dir(m) / MARKER
    if not marker.is_file():
        return False
    target = versions_dir(m) / marker.read_text().strip()
    if not (target / FILES[0]).is_file():
        raise PromoteError(f"{m} is missing and {marker} names {target}, which holds no detector: fit again "
                           f"(`stillhouse detect --fit ... --model {m}`)")
    _link(m, target)
    return True


def adopt(model: str | Path) -> Path:
    """Make ``model`` a symlink into its versions directory (a plain directory is moved there). Returns the
    version the model points to."""
    m = Path(model)
    repair(m)
    if m.is_symlink():
        target = current_version(m)
        if target is None or not target.is_dir():
            raise PromoteError(f"{m} is a dangling link: point it at a fitted detector or remove it and fit again")
        return target
    if not m.is_dir():
        raise PromoteError(f"{m} is not a fitted detector directory: fit one first "
                           f"(`stillhouse detect --fit --log DB_URL --since ... --until ... --model {m}`)")
    versions = versions_dir(m)
    versions.mkdir(parents=True, exist_ok=True)
    target = new_version(m)
    target.rmdir()  # the name only: the directory itself moves there
    from stillhouse.config import atomic_write_text

    atomic_write_text(versions / MARKER, target.name + "\n")
    os.rename(m, target)   # from here until _link, the model path is missing: repair() finishes the job
    _link(m, target)
    return target


def promote(model: str | Path, version: str | Path) -> Path | None:
    """Make ``version`` (a directory under the versions directory, holding a fitted detector) the model, in
    one rename. Returns the version it replaced (None if there was none)."""
    m, v = Path(model), Path(version).resolve()
    missing = [f for f in FILES if not (v / f).is_file()]
    if missing:
        raise PromoteError(f"{v} is not a fitted detector (no {' or '.join(missing)}): save the candidate first")
    if v.parent != versions_dir(m).resolve():
        raise PromoteError(f"{v} is not under {versions_dir(m)}: write candidates with new_version(model)")
    previous = adopt(m) if (m.exists() or m.is_symlink() or (versions_dir(m) / MARKER).exists()) else None
    _fsync_tree(v)
    _link(m, v)
    from stillhouse.config import atomic_write_text

    atomic_write_text(versions_dir(m) / MARKER, v.name + "\n")
    return previous


def prune(model: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` versions (at least two, so the previous model stays for a rollback;
    never the current one). Returns what it removed."""
    m = Path(model)
    versions = versions_dir(m)
    if not versions.is_dir():
        return []
    current = current_version(m)
    dirs = sorted((d for d in versions.iterdir() if d.is_dir() and d.name.startswith("v")),
                  key=lambda d: d.stat().st_mtime)
    keep_set = {d.resolve() for d in dirs[-max(keep, 2):]}
    if current is not None:
        keep_set.add(current)
    removed = []
    for d in dirs:
        if d.resolve() not in keep_set:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
