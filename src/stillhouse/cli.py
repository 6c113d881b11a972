"""The `stillhouse` command line. Thin: each verb parses arguments and calls the library.

Every stage is a verb over a run directory:
    serve | harvest | export | curate | train | eval | guard | detect | arena | provenance | bench

Each area registers its own verbs (``register(app)`` in its ``commands`` module); a
verb's options are the fields of its config dataclass, derived by
:mod:`stillhouse.cli_config`. Those modules import heavy libraries inside the command
functions, so ``stillhouse --help`` stays fast.
"""

from __future__ import annotations

import inspect

import typer

from stillhouse import __version__

app = typer.Typer(
    name="stillhouse",
    help=(
        "The LLM distillation pathway and the blocking of it, each measured against the other.\n\n"
        "Distill: serve a teacher, harvest data from it, curate, train a student, evaluate.\n"
        "Guard: a gateway that logs, detects and enforces. Arena: campaigns against the guard."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks: us and named peers side by side, in one run, as ratios.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stillhouse {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """stillhouse."""


def _register() -> None:
    from stillhouse.arena import commands as arena_commands
    from stillhouse.bench import commands as bench_commands
    from stillhouse.distill import commands as distill_commands
    from stillhouse.distill import harvest_commands, train_commands
    from stillhouse.guard import commands as guard_commands
    from stillhouse.provenance import commands as provenance_commands
    from stillhouse.serve import commands as serve_commands

    for module in (
        serve_commands, harvest_commands, distill_commands, train_commands, guard_commands, arena_commands,
        provenance_commands,
    ):
        module.register(app)
    bench_commands.register(bench_app)


def _unwrap(text: str) -> str:
    """A help text with each prose paragraph on one line, so that the terminal wraps it.

    typer 0.29's rich help keeps the single line breaks of a docstring inside a paragraph, so a
    paragraph wrapped at 110 columns in the source printed ragged in an 80-column terminal (a short
    line after every source line). Paragraphs that start with ``\\b`` (examples, command lines) keep
    their lines, as click documents.
    """
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n")) for p in paragraphs)


def _unwrap_all(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        text = info.help or inspect.getdoc(info.callback)
        if text:
            info.help = _unwrap(text)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _unwrap_all(group.typer_instance)


_register()
_unwrap_all(app)


def run() -> None:
    """The console entry point: ``app``, with a missing optional dependency, missing data or a bad
    config file reported as one line naming the fix (exit status 1) instead of a traceback."""
    import sys

    from stillhouse.config import ConfigError
    from stillhouse.extras import MissingData, missing_dependency

    verb = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    try:
        app()
    except ImportError as exc:
        message = missing_dependency(exc, verb)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        raise SystemExit(1) from None
    except (ConfigError, MissingData) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
