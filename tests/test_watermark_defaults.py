"""The watermark's defaults are one: every config and every command-line option starts from WatermarkParams.

Delta 1.5 with the 2.0-nat entropy gate is the setting measured to keep the teacher's accuracy (docs/results.md,
"The entropy gate"); the old delta 2 without the gate cost it 0.263 -> 0.107. A literal repeated in one verb
would silently give a provider the old, bad setting, so each verb's parsed configuration is checked here, not
only its dataclass.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

from stillhouse.cli import app
from stillhouse.watermark.green import DEFAULT_PARAMS, WatermarkParams

WM = WatermarkParams()
SCHEME = {"gamma": WM.gamma, "delta": WM.delta, "context": WM.context, "entropy": WM.entropy}


class Captured(Exception):
    """Raised by a stand-in for the work a verb would do, once it has the verb's configuration."""


def test_the_scheme_default_is_the_measured_setting() -> None:
    assert DEFAULT_PARAMS == WM
    assert (WM.gamma, WM.delta, WM.context, WM.entropy) == (0.25, 1.5, 1, 2.0)


def test_every_config_defaults_to_the_scheme() -> None:
    from stillhouse.arena.provenance import ProvenanceArenaConfig
    from stillhouse.bench.serve import BenchServeConfig, _ServeProcess
    from stillhouse.distill.evaluate import EvalConfig
    from stillhouse.provenance.run import ProvenanceConfig, SuspectConfig
    from stillhouse.serve.app import ServeConfig

    serve = ServeConfig(teacher="bundled", watermark=True)
    assert serve.watermark_params() == WM
    ev = EvalConfig(students=(), watermark_teacher="server/eval/0")
    assert (ev.watermark_gamma, ev.watermark_delta, ev.watermark_context, ev.watermark_entropy) == \
        (WM.gamma, WM.delta, WM.context, WM.entropy)
    bench = BenchServeConfig(watermark=True)
    assert (bench.watermark_delta, bench.watermark_entropy) == (WM.delta, WM.entropy)
    sig = inspect.signature(_ServeProcess.__init__).parameters
    assert (sig["wm_delta"].default, sig["wm_entropy"].default) == (WM.delta, WM.entropy)
    args = _ServeProcess("bundled", 32, 1, True).args
    assert args[args.index("--watermark-delta") + 1] == str(WM.delta)
    assert args[args.index("--watermark-entropy") + 1] == str(WM.entropy)
    arena = ProvenanceArenaConfig()
    assert (arena.gamma, arena.delta, arena.context, arena.entropy) == (WM.gamma, WM.delta, WM.context, WM.entropy)
    text = ProvenanceConfig(source="x.jsonl", key_ids=("account/a/0",))
    assert text.entropy is None and text.gate == WM.entropy and text.params == WM
    for kw in ({"reading": "own"}, {"suspect": "http://127.0.0.1:9/v1"}):
        own = SuspectConfig(source="x.jsonl", key_ids=("account/a/0",), **{"suspect": "bundled", **kw})
        assert own.gate == WM.entropy and own.params == WM, kw
    reads = SuspectConfig(source="x.jsonl", key_ids=("account/a/0",), suspect="bundled")
    assert reads.reads_text and reads.gate == 0.0  # reading SOURCE's texts scores every prediction
    # --entropy 0 still means "score every token", wherever it is given
    assert ProvenanceConfig(source="x.jsonl", key_ids=("account/a/0",), entropy=0.0).gate == 0.0
    assert SuspectConfig(source="x.jsonl", key_ids=("account/a/0",), suspect="bundled", reading="own",
                         entropy=0.0).gate == 0.0


def _options(*path: str) -> dict[str, click.Parameter]:
    cmd: Any = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {p.name: p for p in cmd.params if p.name}


def test_every_option_shows_the_scheme_default() -> None:
    for verb, prefix in ((("serve",), "watermark_"), (("eval",), "watermark_"), (("provenance", "arena"), "")):
        opts = _options(*verb)
        for field, value in SCHEME.items():
            assert opts[prefix + field].default == value, (verb, field)
    bench = _options("bench", "serve")
    assert (bench["watermark_delta"].default, bench["watermark_entropy"].default) == (WM.delta, WM.entropy)
    for verb in ("text", "model"):
        opts = _options("provenance", verb)
        assert (opts["gamma"].default, opts["context"].default) == (WM.gamma, WM.context)
        assert opts["entropy"].default is None  # unset: the scheme's gate where answers are scored
        assert f"serve's default, {WM.entropy:g}" in (opts["entropy"].help or ""), verb


def _capture(monkeypatch: pytest.MonkeyPatch, module: str, name: str, got: list[Any], result: Any = None) -> None:
    def stand_in(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        got.append(cfg)
        if result is None:
            raise Captured
        return result

    monkeypatch.setattr(f"{module}.{name}", stand_in)


def test_each_verb_parses_to_the_scheme_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    runner = CliRunner()
    got: list[Any] = []
    _capture(monkeypatch, "stillhouse.serve.app", "run", got, result=True)
    res = runner.invoke(app, ["serve", "--teacher", "bundled", "--watermark"])
    assert res.exit_code == 0, res.output
    assert got[-1].watermark_params() == WM

    _capture(monkeypatch, "stillhouse.distill.evaluate", "run_eval", got)
    res = runner.invoke(app, ["eval", "--model", "plain=bundled", "--watermark-teacher", "server/eval/0",
                              "--out", str(tmp_path / "e")])
    assert isinstance(res.exception, Captured), res.output
    ev = got[-1]
    assert WatermarkParams(ev.watermark_gamma, ev.watermark_delta, ev.watermark_context, ev.watermark_entropy) == WM

    _capture(monkeypatch, "stillhouse.bench.serve", "run_bench", got)
    res = runner.invoke(app, ["bench", "serve", "--watermark", "--no-peers"])
    assert isinstance(res.exception, Captured), res.output
    assert (got[-1].watermark_delta, got[-1].watermark_entropy) == (WM.delta, WM.entropy)

    report = {"verdict": "", "scores": []}
    _capture(monkeypatch, "stillhouse.provenance.run", "text_provenance", got, result=report)
    _capture(monkeypatch, "stillhouse.provenance.run", "model_provenance", got, result=report)
    res = runner.invoke(app, ["provenance", "text", "x.jsonl", "--key-ids", "account/a/0", "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == report, res.output
    assert got[-1].params == WM
    for extra in (["--reading", "own"], ["--mode", "closed"]):
        suspect = "http://127.0.0.1:9/v1" if "closed" in extra else "bundled"
        res = runner.invoke(app, ["provenance", "model", "x.jsonl", "--suspect", suspect, "--key-ids", "account/a/0",
                                  "--json", *extra])
        assert res.exit_code == 0, (extra, res.output)
        assert got[-1].params == WM and got[-1].gate == WM.entropy, extra


def test_reading_text_takes_no_gate_by_default_and_refuses_an_explicit_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate scores answer text; a suspect reading SOURCE's texts is scored on every prediction. With the gate
    now the default, ``provenance model --reading text`` must still run as given, and refuse only a gate asked
    for by name, in one line."""
    got: list[Any] = []
    _capture(monkeypatch, "stillhouse.provenance.run", "model_provenance", got, result={"verdict": "", "scores": []})
    base = ["provenance", "model", "reading.jsonl", "--suspect", "bundled", "--key-ids", "account/a/0", "--json"]
    runner = CliRunner()
    for extra in ([], ["--reading", "text"], ["--mode", "open", "--reading", "text", "--entropy", "0"]):
        res = runner.invoke(app, [*base, *extra])
        assert res.exit_code == 0, (extra, res.output)
        assert got[-1].reading == "text" and got[-1].gate == 0.0 and got[-1].params.entropy == 0.0, extra
    for given in ("2", "2.0", "0.5"):
        res = runner.invoke(app, [*base, "--reading", "text", "--entropy", given])
        assert res.exit_code == 2, (given, res.output)
        assert "--entropy" in res.output and "the gate scores answer text" in res.output, res.output
        assert "Traceback" not in res.output and res.exception is not None and not isinstance(res.exception, Captured)
    assert len(got) == 3  # the refused runs never reached the test

