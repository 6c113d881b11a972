"""CLI verbs of the benchmarks: ``stillhouse bench harvest|train|serve|guard|detect``.

Each measures us and named peers side by side, in one run, on the same inputs, and prints
ratios. Thin: each parses its options into the benchmark's config and calls its module
(:mod:`stillhouse.bench.harvest`, ``train``, ``serve``, ``guard``, ``detect``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from stillhouse.bench.train import ARMS
from stillhouse.watermark.green import DEFAULT_PARAMS

PEERS_HELP = ("Run the peer columns, building each peer's pinned virtualenv under $STILLHOUSE_CACHE/peers on "
              "first use (`stillhouse bench peers --install` builds them up front).")
PEER_PYTHON_HELP = "Run peer NAME with this python (an existing virtualenv) instead of its pinned one. Repeatable."


def _die(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def bench_harvest_cmd(
    n: int = typer.Option(100_000, "--n", help="Requests per harvester run."),
    concurrency: list[int] = typer.Option([64, 256], "--concurrency", "-c", help="Concurrency levels."),
    latency_ms: float = typer.Option(50.0, "--latency-ms", help="The fake server's fixed latency L."),
    peers_n: int = typer.Option(5_000, "--peers-n", help="Requests per peer run (peers are slow)."),
    capacity_n: int = typer.Option(20_000, "--capacity-n", help="Requests for the server-capacity stage."),
    only: str = typer.Option("", "--only", help="Comma list of: server, ours, bare, naive, curator, distilabel."),
    server_workers: int = typer.Option(1, "--server-workers", help="Fake server processes (SO_REUSEPORT)."),
    server_engine: str = typer.Option("raw", "--server-engine",
                                      help="The fake's HTTP engine for the C/L rows: raw (cheapest) or aiohttp."),
    out: Path = typer.Option(Path("runs/bench-harvest"), "--out", help="Where results and run dirs go."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help=PEERS_HELP),
    peer_python: list[str] = typer.Option([], "--peer-python", metavar="NAME=PATH", help=PEER_PYTHON_HELP),
) -> None:
    """Harvest throughput vs the physical limit C/L, a naive aiohttp loop, curator and distilabel."""
    from stillhouse.bench.harvest import BenchConfig, run_bench
    from stillhouse.config import ConfigError

    try:
        cfg = BenchConfig(n=n, concurrency=tuple(concurrency), latency_ms=latency_ms, peers_n=peers_n,
                          capacity_n=capacity_n, only=tuple(x for x in only.split(",") if x),
                          server_workers=server_workers, server_engine=server_engine, out=str(out), peers=peers,
                          peer_python=tuple(peer_python))
    except ConfigError as exc:
        _die(str(exc))
        return
    run_bench(cfg)


def bench_train_command(
    teacher: str = typer.Option("bundled", "--teacher", help="Teacher the student is built from."),
    student: str = typer.Option("pruned:10", "--student", help="Student init (pruned:N | every:K | layers:I,J,... | fresh | self)."),
    examples: int = typer.Option(512, "--examples", help="Short chat examples per arm (one epoch)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    threads: int = typer.Option(2, "--threads", help="torch threads for every arm (and the peak matmul)."),
    arms: str = typer.Option(",".join(ARMS), "--arms", help="Comma list of arms to run, in order."),
    trl_python: str = typer.Option(None, "--trl-python",
                                   help="Same as --peer-python trl=PATH; '' skips the trl arms (as --no-peers)."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help=PEERS_HELP),
    peer_python: list[str] = typer.Option([], "--peer-python", metavar="NAME=PATH", help=PEER_PYTHON_HELP),
    out: Path = typer.Option(Path("runs/bench-train"), "--out", help="Student, data, results.json."),
    gkd_examples: int = typer.Option(256, "--gkd-examples", help="Chat rows of the GKD arms (one epoch)."),
    gkd_max_new_tokens: int = typer.Option(16, "--gkd-max-new-tokens",
                                           help="Most tokens the student samples per on-policy completion (GKD arms)."),
    heldout: int = typer.Option(200, "--heldout", help="Held-out 2-digit additions each GKD arm's student answers."),
    gkd_sft: int = typer.Option(0, "--gkd-sft", help="Teach the cut student N training-split additions first (our "
                                "SFT, untimed, one pass); both GKD arms start from it, so their held-out accuracy "
                                "is not 0 = 0. 0 = start from the cut student."),
) -> None:
    """Training tokens/s: ours vs TRL SFTTrainer vs a plain PyTorch loop, same student/data/batch; MFU.
    GKD: examples/s of `train --loss gkd` vs TRL's GKDTrainer at their held-out accuracy.

    Every arm starts from the same student weights and trains one epoch on the same examples.
    MFU = 6 x parameters x tokens/s / this machine's peak matmul FLOP/s in the arm's precision,
    measured in the same run. The trl arms run in TRL's pinned virtualenv, built on first use
    (`stillhouse bench peers --install trl` builds it up front).
    """
    from stillhouse.bench.train import BenchTrainConfig, run_bench
    from stillhouse.config import ConfigError

    try:
        cfg = BenchTrainConfig(teacher=teacher, student=student, examples=examples, batch_size=batch_size,
                               threads=threads, arms=tuple(a for a in arms.split(",") if a),
                               peers=peers and trl_python != "",
                               peer_python=(*peer_python, *([f"trl={trl_python}"] if trl_python else [])),
                               out=str(out), gkd_examples=gkd_examples, gkd_max_new_tokens=gkd_max_new_tokens,
                               heldout=heldout, gkd_sft=gkd_sft)
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    run_bench(cfg)


def bench_guard(
    latency_ms: float = typer.Option(50.0, help="Fixed latency of the fake upstream."),
    rates: str = typer.Option("200,1000", help="Offered loads (requests/s) for the throughput ratios."),
    duration_s: float = typer.Option(10.0, help="Seconds per offered-load run."),
    latency_requests: int = typer.Option(2000, help="Requests for the added-latency percentiles."),
    latency_concurrency: int = typer.Option(8, help="Concurrency of the added-latency run."),
    lossless_requests: int = typer.Option(50000, help="Requests for the log-loss count (0 = skip)."),
    litellm_python: str = typer.Option(None, help="Same as --peer-python litellm=PATH; '' skips LiteLLM "
                                                   "(as --no-peers)."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help=PEERS_HELP),
    peer_python: list[str] = typer.Option([], "--peer-python", metavar="NAME=PATH", help=PEER_PYTHON_HELP),
    db: str = typer.Option(None, help="Guard log store (default: SQLite in a temp dir)."),
    latency_rounds: int = typer.Option(4, help="Split the latency requests into rounds that visit every "
                                               "target in turn (drift hits all alike)."),
    detector: str = typer.Option(None, "--detector", metavar="DIR",
                                 help="Also run a second guard with this fitted detector (shadow mode) and "
                                      "report what online detection adds to p50/p99 and CPU. Fit one with "
                                      "`stillhouse detect --fit --log BENIGN --model DIR`, or use OUT/detector "
                                      "of `stillhouse arena --quick --out OUT`."),
    detector_inline: bool = typer.Option(False, "--detector-inline",
                                         help="With --detector: also a guard with the detector in its event loop "
                                              "(--detect-mode inline), against the default detector process."),
    out: str = typer.Option(None, help="Write the results JSON here."),
    config: str = typer.Option(None, "--config", help="Replay a saved GuardBenchConfig JSON."),
    compare_servers: bool = typer.Option(False, "--compare-servers",
                                         help="Instead: guard CPU/request under uvicorn h11+asyncio vs "
                                              "httptools+uvloop (3,000 requests at concurrency 64, twice each)."),
    compare_clients: bool = typer.Option(False, "--compare-clients",
                                         help="Instead: guard CPU/request with the aiohttp upstream client vs "
                                              "the http1 one (3,000 requests at concurrency 64, twice each)."),
) -> None:
    """Guard vs direct vs LiteLLM proxy on loopback: added latency p50/p99, throughput ratio, log loss.

    With --detector DIR: also what online detection adds (a second guard, identical but for the detector)."""
    from stillhouse.bench.guard import GuardBenchConfig, run_bench
    from stillhouse.config import load_config

    if compare_servers or compare_clients:
        from stillhouse.bench.guard_ab import CLIENT_VARIANTS, SERVER_VARIANTS
        from stillhouse.bench.guard_ab import compare_servers as _compare

        out_ = _compare(latency_ms=latency_ms, variants=CLIENT_VARIANTS if compare_clients else SERVER_VARIANTS)
        typer.echo(json.dumps(out_, indent=2))
        if out:
            from stillhouse.config import atomic_write_text

            atomic_write_text(out, json.dumps(out_, indent=2) + "\n")
        return

    if config:
        cfg = load_config(GuardBenchConfig, config)
    else:
        try:
            cfg = GuardBenchConfig(latency_ms=latency_ms, rates=tuple(float(r) for r in rates.split(",") if r),
                                   duration_s=duration_s, latency_requests=latency_requests,
                                   latency_concurrency=latency_concurrency, lossless_requests=lossless_requests,
                                   peers=peers and litellm_python != "",
                                   peer_python=(*peer_python, *([f"litellm={litellm_python}"] if litellm_python else [])),
                                   db_url=db or "",
                                   latency_rounds=latency_rounds, detector_dir=detector or "",
                                   detector_inline=detector_inline)
        except ValueError as exc:
            _die(str(exc))
            return
    from stillhouse.bench.guard import format_markdown

    result = run_bench(cfg)
    typer.echo(format_markdown(result), err=True)
    text = json.dumps(result, indent=2)
    if out:
        from stillhouse.config import atomic_write_text

        atomic_write_text(out, text + "\n")
    typer.echo(text)
    if result.get("errors"):
        sys.exit(1)


BENCH_SERVE_HELP = """Completion tokens/s of `stillhouse serve` at several client concurrencies, with
continuous batching and with batching disabled (max_batch 1), against the same model's
plain transformers generate() run one request at a time and the llama.cpp server (the peer,
llama-cpp-python built from source into its pinned virtualenv on first use: several minutes)
on the same GGUF -- all in one run, as ratios.

\b
Example (about 5-15 minutes on 2 CPU cores):
  nice -n 10 stillhouse bench serve --teacher bundled --out runs/bench-serve.json
"""


def bench_serve(
    teacher: str = typer.Option("bundled", "--teacher", "-t", help="A local teacher: bundled, hf:DIR, gguf:FILE."),
    concurrency: str = typer.Option("1,8,32", help="Comma-separated client concurrency levels."),
    requests: int = typer.Option(0, help="Requests per level; 0 = max(8, concurrency)."),
    baseline_requests: int = typer.Option(8, help="Requests for the generate() baseline."),
    max_tokens: int = typer.Option(64, help="max_tokens per request."),
    max_batch: int = typer.Option(32, help="max_batch of the batching server."),
    threads: int = typer.Option(0, help="torch CPU threads for every column; 0 = torch's default."),
    watermark: bool = typer.Option(False, "--watermark", help="Also measure serve --watermark (keyed green "
                                                             "lists) right after plain serve."),
    watermark_delta: float = typer.Option(DEFAULT_PARAMS.delta, "--watermark-delta",
                                          help="The watermarked column's logit bias (serve's default)."),
    watermark_entropy: float = typer.Option(DEFAULT_PARAMS.entropy, "--watermark-entropy",
                                            help="The watermarked column's entropy gate in nats (0 = none; "
                                                 "serve's default)."),
    watermark_scheme: str = typer.Option(DEFAULT_PARAMS.scheme, "--watermark-scheme",
                                         help="The watermarked column's scheme: kgw, or exp (draws sampled answers "
                                              "itself; measure it with --temperature)."),
    temperature: float = typer.Option(0.0, "--temperature", help="Temperature of the server columns' requests "
                                                                "(0 = greedy; each request its own seed)."),
    out: Path = typer.Option(None, "--out", help="Write the full result as JSON here."),
    peers: bool = typer.Option(True, "--peers/--no-peers", help=PEERS_HELP),
    peer_python: list[str] = typer.Option([], "--peer-python", metavar="NAME=PATH", help=PEER_PYTHON_HELP),
) -> None:
    from rich.console import Console

    from stillhouse.bench.serve import BenchServeConfig, render_markdown, run_bench, save

    try:
        levels = tuple(int(x) for x in concurrency.split(",") if x.strip())
        cfg = BenchServeConfig(teacher=teacher, concurrency=levels, requests=requests,
                               baseline_requests=baseline_requests, max_tokens=max_tokens, max_batch=max_batch,
                               threads=threads, peers=peers, peer_python=tuple(peer_python),
                               watermark=watermark, watermark_delta=watermark_delta,
                               watermark_entropy=watermark_entropy, watermark_scheme=watermark_scheme,
                               temperature=temperature)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console = Console(stderr=True)
    result = run_bench(cfg, progress=lambda msg: console.log(msg))
    if out:
        save(result, str(out))
    typer.echo(render_markdown(result))


def bench_detect(
    accounts: int = typer.Option(300, "--accounts", help="Benign accounts to generate (plus a few campaigns)."),
    days: float = typer.Option(2.0, "--days", help="Simulated days of traffic."),
    embedder: str = typer.Option("hash", "--embedder", help="'hash' or 'minilm' (cold cache: worst case)."),
) -> None:
    """Microseconds per ``observe`` (the detector's cost on the guard's request path), p50/p90/p99."""
    from stillhouse.bench.detect import BenchDetectConfig, format_text, run_bench

    try:
        cfg = BenchDetectConfig(accounts=accounts, days=days, embedder=embedder)  # type: ignore[arg-type]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(format_text(run_bench(cfg)))


def bench_peers(
    names: list[str] = typer.Argument(None, help="Peers to act on (default: all)."),
    install: bool = typer.Option(False, "--install", help="Build the peers' pinned virtualenvs now (else: on "
                                                          "first use by a bench)."),
    force: bool = typer.Option(False, "--force", help="With --install: rebuild ready ones too."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """The peers' pinned virtualenvs under $STILLHOUSE_CACHE/peers: state, size, install time; --install builds them."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from stillhouse.bench.peers import PEERS, PeerError, ensure_peer, peers_root, status

    console = Console(stderr=True)
    chosen = list(names or PEERS)
    unknown = [n for n in chosen if n not in PEERS]
    if unknown:
        _die(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    if install:
        for name in chosen:
            t0 = time.monotonic()
            try:
                with console.status(f"{name}: starting") as st:
                    py = ensure_peer(name, force=force, say=st.update)
            except PeerError as exc:
                _die(str(exc))
            console.print(f"[green]{name}[/green] ready: {escape(str(py))} ({time.monotonic() - t0:.0f} s)")
    rows = [r for r in status() if r["name"] in chosen]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"peers under {peers_root()}")
    for col in ("peer", "pins", "used by", "state", "size", "install time"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], escape(" ".join(r["requirements"])), r["used_by"], r["state"],
                      f"{r['size_mb']} MB" if r["size_mb"] else "-",
                      f"{r['install_s']:.0f} s" if r["install_s"] is not None else "-")
    Console().print(table)


def register(bench_app: typer.Typer) -> None:
    """Add the ``bench`` verbs to the CLI."""
    bench_app.command("harvest")(bench_harvest_cmd)
    bench_app.command("train")(bench_train_command)
    bench_app.command("serve", help=BENCH_SERVE_HELP)(bench_serve)
    bench_app.command("guard")(bench_guard)
    bench_app.command("detect")(bench_detect)
    bench_app.command("peers")(bench_peers)
    from stillhouse.bench.console import bench_console
    bench_app.command("console")(bench_console)
