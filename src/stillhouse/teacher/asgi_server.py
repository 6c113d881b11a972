"""Run an ASGI app under uvicorn on a loopback socket: in a background thread or bound up front.

``bind_socket`` binds before anything slow happens (port 0 picks a free port), so a busy
port fails fast; ``ServerThread`` runs an app for tests and benchmarks::

    with ServerThread(app) as srv:
        print(srv.base_url)        # http://127.0.0.1:<port>/v1
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
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class ServerThread:
    """Runs an ASGI app under uvicorn in a background thread: ``with ServerThread(app) as s: s.base_url``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 30.0):
        self.app, self.host, self.port = app, host, port
        self.startup_timeout_s = startup_timeout_s
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The API base, ending in /v1."""
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        import uvicorn

        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                                     timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="stillhouse-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
