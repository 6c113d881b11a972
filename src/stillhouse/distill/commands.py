"""CLI verbs of the distill area after harvest: ``curate`` and ``eval`` (``train`` is in train_commands).

    stillhouse curate RUN_DIR [--eval-sets SPECS] [--keep-per-prompt K] [--config FILE]
    stillhouse eval --model SPEC --teacher SPEC --task arithmetic2 --limit 200 --out DIR

Thin: the options are the fields of CurateConfig and EvalConfig (derived by
:mod:`stillhouse.cli_config`); each verb builds its config and calls the library
(:mod:`stillhouse.distill.curate`, :mod:`stillhouse.distill.evaluate`). Heavy imports
happen inside the functions so ``stillhouse --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from stillhouse.cli_config import ConfigError, ConfigOptions, Given, config_command, fail

if TYPE_CHECKING:
    from stillhouse.distill.curate import CurateConfig
    from stillhouse.distill.evaluate import EvalConfig


# -- curate --------------------------------------------------------------------------------------

def curate_command(
    settings: Given[CurateConfig],
    run_dir: Path = typer.Argument(..., help="A harvest run directory, or a .jsonl/.parquet file of rows "
                                              "(fields: messages, response, and optionally answer/tests/...)."),
    out: Path | None = typer.Option(None, help="Output folder (default RUN_DIR/curated)."),
    config: Path | None = typer.Option(None, help="Replay a saved curated/config.json; options given too "
                                                  "override it."),
) -> None:
    """Curate harvested samples: dedup, decontaminate, verify, best-of-n. Dropped rows are kept with reasons.

    Steps: load → format → exact_dup → decontam → verify → near_dup → best_of_n. Writes
    kept.parquet, dropped.parquet (every dropped row with its step and reason), train.jsonl
    (chat messages, plus the teacher's top-k logprobs when harvested, for `stillhouse train`),
    report.json and config.json, and prints rows in/out per step.

    Examples:

      stillhouse curate runs/h1                          (writes runs/h1/curated/)

      stillhouse curate runs/h1 --keep-per-prompt 2 --eval-sets builtin:arithmetic-heldout:1000

      stillhouse curate rows.jsonl --verify annotate --out curated/      (keep wrong rows, marked)

      stillhouse curate runs/h1 --config runs/h1/curated/config.json     (replay)
    """
    from rich.console import Console
    from rich.markup import escape

    from stillhouse.distill.curate import CurateError, curate_run, report_table
    from stillhouse.progress import step_bars

    console = Console(stderr=False)
    try:
        cfg = settings.resolve(config)
    except ConfigError as exc:
        fail(exc)
    if config is not None:
        console.print(f"replaying {config}")

    with step_bars(console) as progress:
        try:
            result, report = curate_run(run_dir, cfg, out_dir=out, progress=progress)
        except CurateError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(2) from exc
    console.print(report_table(result))
    for why in result.eval_sets_skipped:
        console.print(f"[yellow]note:[/yellow] not decontaminated against {escape(why)}")
    console.print(f"kept {report['kept']} of {report['rows_in']} rows → {report['out_dir']}/train.jsonl "
                  f"(dropped rows with reasons: dropped.parquet)")


# -- eval ----------------------------------------------------------------------------------------

def eval_command(
    settings: Given[EvalConfig],
    out: Path = typer.Option(Path("eval-out"), help="Folder for report.md, results.json and plots."),
    cache_dir: Path | None = typer.Option(None, help="Teacher-output cache (default OUT/../.eval-cache)."),
    config: Path | None = typer.Option(None, help="Replay a saved OUT/config.json; options given too override it."),
) -> None:
    """Evaluate students against their teacher on held-out items: accuracy (95% CI), agreement, KL, ceiling ratio.

    Greedy, batched generation for every model on the same items; the teacher's outputs are
    cached on disk by (revision, task, items). Writes report.md, results.json, samples.jsonl
    and PNG plots. KL needs the student to share the teacher's tokenizer.

    Examples:

      stillhouse eval --model hf:runs/s1/final --teacher bundled --task arithmetic2 --limit 300 --out eval/s1

      stillhouse eval --model sft250=hf:runs/a --model sft1000=hf:runs/b --train-examples 250
      --train-examples 1000 --task arithmetic2 --out eval/grid      (adds the score-vs-examples plot)

      stillhouse eval --config eval/s1/config.json --out eval/s1-again      (replay)
    """
    from rich.console import Console
    from rich.markup import escape

    from stillhouse.distill.evaluate import EvalError, parse_model_args, run_eval

    console = Console()
    try:
        if "students" in settings:  # --model LABEL=SPEC: the label goes to its own field
            settings.values["labels"], settings.values["students"] = parse_model_args(settings.values["students"])
        cfg = settings.resolve(config)
    except (ConfigError, ValueError) as exc:
        fail(exc)
    try:
        result = run_eval(cfg, out, cache_dir=cache_dir, console=console)
    except EvalError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    console.print(result.table())
    console.print(f"report: {out / 'report.md'}")


def register(app: typer.Typer) -> None:
    """Add this area's verbs to the CLI."""
    from stillhouse.distill.curate import CurateConfig
    from stillhouse.distill.evaluate import EvalConfig

    curate = ConfigOptions(CurateConfig, comma=("eval_sets",), flags={
        "arithmetic_split_rule": "--heldout-rule/--no-heldout-rule",
        "drop_truncated": "--drop-truncated/--keep-truncated", "sandbox_timeout_s": "--sandbox-timeout"}, panels={
        "eval_sets": "Decontamination", "near_dup_threshold": "Near duplicates", "verify": "Verification",
        "min_response_chars": "Answers", "sandbox_timeout_s": "Code sandbox"})
    app.command("curate")(config_command(curate_command, curate))
    evaluate = ConfigOptions(EvalConfig, flags={"students": "--model"}, skip=("labels",), panels={
        "students": "Models", "task": "Items", "batch_size": "Generation and KL", "train_examples": "Report",
        "device": "Hardware", "watermark_teacher": "Watermark"})
    app.command("eval")(config_command(eval_command, evaluate))
