"""Options derived from a config dataclass: types, help, defaults, replay and error mapping."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from stillhouse.cli_config import (
    ConfigError,
    ConfigOptions,
    Given,
    config_command,
    fail,
    field_docs,
    save_effective,
    undocumented_fields,
)


@dataclass(frozen=True)
class Toy:
    name: str
    """What to call the run [for example: toy]."""
    lr: float = 0.5
    """Learning
    rate."""
    steps: int = 10
    """Optimizer steps."""
    shuffle: bool = True
    """Shuffle the rows."""
    fast: bool = False
    """Skip the slow checks."""
    loss: Literal["sft", "kl"] = "sft"
    """Which loss."""
    limit: int | None = None
    """Use only the first N rows."""
    stop: tuple[str, ...] = ("\n",)
    """Stop strings."""
    sizes: tuple[int, ...] = ()
    """Snapshot sizes."""
    timeout_s: float = 1.0
    """Seconds per request."""
    pairs: tuple[tuple[str, int], ...] = ()
    """Structured: only through --config."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be > 0, e.g. 1e-4")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: at least 1, or none")


OPTIONS: dict = {"flags": {"timeout_s": "--timeout", "name": ("--name", "-n")}, "skip": ("pairs",)}


def _app() -> typer.Typer:
    def toy(settings: Given[Toy],
            config: Path | None = typer.Option(None, "--config", help="Replay a saved config."),
            save_config: Path | None = typer.Option(None, "--save-config", help="Write the effective config."),
            ) -> None:
        try:
            cfg = settings.resolve(config)
        except ConfigError as exc:
            fail(exc)
        save_effective(cfg, save_config)
        typer.echo(json.dumps({"cfg": cfg.__dict__, "given": sorted(settings.values)}))

    app = typer.Typer()
    app.command("toy")(config_command(toy, ConfigOptions(Toy, **OPTIONS)))  # type: ignore[arg-type]
    app.command("other")(lambda: None)  # a second verb keeps typer in multi-command mode
    return app


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(_app(), ["toy", *args], env={"COLUMNS": "200"})
    return res.exit_code, res.output


def _cfg(*args: str) -> dict:
    code, out = _run(*args)
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_field_docs_reads_each_fields_string_and_collapses_whitespace():
    docs = field_docs(Toy)
    assert docs["lr"] == "Learning rate."
    assert docs["name"] == "What to call the run [for example: toy]."
    assert undocumented_fields(Toy) == []

    @dataclass(frozen=True)
    class Half:
        a: int = 1
        """Documented."""
        b: int = 2

    assert undocumented_fields(Half) == ["b"]


def test_help_shows_every_setting_with_its_docstring_default_and_choices():
    code, out = _run("--help")
    assert code == 0, out
    for text in ("--name", "-n", "What to call the run [for example: toy].", "Required (or --config FILE)",
                 "Learning rate.", "[default: 0.5]", "[default: 10]", "--shuffle", "--no-shuffle",
                 "[default: shuffle]", "--fast", "One of: sft, kl.", "[default: sft]", "INT|none", "Give 'none' for None",
                 "--timeout", "Repeatable; '' for none", "--sizes", "Repeatable or comma-separated"):
        assert text in out, (text, out)
    assert "--pairs" not in out  # skipped: a structured field is set through --config only
    assert "--no-fast" not in out and "--timeout-s" not in out  # an off-by-default bool is a switch; flags replace


def test_types_are_converted_from_the_command_line():
    cfg = _cfg("-n", "a", "--lr", "0.25", "--steps", "3", "--no-shuffle", "--fast", "--loss", "kl", "--limit", "7",
               "--stop", "x", "--stop", "y", "--sizes", "1,2", "--sizes", "5", "--timeout", "2.5")["cfg"]
    assert cfg == {"name": "a", "lr": 0.25, "steps": 3, "shuffle": False, "fast": True, "loss": "kl", "limit": 7,
                   "stop": ["x", "y"], "sizes": [1, 2, 5], "timeout_s": 2.5, "pairs": []}
    cfg = _cfg("--name", "a", "--limit", "none", "--stop", "")["cfg"]
    assert cfg["limit"] is None and cfg["stop"] == [] and cfg["lr"] == 0.5 and cfg["stop"] == []


def test_only_typed_options_override_a_replayed_config(tmp_path):
    saved = tmp_path / "toy.json"
    first = _cfg("--name", "a", "--lr", "0.1", "--no-shuffle", "--limit", "4", "--sizes", "8",
                 "--save-config", str(saved))
    assert json.loads(saved.read_text())["lr"] == 0.1
    replay = _cfg("--config", str(saved))
    assert replay["cfg"] == first["cfg"] and replay["given"] == []
    # typing a default value still overrides the file: "given" comes from the parameter source
    again = _cfg("--config", str(saved), "--lr", "0.5", "--shuffle", "--steps", "11")
    assert again["given"] == ["lr", "shuffle", "steps"]
    assert again["cfg"] == {**first["cfg"], "lr": 0.5, "shuffle": True, "steps": 11}


def test_validation_errors_name_the_option():
    code, out = _run("--name", "a", "--lr", "0")
    assert code == 2 and "error: --lr: lr=0.0: must be > 0" in out, out
    code, out = _run("--name", "a", "--timeout", "x")
    assert code == 2 and "--timeout" in out, out  # typer's own type check
    code, out = _run("--name", "a", "--loss", "mse")
    assert code == 2 and "error: --loss: loss='mse': use one of sft, kl" in out, out
    code, out = _run("--name", "a", "--limit", "many")
    assert code == 2 and "error: --limit: limit='many': not an integer" in out, out
    code, out = _run("--name", "a", "--limit", "0")
    assert code == 2 and "error: --limit: limit=0" in out, out
    code, out = _run("--lr", "0.1")
    assert code == 2 and "error: missing --name" in out, out
    code, out = _run("--config", "/nonexistent/toy.json")
    assert code == 2 and "does not exist" in out, out


def test_bad_values_in_a_replayed_file_are_one_line_errors(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"name": "a", "lr": -1}))
    code, out = _run("--config", str(tmp_path / "bad.json"))
    assert code == 2 and "bad.json" in out and "lr=-1" in out, out


def test_fields_without_a_command_line_form_must_be_skipped_explicitly():
    with pytest.raises(TypeError, match="pairs"):
        ConfigOptions(Toy)
    with pytest.raises(TypeError, match="colour"):
        ConfigOptions(Toy, skip=("pairs", "colour"))


def test_a_verb_parameter_may_not_shadow_a_setting():
    def verb(settings: Given[Toy], lr: float = typer.Option(1.0)) -> None:
        pass

    with pytest.raises(TypeError, match="lr"):
        config_command(verb, ConfigOptions(Toy, skip=("pairs",)))
