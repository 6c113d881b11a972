"""CLI verbs of the harvest area: ``harvest`` and ``export``.

Thin: the options are the fields of HarvestConfig and ExportConfig (derived by
:mod:`stillhouse.cli_config`); each verb builds its config and calls the library
(:mod:`stillhouse.distill.harvest`, :mod:`stillhouse.distill.export`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from stillhouse.cli_config import ConfigError, ConfigOptions, Given, config_command, fail

if TYPE_CHECKING:
    from stillhouse.distill.export import ExportConfig
    from stillhouse.distill.harvest import HarvestConfig

HARVEST_HELP = """Harvest a teacher into a crash-safe, resumable run directory.

Every (prompt, sample) becomes one record in RUN_DIR/harvest.sqlite, keyed by a hash of
(messages, teacher, sampling params, sample index). Rerun the same command after a crash or
kill -9: finished records are skipped, failed ones retried, nothing is duplicated. Change a
sampling parameter and the records are new.

PROMPTS: a .jsonl file ({"id", "messages"} or {"id", "prompt"} a line), a .parquet file, a
datasets directory (DIR or DIR#SPLIT), or a built-in set: builtin:arithmetic[:N],
builtin:arithmetic-heldout[:N], builtin:gsm8k[:N], builtin:gsm8k-test[:N], builtin:humaneval[:N].
A row may also carry tools, tool_choice, response_format and reasoning_effort (sent, and keyed), and
"turns": the next user turns of a conversation harvested turn by turn (docs/distill/reasoning.md).
Reasoning (reasoning_content, reasoning, <think>) and tool calls are stored byte for byte.

Exit status: 0 all done; 2 some records failed (rerun to retry them); 3 stopped by a budget
cap; 130 interrupted.

Examples:

  stillhouse harvest --prompts builtin:arithmetic:300 --teacher http://127.0.0.1:8000/v1 --out runs/h1

  stillhouse harvest --prompts p.jsonl --teacher bundled --out runs/h2 --samples 4 --temperature 0.8 --seed 1

  stillhouse harvest --config runs/h1/config.json      (replay; options given too override it)
"""


def harvest_cmd(
    settings: Given[HarvestConfig],
    config: Path | None = typer.Option(None, "--config", help="Replay a saved RUN_DIR/config.json; options "
                                                                "given too override it."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    from rich.console import Console
    from rich.markup import escape

    from stillhouse.distill.harvest import HarvestError, run_async, run_harvest
    from stillhouse.distill.prompts import PromptError, format_problems

    console = Console(stderr=True)
    if settings.values.get("top_logprobs") and "logprobs" not in settings:
        settings.values["logprobs"] = True  # asking for top-k logprobs means storing logprobs
    try:
        cfg = settings.resolve(config)
    except ConfigError as exc:
        fail(exc, code=1)  # exit 2 means "some records failed" for this verb

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


def export_cmd(settings: Given[ExportConfig]) -> None:
    from rich.console import Console

    from stillhouse.distill.export import export_run
    from stillhouse.distill.store import StoreError

    console = Console(stderr=True)
    try:
        result = export_run(settings.config())
    except (ConfigError, StoreError) as exc:
        fail(exc, code=1)
    console.print(result.summary())


def register(app: typer.Typer) -> None:
    """Add ``harvest`` and ``export``."""
    from stillhouse.distill.export import ExportConfig
    from stillhouse.distill.harvest import HarvestConfig

    harvest = ConfigOptions(HarvestConfig, flags={
        "concurrency": ("--concurrency", "-c"), "timeout_s": "--timeout", "price_prompt_per_1m": "--price-prompt",
        "price_completion_per_1m": "--price-completion"}, panels={
        "prompts": "Run", "samples": "Sampling", "concurrency": "Requests", "max_requests": "Budget caps",
        "strict": "Input and store"})
    app.command("harvest", help=HARVEST_HELP)(config_command(harvest_cmd, harvest))
    export = ConfigOptions(ExportConfig, flags={"format": ("--format", "-f")}, arguments=("run_dir",), replay=False)
    app.command("export", help=EXPORT_HELP)(config_command(export_cmd, export))
