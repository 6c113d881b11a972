"""The main job on the embedded defaults: `make demo`.

Serves the bundled teacher (SmolLM2-135M-Instruct) over an OpenAI-compatible API on
loopback and answers a chat request end to end. Needs no network and no ../shared.

Run:  make demo            (or: .venv/bin/python scripts/demo.py --out runs/demo)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} not healthy after {timeout_s:.0f} s")


def post_json(url: str, body: dict, timeout_s: float = 120.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="run directory for everything the demo writes")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [str(Path(sys.executable).parent / "stillhouse")]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    step(f"serve the bundled teacher on {base}")
    log = open(out / "serve.log", "wb")
    server = subprocess.Popen([*cli, "serve", "--teacher", "bundled", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"{base}/health", server)
        step("chat request with top_logprobs")
        t0 = time.perf_counter()
        reply = post_json(f"{base}/v1/chat/completions", {
            "model": "bundled",
            "messages": [{"role": "user", "content": "What is 12 + 30? Reply with just the number."}],
            "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 3,
        })
        choice = reply["choices"][0]
        print(f"answer: {choice['message']['content']!r}  ({time.perf_counter() - t0:.2f} s)")
        first = choice["logprobs"]["content"][0]
        alts = ", ".join(f"{t['token']!r}:{t['logprob']:.2f}" for t in first["top_logprobs"])
        print(f"first token {first['token']!r} logprob {first['logprob']:.3f}; top-3: {alts}")
        print(f"usage: {reply['usage']}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    print(f"\nDone. Everything the demo wrote is under {out}/")


if __name__ == "__main__":
    main()
