"""CLI verbs of the harvest area: ``harvest``, ``export`` and ``bench harvest``.

Thin: each parses its options into a config and calls the library
(:mod:`stillhouse.distill.harvest`, :mod:`stillhouse.distill.export`,
:mod:`stillhouse.bench.harvest`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

HARVEST_HELP = """Harvest a teacher into a crash-safe, resumable run directory.

Every (prompt, sample) becomes one record in RUN_DIR/harvest.sqlite, keyed by a hash of
(messages, teacher, sampling params, sample index). Rerun the same command after a crash or
kill -9: finished records are skipped, failed ones retried, nothing is duplicated. Change a
sampling parameter and the records are new.

PROMPTS: a .jsonl file ({"id", "messages"} or {"id", "prompt"} a line), a .parquet file, a
datasets directory (DIR or DIR#SPLIT), or a built-in set: builtin:arithmetic[:N],
builtin:arithmetic-heldout[:N], builtin:gsm8k[:N], builtin:gsm8k-test[:N], builtin:humaneval[:N].

Exit status: 0 all done; 2 some records failed (rerun to retry them); 3 stopped by a budget
cap; 130 interrupted.

Examples:

  stillhouse harvest --prompts builtin:arithmetic:300 --teacher http://127.0.0.1:8000/v1 --out runs/h1

  stillhouse harvest --prompts p.jsonl --teacher bundled --out runs/h2 --samples 4 --temperature 0.8 --seed 1

  stillhouse harvest --config runs/h1/config.json      (replay; options given too override it)
"""


def harvest_cmd(
    prompts: str = typer.Option(None, "--prompts", help="Prompt source (see above)."),
    teacher: str = typer.Option(None, "--teacher", help="Teacher spec: bundled, hf:DIR, gguf:FILE, "
                                "http://HOST:PORT/v1[#MODEL], fake."),
    out: str = typer.Option(None, "--out", help="Run directory (created; reused on rerun)."),
    config: Path = typer.Option(None, "--config", help="Replay a saved RUN_DIR/config.json."),
    samples: int = typer.Option(None, "--samples", help="Completions per prompt (default 1)."),
    temperature: float = typer.Option(None, "--temperature", help="0 = greedy (default)."),
    top_p: float = typer.Option(None, "--top-p"),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Completion token limit (default 256)."),
    seed: int = typer.Option(None, "--seed", help="Sample i uses seed+i."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    logprobs: bool = typer.Option(None, "--logprobs/--no-logprobs", help="Store per-token logprobs."),
    top_logprobs: int = typer.Option(None, "--top-logprobs", help="Store the top-k logprobs (0..20)."),
    concurrency: int = typer.Option(None, "--concurrency", "-c",
                                    help="Requests in flight (default: 64 HTTP, 32 local)."),
    timeout_s: float = typer.Option(None, "--timeout", help="Per-request timeout in seconds (default 120)."),
    max_attempts: int = typer.Option(None, "--max-attempts", help="Attempts per record per run (default 5)."),
    rpm: float = typer.Option(None, "--rpm", help="Requests-per-minute limit."),
    tpm: float = typer.Option(None, "--tpm", help="Tokens-per-minute limit."),
    max_requests: int = typer.Option(None, "--max-requests", help="Hard cap on requests for the run dir."),
    max_total_tokens: int = typer.Option(None, "--max-total-tokens", help="Hard cap on tokens for the run dir."),
    max_cost: float = typer.Option(None, "--max-cost", help="Hard cap on cost (needs prices)."),
    price_prompt: float = typer.Option(None, "--price-prompt", help="Price per 1M prompt tokens."),
    price_completion: float = typer.Option(None, "--price-completion", help="Price per 1M completion tokens."),
    strict: bool = typer.Option(None, "--strict/--no-strict", help="Fail on any bad prompt row, before any call."),
    limit: int = typer.Option(None, "--limit", help="Use only the first N prompts."),
    allow_revision_change: bool = typer.Option(None, "--allow-revision-change",
                                               help="Continue although the teacher's revision changed."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    from rich.console import Console
    from rich.markup import escape

    from stillhouse.config import ConfigError, config_to_dict
    from stillhouse.distill.harvest import (
        HarvestConfig,
        HarvestError,
        load_harvest_config,
        run_async,
        run_harvest,
    )
    from stillhouse.distill.prompts import PromptError, format_problems

    console = Console(stderr=True)
    given: dict[str, Any] = {
        "prompts": prompts, "teacher": teacher, "out": out, "samples": samples, "temperature": temperature,
        "top_p": top_p, "max_tokens": max_tokens, "seed": seed, "stop": tuple(stop) if stop else None,
        "logprobs": logprobs, "top_logprobs": top_logprobs, "concurrency": concurrency, "timeout_s": timeout_s,
        "max_attempts": max_attempts, "rpm": rpm, "tpm": tpm, "max_requests": max_requests,
        "max_total_tokens": max_total_tokens, "max_cost": max_cost, "price_prompt_per_1m": price_prompt,
        "price_completion_per_1m": price_completion, "strict": strict, "limit": limit,
        "allow_revision_change": allow_revision_change,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if top_logprobs and "logprobs" not in given:
        given["logprobs"] = True
    try:
        if config is not None:
            base = config_to_dict(load_harvest_config(str(config)))
            base.update(given)
            base["stop"] = tuple(base.get("stop") or ())
            cfg = HarvestConfig(**base)
        else:
            missing = [f"--{k}" for k in ("prompts", "teacher", "out") if k not in given]
            if missing:
                raise typer.BadParameter(f"missing {', '.join(missing)} (or give --config RUN_DIR/config.json)")
            cfg = HarvestConfig(**given)
    except (ConfigError, ValueError, TypeError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc

    bar = _ProgressBar(console) if progress else None

    def on_prompts(ps: Any) -> None:
        if ps.problems:
            console.print(format_problems(ps.problems, header=f"[yellow]skipping {len(ps.problems)} bad row(s) "
                                          f"of {ps.source}[/yellow] (--strict makes them fatal):"))
        console.print(f"{len(ps.prompts)} prompts × {cfg.samples} sample(s) from {ps.source}; "
                      f"teacher {cfg.teacher}; run dir {cfg.out}")

    try:
        if bar is not None:
            bar.start()
        report = run_async(run_harvest(cfg, on_progress=bar.update if bar else None, on_prompts=on_prompts))
    except PromptError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    except (HarvestError, ConfigError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished records are saved; rerun the same command to "
                      "continue")
        raise typer.Exit(130) from None
    finally:
        if bar is not None:
            bar.stop()
    console.print(report.summary())
    if report.stats.stopped_reason:
        console.print(f"[yellow]stopped cleanly:[/yellow] {report.stats.stopped_reason}. Raise the cap and rerun "
                      "the same command to continue.")
        raise typer.Exit(3)
    if report.stats.errors:
        console.print(f"[yellow]{report.stats.errors} record(s) failed[/yellow]; rerun the same command to retry "
                      "them (errors and raw bodies are in the store).")
        raise typer.Exit(2)


class _ProgressBar:
    """A rich progress bar fed by the harvester's stats (rate, ETA, errors, spend)."""

    def __init__(self, console: Any):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("harvest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console, transient=False, refresh_per_second=4,
        )
        self.task = self.progress.add_task("harvest", total=None, info="")

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def update(self, st: Any) -> None:
        rate = st.done / st.elapsed_s if st.elapsed_s > 0 else 0.0
        info = (f"{rate:,.0f}/s  in flight {st.in_flight}  errors {st.errors}  retries {st.retries}  "
                f"tokens {st.prompt_tokens + st.completion_tokens:,}  spend {st.cost:.4f}")
        self.progress.update(self.task, total=st.total, completed=st.done, info=info)


EXPORT_HELP = """Export a harvest run as chat-messages training data, split train/held-out by prompt hash.

Each ok record becomes {"messages": [..., {"role": "assistant", "content": ...}], "id", "sample_index",
"meta", ...}. The split depends only on the prompt (all samples of a prompt land on the same side),
so it is the same on every machine and every rerun.

  stillhouse export runs/h1 --format jsonl --out data/h1 --heldout 0.1
  -> data/h1/train.jsonl, data/h1/heldout.jsonl, data/h1/export.json
"""


def export_cmd(
    run_dir: Path = typer.Argument(..., help="A harvest run directory."),
    fmt: str = typer.Option("jsonl", "--format", "-f", help="jsonl, parquet or hf (datasets save_to_disk)."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    heldout: float = typer.Option(0.1, "--heldout", help="Share of prompts held out (0..1)."),
    logprobs: bool = typer.Option(False, "--logprobs/--no-logprobs", help="Include token logprobs."),
    include_errors: bool = typer.Option(False, "--include-errors", help="Also export failed records (a column "
                                        "'status' tells them apart)."),
    salt: str = typer.Option("", "--salt", help="Change the split without changing the share."),
) -> None:
    from rich.console import Console
    from rich.markup import escape

    from stillhouse.config import ConfigError
    from stillhouse.distill.export import ExportConfig, export_run
    from stillhouse.distill.store import StoreError

    console = Console(stderr=True)
    try:
        cfg = ExportConfig(run_dir=str(run_dir), format=fmt, out=str(out), heldout=heldout,  # type: ignore[arg-type]
                           logprobs=logprobs, include_errors=include_errors, salt=salt)
        result = export_run(cfg)
    except (ConfigError, ValueError, StoreError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    console.print(result.summary())


def register(app: typer.Typer) -> None:
    """Add ``harvest`` and ``export``."""
    app.command("harvest", help=HARVEST_HELP)(harvest_cmd)
    app.command("export", help=EXPORT_HELP)(export_cmd)
