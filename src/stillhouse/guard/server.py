"""Running the guard: in the foreground (the CLI) or on a background thread (tests, bench, demo).

``serve_forever(config)`` opens the store named by ``config.db_url``, loads the fitted
detector named by ``config.detector_dir`` (``load_detector``; none when empty) and runs
uvicorn until interrupted. ``start_in_thread(app)`` runs any ASGI app under uvicorn on its own
event loop in a daemon thread, bound to 127.0.0.1 on a free port, and returns once it
accepts connections; ``stop()`` runs the app's lifespan shutdown (which flushes the
traffic log) and joins the thread.

Errors: ``DetectorLoadError(ValueError)`` — ``detector_dir`` is missing or holds no fitted
detector; the message names the directory and the command that writes one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from stillhouse.guard.config import GuardConfig

FIT_HINT = "fit one on benign traffic with `stillhouse detect --fit --log BENIGN_LOG --model {dir}`"


class DetectorLoadError(ValueError):
    """The guard's detector directory is missing or does not hold a fitted detector."""


def load_detector(directory: str | Path) -> Any:
    """The fitted ``WindowDetector`` saved in ``directory`` (by ``stillhouse detect --fit``).

    Raises DetectorLoadError, naming the directory and the fix, when it is missing, has no
    ``detector.json``/``detector.npz`` or they do not hold a fitted detector."""
    import json
    import zipfile

    from stillhouse.config import ConfigError
    from stillhouse.guard.detect.detector import WindowDetector

    d = Path(directory)
    hint = FIT_HINT.format(dir=d)
    if not d.is_dir():
        raise DetectorLoadError(f"detector directory {d} does not exist; {hint}")
    missing = [name for name in ("detector.json", "detector.npz") if not (d / name).is_file()]
    if missing:
        raise DetectorLoadError(f"{d} is not a fitted detector (no {' or '.join(missing)}); {hint}")
    try:
        det = WindowDetector.load(d)
    except (OSError, KeyError, TypeError, ValueError, ConfigError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DetectorLoadError(f"{d} is not a fitted detector ({type(exc).__name__}: {exc}); "
                                f"{hint} again") from exc
    if not det.fitted:
        raise DetectorLoadError(f"{d} holds an unfitted detector (no thresholds); {hint}")
    return det


@dataclass
class ServerThread:
    """A uvicorn server running on a background thread."""

    port: int
    host: str = "127.0.0.1"
    _server: Any = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 20.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not stop within {timeout:g}s")
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> ServerThread:
    """Serve ``app`` with uvicorn on a daemon thread; returns once it listens."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            access_log=False, timeout_graceful_shutdown=5, backlog=4096, proxy_headers=False)
    server = uvicorn.Server(config)
    # uvicorn installs no signal handlers off the main thread, so Ctrl-C still reaches the caller.
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            asyncio.run(server.serve())
        except BaseException as exc:  # noqa: BLE001 - surfaced to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="guard-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if "error" in box or not thread.is_alive():
            raise RuntimeError(f"server failed to start: {box.get('error', 'lifespan startup failed')}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"server did not start within {timeout:g}s")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return ServerThread(bound, host, server, thread)


def serve_forever(config: GuardConfig, detector: Any = None) -> None:
    """Open the store and run the guard under uvicorn until interrupted (the CLI's `guard` verb).

    ``detector``: an already loaded detector (or a ProcessDetector); otherwise the one in
    ``config.detector_dir``, if set, in its own process unless ``config.detect_mode`` is "inline"."""
    import uvicorn

    from stillhouse.guard.app import create_app
    from stillhouse.guard.store import open_store

    if detector is None and config.detector_dir:
        if config.detect_mode == "process":
            from stillhouse.guard.detect.remote import ProcessDetector

            load_detector(config.detector_dir)  # a bad directory fails here, not in the child
            detector = ProcessDetector(config.detector_dir)
        else:
            detector = load_detector(config.detector_dir)
    if detector is not None and config.detector_dir and not hasattr(detector, "submit"):
        from stillhouse.guard.detect.remote import warm_up

        warm_up(config.detector_dir)  # inline: the first observe's imports happen now, not on a request
    store = open_store(config.db_url)
    app = create_app(config, store, detector=detector)
    # proxy_headers=False: the guard alone decides whether X-Forwarded-For is trusted
    # (GuardConfig.trust_forwarded_for); uvicorn's default would take it from any loopback client.
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                lifespan="on", backlog=4096, timeout_graceful_shutdown=10, proxy_headers=False)
