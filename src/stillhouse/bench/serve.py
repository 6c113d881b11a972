"""``stillhouse bench serve``: completion tokens/s of ``stillhouse serve`` against one-at-a-time.

One run, one loaded model, three ways of using it on the same prompts:

    generate()   the model's plain ``transformers`` ``generate()``, one request at a time
                 (the baseline every ratio is against)
    serve b=1    ``stillhouse serve`` with batching disabled (max_batch 1)
    serve        ``stillhouse serve`` with continuous batching (max_batch 32)
    serve+wm     the same with ``--watermark`` (``watermark=True``): what keyed green lists cost

Each server column is measured at concurrency 1, 8 and 32 by an aiohttp client on
loopback (greedy, ``max_tokens`` per request, tokens counted from ``usage``). Each server
is a ``stillhouse serve`` child process; the baseline runs in this process before and after
the server columns and their mean is the reference for every ratio.

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
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


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
    """max_tokens of every request (greedy, so lengths match across columns)."""
    max_batch: int = 32
    """max_batch of the batching server."""
    threads: int = 0
    """torch CPU threads for every column; 0 keeps torch's default."""
    watermark: bool = False
    """Also measure the batching server with --watermark (a fresh random secret), right after the plain one."""

    def __post_init__(self) -> None:
        from stillhouse.teacher.spec import parse_spec

        if not parse_spec(self.teacher).is_local:
            raise ValueError(f"teacher={self.teacher!r}: bench serve needs a local teacher (bundled, hf:, gguf:)")
        if not self.concurrency or any((not isinstance(c, int)) or c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency={self.concurrency!r}: give positive integers, e.g. 1,8,32")
        for name in ("baseline_requests", "max_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.requests < 0:
            raise ValueError(f"requests={self.requests}: must be >= 0 (0 = max(8, concurrency))")


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
                 model: str) -> dict[str, Any]:
    import aiohttp

    todo: asyncio.Queue[list[dict[str, str]]] = asyncio.Queue()
    for c in convs:
        todo.put_nowait(c)
    tokens, lat, errors = 0, [], 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, errors
        while True:
            try:
                conv = todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            s = time.perf_counter()
            async with session.post(f"{base_url}/chat/completions", json={
                    "model": model, "messages": conv, "max_tokens": max_tokens, "temperature": 0}) as r:
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

    def __init__(self, teacher: str, max_batch: int, threads: int, watermark: bool = False):
        self.args = ["serve", "--teacher", teacher, "--port", "0", "--max-batch", str(max_batch)]
        if threads:
            self.args += ["--threads", str(threads)]
        self.env = dict(os.environ)
        if watermark:
            import secrets

            self.args += ["--watermark", "--watermark-secret-env", "STILLHOUSE_BENCH_WM_SECRET"]
            self.env["STILLHOUSE_BENCH_WM_SECRET"] = secrets.token_urlsafe(32)
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> _ServeProcess:
        exe = Path(sys.executable).parent / "stillhouse"
        self.proc = subprocess.Popen([str(exe), *self.args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, env={**self.env, "PYTHONUNBUFFERED": "1"})
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

    load_start = os.getloadavg()
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
        with _ServeProcess(cfg.teacher, max_batch, cfg.threads, wm) as srv:
            asyncio.run(_drive(srv.base_url, convs[:1], 1, 4, name))  # warm-up, not timed
            for c in cfg.concurrency:
                n = max(8, c) if cfg.requests == 0 else cfg.requests
                if max_batch == 1 and cfg.requests == 0:
                    n = 8  # one request decodes at a time: more requests only queue longer
                say(f"{label} (max_batch={max_batch}) at concurrency {c}: {n} requests")
                res = asyncio.run(_drive(srv.base_url, convs[:n], c, cfg.max_tokens, name))
                res["max_batch_seen"] = srv.health().get("max_batch_seen")
                columns.setdefault(label, {})[str(c)] = res
                say(f"  {res['tokens_per_s']:.2f} tok/s")
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
    }


def render_markdown(result: dict[str, Any]) -> str:
    """A markdown table of one run: tokens/s and ratios to the generate() baseline."""
    base = result["generate_one_at_a_time"]
    wm = "serve_wm" in result["columns"]
    lines = ["| concurrency | `stillhouse serve` (continuous batching) | "
             + ("`serve --watermark` (vs serve) | " if wm else "") + "`serve` with max_batch 1 | "
             "plain `generate()` one at a time |", "|---|---|---|---|" + ("---|" if wm else "")]
    for c in result["config"]["concurrency"]:
        a = result["columns"]["serve"][str(c)]
        b = result["columns"]["serve_b1"][str(c)]
        w = result["columns"]["serve_wm"][str(c)] if wm else None
        wcol = (f"{w['tokens_per_s']:.2f} tok/s ({w['tokens_per_s'] / a['tokens_per_s']:.3f}x) | " if w else "")
        lines.append(f"| {c} | {a['tokens_per_s']:.2f} tok/s (**{a['ratio_to_generate']:.2f}x**) | {wcol}"
                     f"{b['tokens_per_s']:.2f} tok/s ({b['ratio_to_generate']:.2f}x) | "
                     f"{base['tokens_per_s']:.2f} tok/s (1.00x; {base['before']['tokens_per_s']:.2f} before, "
                     f"{base['after']['tokens_per_s']:.2f} after) |")
    return "\n".join(lines)


def save(result: dict[str, Any], path: str) -> None:
    from stillhouse.config import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
