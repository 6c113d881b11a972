"""Run an ASGI app under uvicorn on a loopback socket: in a background thread or bound up front.

``bind_socket`` binds before anything slow happens (port 0 picks a free port), so a busy
port fails fast. ``ServerThread`` runs an app on its own event loop in a daemon thread, for
tests, benchmarks, the demo and the arena; ``stop()`` runs the app's lifespan shutdown (the
guard flushes its traffic log there) and joins the thread::

    with ServerThread(app) as srv:
        print(srv.url, srv.base_url)        # http://127.0.0.1:<port>  http://127.0.0.1:<port>/v1

uvicorn installs no signal handlers off the main thread, so Ctrl-C still reaches the caller.
``proxy_headers`` is off: an app decides itself whether X-Forwarded-For is trusted.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one), ready to hand to uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {exc.strerror}; pick another --port (0 = any free)") from exc
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class ServerThread:
    """An ASGI app under uvicorn in a daemon thread: ``with ServerThread(app) as s: s.base_url``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 30.0,
                 graceful_shutdown_s: float = 5.0):
        self.app, self.host, self.port = app, host, port
        self.startup_timeout_s = startup_timeout_s
        self.graceful_shutdown_s = graceful_shutdown_s
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API base, ending in /v1."""
        return self.url + "/v1"

    def start(self) -> ServerThread:
        """Bind, start uvicorn, and return once it accepts connections (RuntimeError if it cannot)."""
        import uvicorn

        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", lifespan="on", access_log=False, proxy_headers=False,
            # uvicorn annotates int | None but only hands it to asyncio.timeout, which takes float seconds
            timeout_graceful_shutdown=self.graceful_shutdown_s))  # type: ignore[arg-type]

        def run() -> None:
            try:
                self._server.run(sockets=[sock])
            except BaseException as exc:  # noqa: BLE001 - surfaced to the caller of start()
                self._error = exc

        self._thread = threading.Thread(target=run, name="stillhouse-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"server on {self.host}:{self.port} failed to start: "
                                   f"{self._error or 'lifespan startup failed'}")
            if time.monotonic() > deadline:
                self._server.should_exit = True
                raise RuntimeError(f"server on {self.host}:{self.port} did not start within "
                                   f"{self.startup_timeout_s:g} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Ask uvicorn to exit (running the lifespan shutdown) and join the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not stop within {timeout:g} s")
        self._server = self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> ServerThread:
    """Serve ``app`` on a daemon thread; returns the running :class:`ServerThread` once it listens."""
    return ServerThread(app, host, port, startup_timeout_s=timeout).start()
