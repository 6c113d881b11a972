"""``stillhouse bench serve``: completion tokens/s of ``stillhouse serve`` against one-at-a-time.

One run, one model, four ways of serving it on the same prompts:

    generate()   the model's plain ``transformers`` ``generate()``, one request at a time
                 (the baseline every ratio is against)
    serve b=1    ``stillhouse serve`` with batching disabled (max_batch 1)
    serve        ``stillhouse serve`` with continuous batching (max_batch 32)
    llama.cpp    the peer: ``llama_cpp.server`` (llama-cpp-python, in its pinned virtualenv,
                 see :mod:`stillhouse.bench.peers`) on the same GGUF file, with as many threads
                 as torch uses; it decodes one request at a time
    serve+wm     the same with ``--watermark`` (``watermark=True``): what keyed green lists cost

Each server column is measured at concurrency 1, 8 and 32 by an aiohttp client on
loopback (greedy unless ``temperature`` is given, ``max_tokens`` per request, tokens counted from ``usage``). Each server
is a child process; the baseline runs in this process before and after the server columns
and their mean is the reference for every ratio. The llama.cpp column needs a GGUF teacher
(``bundled`` or ``gguf:FILE``); ``--no-peers`` leaves it out.

Run::

    nice -n 10 stillhouse bench serve --teacher bundled --out runs/bench-serve.json
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

from stillhouse.watermark.green import DEFAULT_PARAMS


@dataclass(frozen=True)
class BenchServeConfig:
    """What the benchmark runs."""

    teacher: str = "bundled"
    """A local teacher spec (bundled, hf:DIR, gguf:FILE)."""
    concurrency: tuple[int, ...] = (1, 8, 32)
    """Client concurrency levels for the server columns."""
    requests: int = 0
    """Requests per level; 0 means max(8, concurrency)."""
    baseline_requests: int = 8
    """Requests for the one-at-a-time generate() baseline."""
    max_tokens: int = 64
    """max_tokens of every request (greedy by default, so lengths match across columns)."""
    max_batch: int = 32
    """max_batch of the batching server."""
    threads: int = 0
    """torch CPU threads for every column; 0 keeps torch's default."""
    peers: bool = True
    """Run the llama.cpp column, building llama-cpp-python's pinned virtualenv on first use."""
    peer_python: tuple[str, ...] = ()
    """``llama_cpp=PATH``: run llama.cpp with this python instead of its pinned virtualenv."""
    watermark: bool = False
    """Also measure the batching server with --watermark (a fresh random secret), right after the plain one."""
    watermark_delta: float = DEFAULT_PARAMS.delta
    """The watermarked column's --watermark-delta (serve's default)."""
    watermark_entropy: float = DEFAULT_PARAMS.entropy
    """The watermarked column's --watermark-entropy (the entropy gate, nats; 0 = none; serve's default)."""
    watermark_scheme: str = DEFAULT_PARAMS.scheme
    """The watermarked column's --watermark-scheme (exp draws sampled answers itself: measure it with temperature)."""
    temperature: float = 0.0
    """Temperature of every server column's requests (0 = greedy; above 0 each request carries its own seed). The
    generate() baseline stays greedy."""

    def __post_init__(self) -> None:
        from stillhouse.bench.peers import check_overrides
        from stillhouse.teacher.spec import parse_spec

        check_overrides(self.peer_python)

        if not parse_spec(self.teacher).is_local:
            raise ValueError(f"teacher={self.teacher!r}: bench serve needs a local teacher (bundled, hf:, gguf:)")
        if not self.concurrency or any((not isinstance(c, int)) or c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency={self.concurrency!r}: give positive integers, e.g. 1,8,32")
        for name in ("baseline_requests", "max_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.requests < 0:
            raise ValueError(f"requests={self.requests}: must be >= 0 (0 = max(8, concurrency))")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature}: must be in [0, 2] (0 = greedy)")
        from stillhouse.watermark.green import WatermarkParams

        try:
            WatermarkParams(delta=self.watermark_delta, entropy=self.watermark_entropy, scheme=self.watermark_scheme)
        except ValueError as exc:
            raise ValueError(f"watermark_{exc}") from exc


def prompts(count: int) -> list[list[dict[str, str]]]:
    """Distinct short chat prompts (the same list for every column)."""
    topics = ["the sea", "a city at night", "prime numbers", "an old clock", "rain", "a mountain", "bread",
              "a library", "the moon", "a garden"]
    return [[{"role": "user", "content": f"Write three sentences about {topics[i % len(topics)]} "
                                         f"and the number {i}."}] for i in range(count)]


def baseline_generate(model: Any, tokenizer: Any, convs: list[list[dict[str, str]]], max_tokens: int,
                      encode: Any) -> dict[str, float]:
    """Plain ``generate()`` one request at a time: completion tokens/s and latency."""
    import torch

    eos = tokenizer.eos_token_id
    tokens, lat = 0, []
    t0 = time.perf_counter()
    for conv in convs:
        ids = encode(conv)
        s = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos)
        new = out[0, len(ids):].tolist()
        tokens += new.index(eos) if eos in new else len(new)
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    return {"requests": len(convs), "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": statistics.median(lat)}


async def _drive(base_url: str, convs: list[list[dict[str, str]]], concurrency: int, max_tokens: int,
                 model: str, temperature: float = 0.0) -> dict[str, Any]:
    import aiohttp

    todo: asyncio.Queue[tuple[int, list[dict[str, str]]]] = asyncio.Queue()
    for i, c in enumerate(convs):
        todo.put_nowait((i, c))
    tokens, lat, errors = 0, [], 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, errors
        while True:
            try:
                i, conv = todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            s = time.perf_counter()
            req: dict[str, Any] = {"model": model, "messages": conv, "max_tokens": max_tokens,
                                   "temperature": temperature}
            if temperature > 0:
                req["seed"] = i  # the same draws in every column
            async with session.post(f"{base_url}/chat/completions", json=req) as r:
                body = await r.json()
            if r.status != 200:
                errors += 1
                continue
            tokens += body["usage"]["completion_tokens"]
            lat.append(time.perf_counter() - s)

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": len(convs), "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": statistics.median(lat) if lat else float("nan"), "errors": errors}


class _ServeProcess:
    """``stillhouse serve`` in a child process on a free loopback port (as users run it)."""

    def __init__(self, teacher: str, max_batch: int, threads: int, watermark: bool = False,
                 wm_delta: float = DEFAULT_PARAMS.delta, wm_entropy: float = DEFAULT_PARAMS.entropy,
                 wm_scheme: str = DEFAULT_PARAMS.scheme):
        self.args = ["serve", "--teacher", teacher, "--port", "0", "--max-batch", str(max_batch)]
        if threads:
            self.args += ["--threads", str(threads)]
        self.env = dict(os.environ)
        if watermark:
            import secrets

            self.args += ["--watermark", "--watermark-secret-env", "STILLHOUSE_BENCH_WM_SECRET",
                          "--watermark-delta", str(wm_delta), "--watermark-entropy", str(wm_entropy),
                          "--watermark-scheme", wm_scheme]
            self.env["STILLHOUSE_BENCH_WM_SECRET"] = secrets.token_urlsafe(32)
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> Self:
        # python -m: the child runs the very code (and interpreter) of this process
        self.proc = subprocess.Popen([sys.executable, "-m", "stillhouse", *self.args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True,
                                     env={**self.env, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 600
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"stillhouse serve exited with {self.proc.returncode}")
            if "listening on " in line:
                self.base_url = line.split("listening on ")[1].split()[0]
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
                return self
        raise RuntimeError("stillhouse serve did not start within 600 s")

    def health(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.base_url[:-3] + "/health", timeout=30) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class _LlamaCppProcess:
    """``python -m llama_cpp.server`` from the peer's virtualenv on a free loopback port."""

    def __init__(self, python: Path, gguf: Path, name: str, threads: int, log: Path):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.argv = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name,
                     "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
                     "--n_threads", str(threads), "--n_threads_batch", str(threads),
                     "--interrupt_requests", "False"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Self:
        import urllib.request

        from stillhouse.bench.peers import run_env

        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=run_env("llama_cpp"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}; log tail: "
                                   f"{self.log.read_text(errors='replace')[-600:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("llama_cpp.server did not start within 300 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def gguf_file(teacher: str) -> Path | None:
    """The GGUF file a teacher spec loads from (None for an HF directory: llama.cpp cannot serve it)."""
    from stillhouse.teacher.bundled import bundled_gguf_path
    from stillhouse.teacher.spec import parse_spec

    spec = parse_spec(teacher)
    if spec.kind == "bundled":
        return bundled_gguf_path()
    return Path(spec.target) if spec.kind == "gguf" else None


def _requests_at(cfg: BenchServeConfig, c: int, one_at_a_time: bool) -> int:
    if cfg.requests:
        return cfg.requests
    return 8 if one_at_a_time else max(8, c)  # one decode at a time: more requests only queue longer


def run_bench(cfg: BenchServeConfig, progress: Any = None) -> dict[str, Any]:
    """Run every column; returns a JSON-ready dict with figures and ratios to the baseline.

    The baseline runs in this process before and after the server columns (their mean is
    the reference, so drift in machine load hits both sides); each server column is a
    ``stillhouse serve`` child process with the same torch thread count.
    """
    import platform

    import torch

    from stillhouse.teacher.bundled import load_model, model_name
    from stillhouse.teacher.local import LocalTeacher

    def say(msg: str) -> None:
        if progress:
            progress(msg)

    from stillhouse.bench.peers import prepare

    load_start = os.getloadavg()
    gguf = gguf_file(cfg.teacher)
    peer_errors: dict[str, str] = {}
    peer_py: dict[str, Path] = {}
    if cfg.peers and gguf is None:
        peer_errors["llama_cpp"] = f"teacher {cfg.teacher!r} is no GGUF file: llama.cpp serves bundled or gguf:FILE"
    elif cfg.peers:  # the peer first: a first-use build must finish before anything is measured
        peer_py, peer_errors = prepare(["llama_cpp"], cfg.peer_python)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer, revision = load_model(cfg.teacher)
    name = model_name(cfg.teacher)
    n_max = max(max(8, c) if cfg.requests == 0 else cfg.requests for c in cfg.concurrency)
    convs = prompts(max(n_max, cfg.baseline_requests))
    probe = LocalTeacher(model, tokenizer, name=name, revision=revision)
    say("warm-up (first forward passes are slow and are not timed)")
    baseline_generate(model, tokenizer, convs[:1], 4, probe.encode)
    say(f"baseline: generate() one at a time, {cfg.baseline_requests} requests")
    before = baseline_generate(model, tokenizer, convs[:cfg.baseline_requests], cfg.max_tokens, probe.encode)
    say(f"  {before['tokens_per_s']:.2f} tok/s")
    columns: dict[str, dict[str, Any]] = {}
    runs = [("serve", cfg.max_batch, False), *([("serve_wm", cfg.max_batch, True)] if cfg.watermark else []),
            ("serve_b1", 1, False)]
    for label, max_batch, wm in runs:
        with _ServeProcess(cfg.teacher, max_batch, cfg.threads, wm, cfg.watermark_delta, cfg.watermark_entropy,
                           cfg.watermark_scheme) as srv:
            # warm-up, not timed: two whole requests (the first measured column still reads low at concurrency 1 at
            # T 0.7 after it, 11.9 tok/s against 14.3 for the next; one config started four times read 12.2-14.6)
            asyncio.run(_drive(srv.base_url, convs[:2], 1, cfg.max_tokens, name, cfg.temperature))
            for c in cfg.concurrency:
                n = _requests_at(cfg, c, one_at_a_time=max_batch == 1)
                say(f"{label} (max_batch={max_batch}) at concurrency {c}: {n} requests")
                res = asyncio.run(_drive(srv.base_url, convs[:n], c, cfg.max_tokens, name, cfg.temperature))
                res["max_batch_seen"] = srv.health().get("max_batch_seen")
                columns.setdefault(label, {})[str(c)] = res
                say(f"  {res['tokens_per_s']:.2f} tok/s")
    if "llama_cpp" in peer_py and gguf is not None:
        threads = torch.get_num_threads()
        try:
            with _LlamaCppProcess(peer_py["llama_cpp"], gguf, name, threads,
                                  Path(tempfile.gettempdir()) / f"bench-serve-llama-cpp-{os.getpid()}.log") as peer:
                asyncio.run(_drive(peer.base_url, convs[:2], 1, cfg.max_tokens, name, cfg.temperature))  # warm-up
                for c in cfg.concurrency:
                    n = _requests_at(cfg, c, one_at_a_time=True)
                    say(f"llama_cpp ({threads} threads) at concurrency {c}: {n} requests")
                    res = asyncio.run(_drive(peer.base_url, convs[:n], c, cfg.max_tokens, name, cfg.temperature))
                    columns.setdefault("llama_cpp", {})[str(c)] = res
                    say(f"  {res['tokens_per_s']:.2f} tok/s")
        except RuntimeError as exc:
            peer_errors["llama_cpp"] = str(exc)
            say(f"llama_cpp failed: {exc}")
    say(f"baseline again: generate() one at a time, {cfg.baseline_requests} requests")
    after = baseline_generate(model, tokenizer, convs[:cfg.baseline_requests], cfg.max_tokens, probe.encode)
    say(f"  {after['tokens_per_s']:.2f} tok/s")
    probe.close()
    reference = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    for col in columns.values():
        for res in col.values():
            res["ratio_to_generate"] = res["tokens_per_s"] / reference
    return {
        "config": asdict(cfg), "model": name, "revision": revision,
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_avg_start": load_start,
                    "load_avg_end": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "generate_one_at_a_time": {"before": before, "after": after, "tokens_per_s": reference},
        "columns": columns,
        "peers": {k: str(v) for k, v in peer_py.items()}, "peer_errors": peer_errors,
    }


def render_markdown(result: dict[str, Any]) -> str:
    """A markdown table of one run: tokens/s and ratios to the generate() baseline (and to llama.cpp)."""
    base = result["generate_one_at_a_time"]
    peer = result["columns"].get("llama_cpp")
    wm = "serve_wm" in result["columns"]
    head = "| concurrency | `stillhouse serve` (continuous batching) | "
    head += "`serve --watermark` (vs serve) | " if wm else ""
    head += "`serve` with max_batch 1 | "
    if peer:
        head += "`llama_cpp.server` (peer) | `serve` ÷ llama.cpp | "
    lines = [head + "plain `generate()` one at a time |", "|---" * (4 + (2 if peer else 0) + wm) + "|"]
    for c in result["config"]["concurrency"]:
        a = result["columns"]["serve"][str(c)]
        b = result["columns"]["serve_b1"][str(c)]
        row = f"| {c} | {a['tokens_per_s']:.2f} tok/s (**{a['ratio_to_generate']:.2f}x**) | "
        if wm:
            w = result["columns"]["serve_wm"][str(c)]
            row += f"{w['tokens_per_s']:.2f} tok/s ({w['tokens_per_s'] / a['tokens_per_s']:.3f}x) | "
        row += f"{b['tokens_per_s']:.2f} tok/s ({b['ratio_to_generate']:.2f}x) | "
        if peer:
            p = peer[str(c)]
            row += (f"{p['tokens_per_s']:.2f} tok/s ({p['ratio_to_generate']:.2f}x) | "
                    f"**{a['tokens_per_s'] / p['tokens_per_s']:.2f}x** | " if p["tokens_per_s"] else "- | - | ")
        lines.append(row + f"{base['tokens_per_s']:.2f} tok/s (1.00x; {base['before']['tokens_per_s']:.2f} before, "
                           f"{base['after']['tokens_per_s']:.2f} after) |")
    cfg = result["config"]
    if cfg.get("temperature", 0.0) > 0 or (wm and cfg.get("watermark_scheme", "kgw") != "kgw"):
        lines.append(f"\nServer requests at temperature {cfg.get('temperature', 0.0):g}"
                     + (f"; watermark scheme {cfg.get('watermark_scheme', 'kgw')}" if wm else "") + ".")
    for name, why in result.get("peer_errors", {}).items():
        lines.append(f"\n{name}: not run: {why}")
    return "\n".join(lines)


def save(result: dict[str, Any], path: str) -> None:
    from stillhouse.config import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
