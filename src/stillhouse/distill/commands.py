"""CLI verbs of the distill area after harvest: ``curate``, ``eval`` (and ``train``).

    stillhouse curate RUN_DIR [--eval-sets SPECS] [--keep-per-prompt K] [--config FILE]
    stillhouse eval --model SPEC --teacher SPEC --task arithmetic2 --limit 200 --out DIR

Thin: each verb parses its options, builds the frozen config, and calls the library
(:mod:`stillhouse.distill.curate`, :mod:`stillhouse.distill.evaluate`). Heavy imports
happen inside the functions so ``stillhouse --help`` stays fast.

Ownership: curate/eval by D1; ``train`` is added by D2 in the marked section at the end
(a ``train_command`` function plus one line in :func:`register`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _split_specs(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(s.strip() for s in text.split(",") if s.strip())


# -- curate --------------------------------------------------------------------------------------

def curate_command(
    run_dir: Path = typer.Argument(..., help="A harvest run directory, or a .jsonl/.parquet file of rows "
                                              "(fields: messages, response, and optionally answer/tests/...)."),
    eval_sets: str = typer.Option(
        "builtin:arithmetic-heldout:1000,builtin:gsm8k-test,builtin:humaneval", "--eval-sets",
        help="Comma-separated evaluation sets to decontaminate against (13-gram overlap); '' or 'none' skips."),
    heldout_rule: bool = typer.Option(True, help="Drop additions whose pair is in the generated held-out split "
                                                 "(tasks.is_heldout_pair); off for an experiment's own split."),
    keep_per_prompt: int = typer.Option(1, help="Best-of-n: verified samples kept per prompt (greedy first)."),
    verify: str = typer.Option("require", help="require: drop unverified rows; annotate: keep and mark; off."),
    near_dup_threshold: float = typer.Option(0.85, help="MinHash Jaccard at or above which rows are near-duplicates."),
    max_response_tokens: int = typer.Option(0, help="Drop longer answers (0 = no cap)."),
    keep_truncated: bool = typer.Option(False, help="Keep answers that stopped at max_tokens."),
    sandbox_timeout: float = typer.Option(5.0, help="Seconds per code sample in the sandbox."),
    out: Path = typer.Option(None, help="Output folder (default RUN_DIR/curated)."),
    config: Path = typer.Option(None, help="Replay a saved curated/config.json (other options are ignored)."),
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stillhouse.config import ConfigError, load_config
    from stillhouse.distill.curate import CurateConfig, CurateError, curate_run, report_table

    console = Console(stderr=False)
    try:
        if config is not None:
            cfg = load_config(CurateConfig, config)
            console.print(f"replaying {config}")
        else:
            cfg = CurateConfig(
                eval_sets=_split_specs(eval_sets), arithmetic_split_rule=heldout_rule,
                keep_per_prompt=keep_per_prompt, verify=verify,  # type: ignore[arg-type]
                near_dup_threshold=near_dup_threshold,
                max_response_tokens=max_response_tokens or None, drop_truncated=not keep_truncated,
                sandbox_timeout_s=sandbox_timeout,
            )
    except (ValueError, ConfigError) as exc:
        raise typer.BadParameter(str(exc)) from exc

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done)

        try:
            result, report = curate_run(run_dir, cfg, out_dir=out, progress=progress)
        except CurateError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(2) from exc
    console.print(report_table(result))
    console.print(f"kept {report['kept']} of {report['rows_in']} rows → {report['out_dir']}/train.jsonl "
                  f"(dropped rows with reasons: dropped.parquet)")


# -- eval ----------------------------------------------------------------------------------------

def eval_command(
    model: list[str] = typer.Option(None, "--model", help="Student spec(s): hf:DIR, bundled, gguf:FILE. "
                                                           "Repeat for several students; 'LABEL=SPEC' names one."),
    teacher: str = typer.Option("bundled", help="Teacher spec (a local model, for KL and agreement)."),
    task: str = typer.Option("arithmetic2", help="arithmetic2 | arithmetic3 | gsm8k | humaneval"),
    limit: int = typer.Option(200, help="Held-out items to evaluate."),
    out: Path = typer.Option(Path("eval-out"), help="Folder for report.md, results.json and plots."),
    batch_size: int = typer.Option(32, help="Prompts per generation batch."),
    max_new_tokens: int = typer.Option(0, help="0 = the task's default."),
    kl: bool = typer.Option(True, help="Compute KL(teacher||student) on the teacher's greedy completions."),
    train_examples: list[int] = typer.Option(None, "--train-examples",
                                             help="Training-set size of each --model, in order, for the "
                                                  "score-vs-examples plot."),
    seed: int = typer.Option(0, help="Seed of the held-out item draw (arithmetic)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    cache_dir: Path = typer.Option(None, help="Teacher-output cache (default OUT/../.eval-cache)."),
    config: Path = typer.Option(None, help="Replay a saved results config (other options are ignored)."),
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

    from stillhouse.config import ConfigError, load_config
    from stillhouse.distill.evaluate import EvalConfig, EvalError, parse_model_args, run_eval

    console = Console()
    try:
        if config is not None:
            cfg = load_config(EvalConfig, config)
        else:
            if not model:
                raise ValueError("give at least one --model SPEC (or --config FILE to replay a run)")
            labels, specs = parse_model_args(model)
            cfg = EvalConfig(
                students=specs, labels=labels, teacher=teacher, task=task, limit=limit, batch_size=batch_size,
                max_new_tokens=max_new_tokens or None, kl=kl,
                train_examples=tuple(train_examples) if train_examples else (), seed=seed, device=device,
            )
    except (ValueError, ConfigError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        result = run_eval(cfg, out, cache_dir=cache_dir, console=console)
    except EvalError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    console.print(result.table())
    console.print(f"report: {out / 'report.md'}")


# -- train (D2 adds train_command here) ------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add this area's verbs to the CLI."""
    app.command("curate")(curate_command)
    app.command("eval")(eval_command)
