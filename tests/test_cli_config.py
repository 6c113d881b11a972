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


@dataclass(frozen=True)
class Ragged:
    a: int = 1
    """A docstring whose second line
starts at column 0 (the quick cut of the class's text stops there; inspect's source is used)."""
    b: int = 2
    """B."""


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
    assert field_docs(Ragged) == {"a": "A docstring whose second line starts at column 0 (the quick cut of the "
                                       "class's text stops there; inspect's source is used).", "b": "B."}

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
    assert "--no-fast" in out and "--timeout-s" not in out  # both spellings of a bool; flags replace the name


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


# -- the real verbs ------------------------------------------------------------------------------

def _verbs() -> list[tuple[str, type, set[str]]]:
    from stillhouse.arena.run import ArenaConfig
    from stillhouse.distill.curate import CurateConfig
    from stillhouse.distill.evaluate import EvalConfig
    from stillhouse.distill.export import ExportConfig
    from stillhouse.distill.harvest import HarvestConfig
    from stillhouse.distill.train import TrainConfig
    from stillhouse.guard.config import GuardConfig
    from stillhouse.guard.detect import DetectConfig
    from stillhouse.serve.app import ServeConfig

    # (verb, its config, the fields set through --config or the environment only)
    return [("serve", ServeConfig, set()), ("harvest", HarvestConfig, set()), ("export", ExportConfig, set()),
            ("curate", CurateConfig, set()), ("eval", EvalConfig, {"labels"}), ("train", TrainConfig, set()),
            ("guard", GuardConfig, {"admin_token_sha256", "rules"}), ("detect", DetectConfig, {"link_weights"}),
            ("arena", ArenaConfig, {"campaigns"})]


def test_every_setting_of_every_verb_is_an_option_documented_by_its_field():
    import dataclasses

    from stillhouse.cli import app

    group = typer.main.get_command(app)
    for verb, cls, only_in_files in _verbs():
        assert undocumented_fields(cls) == [], (cls.__name__, undocumented_fields(cls))
        params = {p.name: p for p in group.commands[verb].params}  # type: ignore[attr-defined]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in only_in_files:
                assert f.name not in params, (verb, f.name)
                continue
            assert f.name in params, (verb, f.name)
            first_words = " ".join(docs[f.name].replace("``", "`").split()[:3])
            assert first_words in (params[f.name].help or ""), (verb, f.name, params[f.name].help)


def test_old_flag_spellings_still_parse():
    from stillhouse.cli import app

    group = typer.main.get_command(app)
    spelled = {verb: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}  # type: ignore[attr-defined]
               for verb, cmd in group.commands.items()}  # type: ignore[attr-defined]
    old = {"serve": {"-t", "--no-continuous", "--max-batch", "--threads", "--save-config", "--config"},
           "harvest": {"-c", "--timeout", "--price-prompt", "--price-completion", "--logprobs", "--top-logprobs",
                       "--stop", "--no-progress", "--allow-revision-change", "--config"},
           "export": {"-f", "--format", "--heldout", "--include-errors", "--salt"},
           "curate": {"--eval-sets", "--heldout-rule", "--no-heldout-rule", "--keep-truncated", "--sandbox-timeout",
                      "--max-response-tokens", "--out", "--config"},
           "eval": {"--model", "--train-examples", "--max-new-tokens", "--no-kl", "--cache-dir", "--out"},
           "train": {"--data", "--out", "--only-correct", "--no-shuffle", "--freeze-embeddings", "--system-prompt"},
           "guard": {"--upstream", "--db", "--rpm", "--tpm", "--max-streams", "--detector", "--shadow", "--enforce",
                     "--upstream-client", "--detect-mode", "--detect-max-lag", "--spool-dir", "--print-config"},
           "detect": {"--log", "--model", "--fit", "--accounts", "--out", "--show", "--config"},
           "arena": {"--quick", "--gateway", "--upstream", "--days", "--embedder", "--capability",
                     "--capability-only", "--capability-config"}}
    for verb, flags in old.items():
        assert flags <= spelled[verb], (verb, flags - spelled[verb])


def test_verb_help_prose_is_wrapped_by_the_terminal_not_the_source():
    """A docstring paragraph wrapped in the source prints as one paragraph; ``\\b`` blocks keep their lines."""
    from stillhouse.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.strip(" │").split()) for line in result.output.splitlines()]
    # the source breaks this paragraph after "later loads"; a wide terminal prints it on one line
    assert any("safetensors once (~25-40 s); later loads read the cache" in line for line in lines), result.output
    # an example block keeps one command per line
    assert any(line == "stillhouse serve --teacher bundled --port 8000" for line in lines), result.output
    # the command list shows each verb's first paragraph: prose, one line for the terminal to wrap
    group = typer.main.get_command(app)
    for verb, command in group.commands.items():  # type: ignore[attr-defined]
        first = (command.help or "").split("\n\n")[0]
        assert first.startswith("\b") or "\n" not in first, (verb, first)
