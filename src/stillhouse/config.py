"""Saving and replaying frozen config dataclasses as JSON.

Every component has one frozen dataclass config that validates itself in
``__post_init__``. These helpers write it next to run directories, checkpoints and
exports, and load it back (``--config FILE`` on the CLI replays a saved run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or field is wrong; the message names the field and the fix."""


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as indented JSON, atomically, with its class name for replay."""
    payload = {"__config__": type(cfg).__name__, **config_to_dict(cfg)}
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a dict, rejecting unknown keys and converting lists to tuples."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = {k: v for k, v in data.items() if k != "__config__"}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = str(hints.get(name, ""))
        if isinstance(value, list) and "tuple" in hint:
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # ValueError: the class's own __post_init__ check
        raise ConfigError(f"{source}: {exc}") from exc


def read_json_object(path: str | os.PathLike[str], what: str = "config file") -> dict[str, Any]:
    """Read a JSON object from a file, with a ConfigError that says which file and what is wrong."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {p} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {p} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{what} {p} is nested too deeply to be a config: write a flat JSON object") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a JSON object")
    return data


def load_config(cls: type[T], path: str | os.PathLike[str]) -> T:
    """Read a config saved by :func:`save_config`."""
    return config_from_dict(cls, read_json_object(path), source=str(path))
