"""The peer registry and the pinned-virtualenv builder (bench/peers.py), offline.

Real virtualenvs are built (without pip, so in well under a second); the pip step is an
injected installer that writes a module into the venv (or fails), so no test reaches a registry.
Building real peers is exercised by `stillhouse bench peers --install` (see the slow test).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from stillhouse.bench import peers as P


def make_venv(path: Path) -> None:
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(path)


def site_packages(python: Path) -> Path:
    return next((python.parent.parent / "lib").glob("python3*/site-packages"))


def fake_installer(module: str = "fakepeer_mod", freeze: tuple[str, ...] = ("fakepeer==1.0",)):
    """Writes ``module`` into the venv and a console script whose shebang names the build dir."""
    calls: list[tuple[str, ...]] = []

    def install(python: Path, requirements, build_env, log: Path) -> list[str]:
        calls.append(tuple(requirements))
        (site_packages(python) / f"{module}.py").write_text("VALUE = 42\n")
        script = python.parent / "fakepeer"
        script.write_text(f"#!{python}\nimport {module}; print({module}.VALUE)\n")
        script.chmod(0o755)
        log.write_text(log.read_text() + f"installed {requirements} with {dict(build_env)}\n")
        return list(freeze)

    install.calls = calls  # type: ignore[attr-defined]
    return install


def failing_installer(python: Path, requirements, build_env, log: Path) -> list[str]:
    log.write_text(log.read_text() + "ERROR: No matching distribution found for fakepeer==9.9\n")
    raise P.PeerInstallError(f"pip install {' '.join(requirements)} exited with 1: "
                             "ERROR: No matching distribution found for fakepeer==9.9")


@pytest.fixture
def fake_peer(monkeypatch):
    peer = P.Peer("fakepeer", "1.0", ("fakepeer==1.0",), check="import fakepeer_mod", used_by="tests",
                  build_env={"CMAKE_ARGS": "-DX=OFF"}, run_env={"FAKEPEER_OFFLINE": "1"})
    monkeypatch.setitem(P.PEERS, "fakepeer", peer)
    return peer


def test_registry_pins_every_requirement_exactly():
    assert set(P.PEERS) == {"curator", "distilabel", "litellm", "trl", "llama_cpp"}
    for peer in P.PEERS.values():
        for req in peer.requirements:
            _name, sep, version = req.partition("==")
            assert sep and version and not any(c in version for c in "<>=*,~! "), (peer.name, req)
        assert peer.dirname == f"{peer.name}-{peer.version}"
        assert any(peer.version in r for r in peer.requirements), peer.name  # the dir name tells the pin
    trl = dict(r.split("==") for r in P.PEERS["trl"].requirements)
    assert trl["torch"] == "2.13.0"  # never a bare torch: it can pull a multi-GB CUDA build
    assert P.PEERS["llama_cpp"].build_env["CMAKE_ARGS"] == "-DGGML_NATIVE=OFF"
    assert P.PEERS["litellm"].run_env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


def test_peers_root_follows_stillhouse_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path / "c"))
    assert P.peers_root() == tmp_path / "c" / "peers"
    monkeypatch.delenv("STILLHOUSE_CACHE")
    assert P.peers_root() == Path.home() / ".cache" / "stillhouse" / "peers"


def test_build_writes_marker_with_pins_and_relocates_scripts(fake_peer, tmp_path):
    inst = fake_installer()
    lines: list[str] = []
    py = P.ensure_peer("fakepeer", root=tmp_path, installer=inst, create=make_venv, say=lines.append)
    final = tmp_path / "fakepeer-1.0"
    assert py == final / "bin" / "python" and py.exists()
    marker = json.loads((final / P.MARKER).read_text())
    assert marker["requirements"] == ["fakepeer==1.0"] and marker["build_env"] == {"CMAKE_ARGS": "-DX=OFF"}
    assert marker["freeze"] == ["fakepeer==1.0"] and marker["install_s"] >= 0
    assert P.is_ready(fake_peer, final)
    assert not list(tmp_path.glob(".fakepeer-1.0.partial-*"))
    # the console script was written with the build dir in its shebang; after the rename it runs
    out = subprocess.run([str(final / "bin" / "fakepeer")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "42"
    assert any("built in" in x for x in lines)
    # ready: a second call builds nothing
    assert P.ensure_peer("fakepeer", root=tmp_path, installer=inst, create=make_venv) == py
    assert len(inst.calls) == 1


def test_failed_install_leaves_no_ready_venv_and_says_how_to_retry(fake_peer, tmp_path):
    with pytest.raises(P.PeerInstallError) as err:
        P.ensure_peer("fakepeer", root=tmp_path, installer=failing_installer, create=make_venv)
    msg = str(err.value)
    assert "No matching distribution found for fakepeer==9.9" in msg
    assert "stillhouse bench peers --install fakepeer" in msg and "--peer-python fakepeer=PATH" in msg
    log = tmp_path / "fakepeer-1.0.install.log"
    assert str(log) in msg and "No matching distribution" in log.read_text()
    assert not (tmp_path / "fakepeer-1.0").exists()
    assert not list(tmp_path.glob(".fakepeer-1.0.partial-*"))
    assert P.status(tmp_path)[-1]["state"] == "not built"


def test_failed_check_leaves_no_ready_venv(fake_peer, tmp_path):
    inst = fake_installer(module="some_other_module")  # installs, but not what the check imports
    with pytest.raises(P.PeerInstallError, match="fails its check"):
        P.ensure_peer("fakepeer", root=tmp_path, installer=inst, create=make_venv)
    assert not (tmp_path / "fakepeer-1.0").exists()


def test_interrupted_build_cleans_up(fake_peer, tmp_path):
    def interrupted(python, requirements, build_env, log):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        P.ensure_peer("fakepeer", root=tmp_path, installer=interrupted, create=make_venv)
    assert not (tmp_path / "fakepeer-1.0").exists()
    assert not list(tmp_path.glob(".fakepeer-1.0.partial-*"))


KILLED_BUILD = r'''
import sys, time, venv
from pathlib import Path
from stillhouse.bench import peers as P
P.PEERS["fakepeer"] = P.Peer("fakepeer", "1.0", ("fakepeer==1.0",), check="pass", used_by="tests")
def slow(python, requirements, build_env, log):
    (python.parent.parent / "half-installed").write_text("x")
    print("INSTALLING", flush=True)
    time.sleep(60)
    return []
P.ensure_peer("fakepeer", root=Path(sys.argv[1]), installer=slow,
              create=lambda p: venv.EnvBuilder(with_pip=False, symlinks=True).create(p))
'''


def test_kill_9_mid_install_leaves_nothing_that_looks_ready(fake_peer, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(P.__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "INSTALLING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert not (tmp_path / "fakepeer-1.0").exists()
    partial = list(tmp_path.glob(".fakepeer-1.0.partial-*"))
    assert len(partial) == 1 and (partial[0] / "half-installed").exists()
    assert not P.is_ready(fake_peer, partial[0])
    # the next build removes the leftover and builds a ready venv
    P.ensure_peer("fakepeer", root=tmp_path, installer=fake_installer(), create=make_venv)
    assert P.is_ready(fake_peer, tmp_path / "fakepeer-1.0")
    assert not list(tmp_path.glob(".fakepeer-1.0.partial-*"))


def test_changed_pins_rebuild_a_stale_venv(fake_peer, tmp_path, monkeypatch):
    P.ensure_peer("fakepeer", root=tmp_path, installer=fake_installer(), create=make_venv)
    moved = P.Peer("fakepeer", "1.0", ("fakepeer==1.0", "extra==2.0"), check="import fakepeer_mod",
                   used_by="tests", build_env={"CMAKE_ARGS": "-DX=OFF"})
    monkeypatch.setitem(P.PEERS, "fakepeer", moved)
    final = tmp_path / "fakepeer-1.0"
    assert not P.is_ready(moved, final)
    assert P.status(tmp_path)[-1]["state"] == "stale"
    inst = fake_installer(freeze=("fakepeer==1.0", "extra==2.0"))
    P.ensure_peer("fakepeer", root=tmp_path, installer=inst, create=make_venv)
    assert inst.calls == [("fakepeer==1.0", "extra==2.0")]
    assert json.loads((final / P.MARKER).read_text())["requirements"] == ["fakepeer==1.0", "extra==2.0"]
    assert not list(tmp_path.glob(".fakepeer-1.0.partial-*"))


def test_a_venv_without_marker_is_not_ready(fake_peer, tmp_path):
    make_venv(tmp_path / "fakepeer-1.0")  # e.g. made by hand, or by an older stillhouse
    assert not P.is_ready(fake_peer, tmp_path / "fakepeer-1.0")
    (tmp_path / "fakepeer-1.0" / P.MARKER).write_text("{not json")
    assert not P.is_ready(fake_peer, tmp_path / "fakepeer-1.0")


def test_overrides(fake_peer, tmp_path):
    assert P.parse_overrides(["trl=/x/bin/python", "litellm=/y"]) == {"trl": "/x/bin/python", "litellm": "/y"}
    for bad in ("trl", "trl=", "=/x"):
        with pytest.raises(P.PeerError, match="NAME=PATH"):
            P.parse_overrides([bad])
    with pytest.raises(P.PeerError, match="unknown peer 'nope'"):
        P.parse_overrides(["nope=/x"])
    with pytest.raises(P.PeerError, match="no such file"):
        P.resolve_python("fakepeer", [f"fakepeer={tmp_path / 'missing'}"], root=tmp_path)
    given = tmp_path / "python"
    given.write_text("")
    # an existing override is used as given: nothing is built
    assert P.resolve_python("fakepeer", [f"fakepeer={given}"], root=tmp_path, installer=failing_installer) == given
    assert not (tmp_path / "fakepeer-1.0").exists()


def test_run_env_adds_offline_switches_and_drops_pythonpath(fake_peer, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/src")
    env = P.run_env("fakepeer")
    assert env["FAKEPEER_OFFLINE"] == "1" and "PYTHONPATH" not in env


def test_failure_line_picks_the_pip_error(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("Collecting a\n  Downloading a.whl\nERROR: Could not build wheels for b\nsomething else\n")
    assert P._failure_line(log) == "ERROR: Could not build wheels for b"


def test_cli_lists_peers_and_rejects_unknown(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stillhouse.cli import app

    monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path))
    r = CliRunner().invoke(app, ["bench", "peers", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows] == list(P.PEERS) and {x["state"] for x in rows} == {"not built"}
    assert rows[0]["path"] == str(tmp_path / "peers" / "curator-0.1.31")
    r = CliRunner().invoke(app, ["bench", "peers", "--install", "nope"])
    assert r.exit_code == 2 and "unknown peer" in r.output


@pytest.mark.slow
def test_real_peers_build_and_pass_their_checks():
    """Builds (or finds built) every real peer under $STILLHOUSE_CACHE: minutes to tens of minutes."""
    for name in P.PEERS:
        py = P.ensure_peer(name)
        assert py.exists() and P.is_ready(P.PEERS[name], py.parent.parent)


# -- the benches' side: options, config validation, the peer column in tables ------------------------

def test_bench_configs_take_peers_and_validate_overrides(tmp_path):
    from stillhouse.bench.guard import GuardBenchConfig
    from stillhouse.bench.harvest import BenchConfig
    from stillhouse.bench.serve import BenchServeConfig
    from stillhouse.bench.train import BenchTrainConfig
    from stillhouse.config import ConfigError

    assert BenchConfig().wants("curator") and BenchConfig().wants("distilabel")
    off = BenchConfig(peers=False)
    assert not off.wants("curator") and not off.wants("distilabel") and off.wants("ours")
    assert not BenchConfig(peers=False, only=("curator",)).wants("curator")
    for cls in (BenchConfig, GuardBenchConfig, BenchTrainConfig, BenchServeConfig):
        assert cls().peers is True and cls().peer_python == ()
        with pytest.raises(ConfigError, match="peer_python.*NAME=PATH"):
            cls(peer_python=("trl",))
        with pytest.raises(ConfigError, match="unknown peer 'vllm'"):
            cls(peer_python=("vllm=/x",))
        cls(peer_python=(f"trl={tmp_path}/python",))  # well-formed; existence is checked when it runs


def test_cli_rejects_a_malformed_peer_python():
    from typer.testing import CliRunner

    from stillhouse.cli import app

    r = CliRunner().invoke(app, ["bench", "harvest", "--peer-python", "curator"])
    assert r.exit_code == 2 and "NAME=PATH" in r.output


def test_serve_table_has_the_llama_cpp_column_and_ratio():
    from stillhouse.bench.serve import render_markdown

    def col(tps: float, ratio: float) -> dict:
        return {"tokens_per_s": tps, "ratio_to_generate": ratio}

    result = {"config": {"concurrency": [1, 8]},
              "generate_one_at_a_time": {"tokens_per_s": 20.0, "before": col(19.0, 0), "after": col(21.0, 0)},
              "columns": {"serve": {"1": col(18.0, 0.9), "8": col(90.0, 4.5)},
                          "serve_b1": {"1": col(18.0, 0.9), "8": col(19.0, 0.95)},
                          "llama_cpp": {"1": col(45.0, 2.25), "8": col(40.0, 2.0)}}}
    md = render_markdown(result)
    assert "`llama_cpp.server` (peer)" in md
    assert f"| 8 | 90.00 tok/s (**4.50x**) | 19.00 tok/s (0.95x) | 40.00 tok/s (2.00x) | **{90 / 40:.2f}x** |" in md
    del result["columns"]["llama_cpp"]
    result["peer_errors"] = {"llama_cpp": "teacher 'hf:/m' is no GGUF file"}
    md = render_markdown(result)
    assert "llama.cpp" not in md.splitlines()[0] and "llama_cpp: not run: teacher 'hf:/m' is no GGUF file" in md


def test_serve_finds_the_gguf_llama_cpp_serves(tmp_path):
    from stillhouse.bench.serve import gguf_file

    assert gguf_file(f"gguf:{tmp_path}/m.gguf") == tmp_path / "m.gguf"
    assert gguf_file(f"hf:{tmp_path}") is None
    bundled = gguf_file("bundled")
    assert bundled is not None and bundled.suffix == ".gguf" and bundled.is_file()


@pytest.mark.slow
def test_bench_serve_runs_the_llama_cpp_column(tmp_path):
    """The real peer on the bundled GGUF (builds llama-cpp-python on first use: many minutes)."""
    from stillhouse.bench.serve import BenchServeConfig, run_bench

    r = run_bench(BenchServeConfig(concurrency=(1,), requests=2, baseline_requests=1, max_tokens=8))
    assert r["peer_errors"] == {}
    col = r["columns"]["llama_cpp"]["1"]
    assert col["errors"] == 0 and col["completion_tokens"] > 0 and col["tokens_per_s"] > 0


def test_bench_serve_passes_the_watermark_setting_to_the_watermarked_column():
    from stillhouse.bench.serve import BenchServeConfig, _ServeProcess

    with pytest.raises(ValueError, match="watermark_entropy"):
        BenchServeConfig(watermark=True, watermark_entropy=-1.0)
    with pytest.raises(ValueError, match="watermark_delta"):
        BenchServeConfig(watermark=True, watermark_delta=30.0)
    with pytest.raises(ValueError, match="watermark_scheme='aar'"):
        BenchServeConfig(watermark=True, watermark_scheme="aar")
    with pytest.raises(ValueError, match="temperature=-0.5"):
        BenchServeConfig(temperature=-0.5)
    args = _ServeProcess("bundled", 32, 1, True, 1.5, 2.0, "exp").args
    assert args[args.index("--watermark-delta") + 1] == "1.5" and args[args.index("--watermark-entropy") + 1] == "2.0"
    assert args[args.index("--watermark-scheme") + 1] == "exp"
    assert "--watermark" not in _ServeProcess("bundled", 32, 1).args


def test_bench_serve_client_sends_the_temperature_and_a_seed_per_request():
    """The load generator against a real loopback server that records what it was sent."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from stillhouse.bench.serve import _drive
    from stillhouse.serve.app import ServerThread

    seen = []

    async def chat(request):
        seen.append(await request.json())
        return JSONResponse({"usage": {"completion_tokens": 3}})

    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    with ServerThread(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])) as srv:
        hot = asyncio.run(_drive(srv.base_url, convs, 2, 8, "m", 0.7))
        asyncio.run(_drive(srv.base_url, convs[:1], 1, 8, "m"))
    assert hot["completion_tokens"] == 12 and hot["errors"] == 0
    assert sorted((b["temperature"], b["seed"]) for b in seen[:4]) == [(0.7, 0), (0.7, 1), (0.7, 2), (0.7, 3)]
    assert seen[4]["temperature"] == 0 and "seed" not in seen[4]
