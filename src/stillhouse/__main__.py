"""``python -m stillhouse`` runs the CLI."""

from stillhouse.cli import run

run()
