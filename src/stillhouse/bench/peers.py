"""The peers the benchmarks run against, each in its own pinned virtualenv under the user's cache.

    stillhouse bench peers                  # what is built, where, how big
    stillhouse bench peers --install        # build every peer now (else: on first use)

A peer is a named set of pinned pip requirements (:data:`PEERS`). :func:`ensure_peer` builds its
virtualenv on first use at ``$STILLHOUSE_CACHE/peers/<name>-<version>/`` (default cache
``~/.cache/stillhouse``) and returns its python. The build is atomic: the venv is made and
installed in a hidden ``.<name>-<version>.partial-<pid>`` directory beside it, checked (the
peer's ``check`` program must run), given a marker file (``stillhouse-peer.json``: the pins,
the build environment and ``pip freeze``), and only then renamed into place. A build killed at
any point leaves no directory that looks ready; the next build removes the leftovers. A file
lock keeps two processes from building the same peer at once. A venv whose marker names other
pins (stillhouse moved a pin) is rebuilt.

``--peer-python NAME=PATH`` (any bench) uses an existing virtualenv's python instead.

Errors: :class:`PeerError` (unknown peer, a ``--peer-python`` path that is not there) and its
subclass :class:`PeerInstallError` (pip or the check failed; the message names the failing
requirement, the log file and the command that retries).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "stillhouse-peer.json"
"""Written last into a built venv; its presence (with the current pins) means ready."""


@dataclass(frozen=True)
class Peer:
    """One peer: what to install and how to run it offline."""

    name: str
    version: str
    """The peer's own version (part of the directory name)."""
    requirements: tuple[str, ...]
    """pip requirements, each pinned to an exact version."""
    check: str
    """A short Python program that must exit 0 in the built venv (imports what the bench uses)."""
    used_by: str
    """The bench that runs it, for ``bench peers``."""
    build_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for ``pip install`` (e.g. CMake flags for a source build)."""
    run_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment the bench sets when it runs the peer (offline switches)."""
    note: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"peer name {self.name!r}: use a Python identifier")
        if not self.requirements:
            raise ValueError(f"peer {self.name}: give at least one requirement")

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"


_OFFLINE = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "TELEMETRY_ENABLED": "false"}

PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("curator", "0.1.31", ("bespokelabs-curator==0.1.31",),
         check="from bespokelabs import curator; import litellm",
         used_by="bench harvest",
         run_env={**_OFFLINE, "CURATOR_DISABLE_RICH_DISPLAY": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
         note="runs offline with TIKTOKEN_CACHE_DIR at litellm's bundled tokenizers (the child sets it)"),
    Peer("distilabel", "1.5.3", ("distilabel[openai]==1.5.3", "requests==2.34.2"),
         check="import distilabel, openai, requests; from distilabel.steps.tasks import TextGeneration",
         used_by="bench harvest", run_env=dict(_OFFLINE)),
    # 1.108.7: the version of the published guard figures. From 1.110.0 on, the [proxy] extra needs a
    # `litellm-proxy` package that PyPI does not serve ("from versions: none"), so they do not install.
    Peer("litellm", "1.108.7", ("litellm[proxy]==1.108.7",),
         check="import litellm.proxy.proxy_cli",
         used_by="bench guard",
         run_env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
         note="the proxy, offline: local cost map, a master_key and no database"),
    # transformers as ours, so the student directory the bench writes loads the same way;
    # torch pinned: a bare torch requirement can pull a multi-GB CUDA build.
    Peer("trl", "1.16.0", ("trl==1.16.0", "torch==2.13.0", "transformers==5.25.0"),
         check="import torch, transformers, datasets, trl; from trl import SFTConfig, SFTTrainer; "
               "from trl.experimental.gkd import GKDConfig, GKDTrainer",
         used_by="bench train", run_env=dict(_OFFLINE)),
    # Built from source. Default flags build for the build machine's CPU and died with
    # "Illegal instruction" here; GGML_NATIVE=OFF builds a portable library (about 6-8 minutes on 2 cores).
    Peer("llama_cpp", "0.3.36", ("llama-cpp-python[server]==0.3.36",),
         check="import llama_cpp, llama_cpp.server.app",
         used_by="bench serve",
         build_env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF"},
         note="compiled from source: several minutes"),
)}


class PeerError(RuntimeError):
    """A peer cannot be used: unknown name, or a given python that is not there."""


class PeerInstallError(PeerError):
    """Building a peer's virtualenv failed; the message names the log and how to retry."""


Installer = Callable[[Path, Sequence[str], Mapping[str, str], Path], list[str]]
"""``(python, requirements, build_env, log) -> pip freeze lines``; raises PeerInstallError."""
VenvCreator = Callable[[Path], None]
Say = Callable[[str], None]


def peers_root() -> Path:
    """``$STILLHOUSE_CACHE/peers`` (default ``~/.cache/stillhouse/peers``)."""
    from stillhouse.teacher.bundled import cache_root

    return cache_root() / "peers"


def get_peer(name: str) -> Peer:
    if name not in PEERS:
        raise PeerError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    return PEERS[name]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def read_marker(venv: Path) -> dict[str, Any] | None:
    """The marker of a built venv, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_ready(peer: Peer, venv: Path) -> bool:
    """True when ``venv`` was fully built for exactly ``peer``'s pins."""
    m = read_marker(venv)
    return (m is not None and m.get("requirements") == list(peer.requirements)
            and m.get("build_env") == dict(peer.build_env) and venv_python(venv).exists())


def create_venv(path: Path) -> None:
    """A fresh virtualenv with pip, from the interpreter running stillhouse."""
    import venv

    venv.EnvBuilder(with_pip=True, symlinks=True, clear=True).create(path)


def pip_install(python: Path, requirements: Sequence[str], build_env: Mapping[str, str], log: Path,
                say: Say | None = None) -> list[str]:
    """``python -m pip install REQS`` (output to ``log``; progress lines to ``say``), then ``pip freeze``."""
    cmd = [str(python), "-m", "pip", "install", "--no-input", "--no-compile", "--disable-pip-version-check",
           *requirements]
    env = {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1), **os.environ, **build_env, "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)  # our source tree must not leak into the peer's build or checks
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        if build_env:
            f.write(f"  with {dict(build_env)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if say is not None and line.startswith(("Collecting", "Building", "Installing", "Downloading")):
                say(line.strip()[:100])
        rc = proc.wait()
    if rc != 0:
        raise PeerInstallError(f"pip install {' '.join(requirements)} exited with {rc}: "
                               f"{_failure_line(log)}")
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=False, env=env)
    return [x for x in out.stdout.splitlines() if x.strip()]


def _failure_line(log: Path) -> str:
    """The most telling line of a pip log (the first ERROR line, else the last line)."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if x.startswith("ERROR") or "error:" in x.lower()]
    return (errors[0] if errors else lines[-1] if lines else "")[:300]


@contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same peer
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _relocate_scripts(bindir: Path, old: Path, new: Path) -> None:
    """Point shebangs and activate scripts of a venv built at ``old`` at ``new`` (before the rename)."""
    o, n = str(old).encode(), str(new).encode()
    for f in bindir.iterdir():
        if f.is_symlink() or not f.is_file():
            continue
        data = f.read_bytes()
        if o in data and b"\0" not in data[:4096]:  # text scripts only, never binaries
            f.write_bytes(data.replace(o, n))


def _run_check(peer: Peer, python: Path, log: Path) -> None:
    env = {**os.environ, **peer.run_env}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(python), "-c", peer.check], capture_output=True, text=True, check=False,
                          env=env, timeout=600)
    with log.open("a") as f:
        f.write(f"$ {python} -c {peer.check!r}\n{proc.stdout}{proc.stderr}exit {proc.returncode}\n")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        raise PeerInstallError(f"the installed peer fails its check ({peer.check!r}): {tail}")


def ensure_peer(name: str, *, root: Path | None = None, installer: Installer | None = None,
                create: VenvCreator = create_venv, say: Say | None = None, force: bool = False) -> Path:
    """The python of ``name``'s pinned virtualenv, building it first if it is not ready.

    ``installer`` and ``create`` are injectable (tests build real but empty venvs and fake the
    pip step). ``say`` gets progress lines. ``force`` rebuilds a ready venv.
    """
    peer = get_peer(name)
    root = root if root is not None else peers_root()
    final = root / peer.dirname
    if not force and is_ready(peer, final):
        return venv_python(final)
    with _locked(root, peer.name):
        if not force and is_ready(peer, final):  # built by another process while we waited
            return venv_python(final)
        for old in root.glob(f".{peer.dirname}.partial-*"):  # leftovers of a killed build
            shutil.rmtree(old, ignore_errors=True)
        tmp = root / f".{peer.dirname}.partial-{os.getpid()}"
        log = root / f"{peer.dirname}.install.log"
        log.write_text(f"# building peer {peer.name} {peer.version} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        retry = f"retry with `stillhouse bench peers --install {peer.name}`, or pass --peer-python {peer.name}=PATH"
        t0 = time.monotonic()
        try:
            if say:
                say(f"{peer.name}: creating a virtualenv")
            create(tmp)
            if installer is None:
                freeze = pip_install(venv_python(tmp), peer.requirements, peer.build_env, log, say)
            else:
                freeze = installer(venv_python(tmp), peer.requirements, peer.build_env, log)
            if say:
                say(f"{peer.name}: checking the install")
            _run_check(peer, venv_python(tmp), log)
            _relocate_scripts(tmp / "bin", tmp, final)
            marker = {"name": peer.name, "version": peer.version, "requirements": list(peer.requirements),
                      "build_env": dict(peer.build_env), "python": sys.version.split()[0],
                      "install_s": round(time.monotonic() - t0, 1),
                      "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "freeze": freeze}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        except PeerInstallError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PeerInstallError(f"building peer {peer.name} ({' '.join(peer.requirements)}) failed: {exc}. "
                                   f"Full log: {log}; {retry}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # stale (other pins, or a venv without a marker): move it aside, then drop it
            aside = root / f".{peer.dirname}.partial-old-{os.getpid()}"
            final.rename(aside)
            tmp.rename(final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            tmp.rename(final)
    if say:
        say(f"{peer.name} {peer.version}: built in {time.monotonic() - t0:.0f} s at {final}")
    return venv_python(final)


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["trl=/venv/bin/python", ...]`` -> ``{"trl": "/venv/bin/python"}``, with one-line errors."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PeerError(f"--peer-python {item!r}: write NAME=PATH, e.g. trl=/path/venv/bin/python")
        get_peer(name)
        out[name] = path
    return out


def resolve_python(name: str, overrides: Sequence[str] = (), *, say: Say | None = None,
                   root: Path | None = None, installer: Installer | None = None,
                   create: VenvCreator = create_venv) -> Path:
    """The python to run peer ``name`` with: the ``--peer-python`` override, else the pinned venv
    (built on first use)."""
    given = parse_overrides(overrides).get(name)
    if given is not None:
        p = Path(given).expanduser()
        if not p.exists():
            peer = get_peer(name)
            raise PeerError(f"--peer-python {name}={given}: no such file; give the python of a virtualenv with "
                            f"{' '.join(peer.requirements)}, or drop the option to build the pinned one")
        return p
    return ensure_peer(name, root=root, installer=installer, create=create, say=say)


def run_env(name: str) -> dict[str, str]:
    """The environment to run peer ``name`` in: ours, less PYTHONPATH, plus its offline switches."""
    env = {**os.environ, **get_peer(name).run_env}
    env.pop("PYTHONPATH", None)  # our source tree would shadow nothing useful and may break the peer
    return env


def dir_size(path: Path) -> int:
    """Bytes under ``path`` (files only; links not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def status(root: Path | None = None) -> list[dict[str, Any]]:
    """One row per peer: pins, whether built, where, size and the recorded install time."""
    root = root if root is not None else peers_root()
    rows = []
    for peer in PEERS.values():
        venv = root / peer.dirname
        ready = is_ready(peer, venv)
        m = read_marker(venv) if ready else None
        rows.append({"name": peer.name, "version": peer.version, "requirements": list(peer.requirements),
                     "used_by": peer.used_by, "path": str(venv),
                     "state": "ready" if ready else ("stale" if venv.exists() else "not built"),
                     "size_mb": round(dir_size(venv) / 2**20) if venv.exists() else 0,
                     "install_s": m.get("install_s") if m else None})
    return rows


def check_overrides(items: Sequence[str], field_name: str = "peer_python") -> None:
    """For a bench config's ``__post_init__``: raise ConfigError on a malformed NAME=PATH item."""
    from stillhouse.config import ConfigError

    try:
        parse_overrides(items)
    except PeerError as exc:
        raise ConfigError(f"{field_name}: {exc}") from exc


def prepare(names: Sequence[str], overrides: Sequence[str] = (), console: Any = None) -> tuple[
        dict[str, Path], dict[str, str]]:
    """Resolve (and build, on first use) every peer a bench is about to run, before it measures anything.

    Returns ``(pythons, errors)``: the python per peer that is ready, and a one-line reason per peer
    that is not (the bench reports that column as failed and runs the rest).
    """
    from rich.console import Console
    from rich.markup import escape

    console = console if console is not None else Console(stderr=True)
    pythons: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for name in names:
        peer = get_peer(name)
        t0 = time.monotonic()
        try:
            with console.status(f"peer {name}: looking for its virtualenv") as st:
                def say(msg: str, st: Any = st) -> None:
                    st.update(escape(msg))

                pythons[name] = resolve_python(name, overrides, say=say)
        except PeerError as exc:
            errors[name] = str(exc)
            console.print(f"[red]peer {name}: {escape(str(exc))}[/red]")
            continue
        took = time.monotonic() - t0
        built = f" (built in {took:.0f} s)" if took > 5 else ""
        console.print(f"peer {name} {peer.version}: {escape(str(pythons[name]))}{built}")
    return pythons, errors
