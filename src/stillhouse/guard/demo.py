"""The guard demo: the gateway in front of `stillhouse serve`, one request through it with a key.

    stillhouse guard demo            # starts `stillhouse serve --teacher bundled` (about 30 s to load)
    stillhouse guard demo --fake     # the fake upstream instead (instant)
    stillhouse guard demo --upstream http://127.0.0.1:8000

Steps: start the upstream, start the guard (SQLite log in a temp dir), create an account
and a key through the admin API, send a request without a key (401, upstream untouched)
and one with it (200), then print the traffic record the guard logged.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def _post(url: str, body: Any, token: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _get(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_serve(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cli = Path(sys.executable).parent / "stillhouse"
    with open(workdir / "serve.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([str(cli), "serve", "--teacher", "bundled", "--host", "127.0.0.1", "--port",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`stillhouse serve` exited with code {proc.returncode} (see {workdir}/serve.log); "
                               "run the demo with --fake to use the fake upstream instead")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError("`stillhouse serve` did not become healthy within 300 s")


def run_demo(upstream: str | None = None, fake: bool = False, prompt: str = "What is 12 + 30?") -> dict[str, Any]:
    """Run the demo; returns the logged traffic record."""
    from stillhouse.guard.app import create_app
    from stillhouse.guard.config import GuardConfig, sha256_hex
    from stillhouse.guard.store import open_store
    from stillhouse.http.server import start_in_thread

    work = Path(tempfile.mkdtemp(prefix="stillhouse-guard-demo-"))
    proc = None
    fake_srv = None
    model = "bundled"
    try:
        if upstream:
            base = upstream.rstrip("/")
            model = _get(base + "/v1/models", "none")["data"][0]["id"]
        elif fake:
            from stillhouse.testing.fakeserver import FakeServerConfig
            from stillhouse.testing.fakeserver import start_in_thread as start_fake

            fake_srv = start_fake(FakeServerConfig(latency_ms=5))
            base, model = f"http://127.0.0.1:{fake_srv.port}", fake_srv.server.config.model
        else:
            print("starting `stillhouse serve --teacher bundled` (loading the model takes a while) ...", flush=True)
            proc, base = _start_serve(work)
        admin = secrets.token_urlsafe(24)
        cfg = GuardConfig(upstream_url=base, admin_token_sha256=sha256_hex(admin),
                          db_url=f"sqlite:///{work}/guard.db", spool_dir=str(work / "spool"))
        with start_in_thread(create_app(cfg, open_store(cfg.db_url))) as guard:
            print(f"upstream {base}\nguard    {guard.url}/v1   (log {cfg.db_url})")
            _, acct = _post(guard.url + "/admin/accounts", {"account_id": "demo", "org": "example",
                                                            "signup_path": "web", "country": "FR"}, admin)
            _, issued = _post(guard.url + "/admin/accounts/demo/keys", {}, admin)
            key = issued["key"]
            print(f"account {acct['account_id']!r}, key id {issued['key_id']} (the guard stores only its hash)")
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
                    "temperature": 0}
            status, out = _post(guard.url + "/v1/chat/completions", body, None)
            print(f"without a key: {status} {out['error']['code']}")
            t0 = time.perf_counter()
            status, out = _post(guard.url + "/v1/chat/completions", body, key)
            if status != 200:
                raise RuntimeError(f"request through the guard failed: {status} {out}")
            print(f"with the key:  {status} {out['choices'][0]['message']['content']!r} "
                  f"({time.perf_counter() - t0:.2f} s, usage {out.get('usage')})")
            records = _get(guard.url + "/admin/traffic?account_id=demo", admin)["data"]
            rec = records[-1]
            print("logged:", json.dumps({k: rec[k] for k in ("account_id", "key_id", "client_ip", "model",
                                                             "params", "prompt_tokens", "completion_tokens",
                                                             "latency_ms", "status", "decision")}))
            return rec
    finally:
        if fake_srv is not None:
            fake_srv.stop()
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
