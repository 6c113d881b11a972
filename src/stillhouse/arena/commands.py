"""CLI verbs of detect and arena: ``stillhouse detect`` and ``stillhouse arena``.

Their settings are the fields of DetectConfig (used with ``detect --fit``) and ArenaConfig,
derived by :mod:`stillhouse.cli_config`. Heavy imports happen inside the commands, so
``stillhouse --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from stillhouse.cli_config import ConfigError, ConfigOptions, Given, config_command, fail

if TYPE_CHECKING:
    from stillhouse.arena.run import ArenaConfig
    from stillhouse.guard.detect import DetectConfig


def register(app: typer.Typer) -> None:
    """Add this area's verbs to the CLI."""
    from stillhouse.arena.run import ArenaConfig
    from stillhouse.guard.detect import DetectConfig
    from stillhouse.guard.detect import commands as detect_commands
    from stillhouse.guard.detect.check import CheckConfig
    from stillhouse.guard.detect.watch import WatchConfig

    detect_settings = ConfigOptions(DetectConfig, skip=("link_weights",), comma=("evidence_signals", "block_requires"),
                                    panels={"window_s": "Detector settings (with --fit)"})
    detect_app = typer.Typer(invoke_without_command=True, no_args_is_help=False)
    detect_app.callback()(config_command(detect, detect_settings))
    detect_app.command("check")(config_command(detect_commands.check, ConfigOptions(CheckConfig, replay=False)))
    detect_app.command("watch")(config_command(detect_commands.watch, ConfigOptions(WatchConfig, replay=False)))
    app.add_typer(detect_app, name="detect")
    arena_settings = ConfigOptions(ArenaConfig, skip=("campaigns",),
                                   flags={"calib_population": ("--calib-population", "--calibrate-on")}, panels={
        "days": "Populations", "calib_seed": "Seeds and campaigns", "gateway": "Run"})
    app.command("arena")(config_command(arena, arena_settings))


def detect(
    ctx: typer.Context,
    settings: Given[DetectConfig],
    log: str | None = typer.Option(None, "--log", help="Traffic log: sqlite:///path/guard.db, postgresql://..., or "
                                   "a .jsonl file of TrafficRecords (one JSON object per line). Required."),
    since: str = typer.Option("", "--since", help="Use the window since this time: an ISO date or date-time "
                              "(UTC unless it says), unix seconds, or a duration before --until (7d); '' = the "
                              "start of the log."),
    until: str = typer.Option("", "--until", help="...until this time (exclusive), in the same forms (a duration "
                              "counts back from now); '' = the end of the log. With --fit, the accounts under a "
                              "decision in the window or labelled campaign are left out."),
    model: Path = typer.Option(Path("detector"), "--model", help="Fitted detector directory (detector.json + .npz)."),
    fit: bool = typer.Option(False, "--fit", help="Calibrate: treat --log as BENIGN traffic only and write the "
                                                 "fitted detector to --model (thresholds from benign quantiles)."),
    config: Path | None = typer.Option(None, "--config", help="With --fit: a DetectConfig JSON, or a saved "
                                       "detector.json (its 'config'); the settings given too override it."),
    accounts: Path | None = typer.Option(None, "--accounts", help="JSONL of AccountInfo (payment fingerprints) "
                                                                      "when the log is a .jsonl file."),
    out: Path | None = typer.Option(None, "--out", help="Write one verdict per account as JSON lines here."),
    show: int = typer.Option(15, "--show", help="Print the N highest-scoring accounts."),
    labels: str | None = typer.Option(None, "--labels", help="With --fit: analysts' labels (the console's "
                                      "labels.jsonl, or the guard's DB URL to read its reviews): fits the family "
                                      "weights on them (mode 'supervised'); campaign-labelled accounts leave "
                                      "calibration."),
    labelled_log: str | None = typer.Option(None, "--labelled-log", help="With --labels: the traffic of the "
                                            "labelled accounts when it is not in --log (e.g. the guard's log)."),
) -> None:
    """Fit a detector on a window of a log, or score a log offline with the guard's own code (identical verdicts).

    \b
    The operator path (README, "Operating the detector"): a shadow-mode guard logs; fit on a window of
    that log (accounts under a decision or labelled campaign left out), check on a later window, enforce,
    then watch:
      stillhouse detect --fit --log sqlite:///g.db --since 2026-03-01 --until 2026-03-08 --model det
      stillhouse detect check --log sqlite:///g.db --since 2026-03-08 --until 2026-03-15 --model det
      stillhouse detect watch --log sqlite:///g.db --model det --every 24h --window 7d
    Score any log (or a window of it):
      stillhouse detect --log sqlite:///run/guard.db --model run/detector --out verdicts.jsonl
    With reviewed accounts (the console's labels), weight the evidence by what analysts confirmed:
      stillhouse detect --fit --log benign.jsonl --labels labels.jsonl --labelled-log sqlite:///run/guard.db
    Every verdict lists its top signals; thresholds carry the benign FPR they were set for.
    """
    import dataclasses
    import time

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from stillhouse.guard.detect import WindowDetector
    from stillhouse.guard.detect.calibrate import fit_window
    from stillhouse.guard.detect.logwindow import WindowError, read_window, resolve_window
    from stillhouse.guard.detect.offline import LogError, read_accounts, read_log, replay

    if ctx.invoked_subcommand is not None:
        return
    if log is None:
        fail("missing --log: the traffic log to fit on or score (sqlite:///path/guard.db, postgresql://... or a "
             ".jsonl file); or run a subcommand: `stillhouse detect check|watch --help`")
    if settings.values and not fit:
        given = ", ".join(settings.options.settings[n].option for n in settings.values)
        fail(f"{given}: detector settings apply with --fit (a fitted detector keeps the config it was fitted with)")
    console = Console()
    try:
        t0, t1 = resolve_window(since, until, time.time())
        window = read_window(log, t0, t1, exclude=fit)
    except WindowError as exc:
        fail(exc)
    except LogError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log") from exc
    records, infos = window.records, window.accounts
    if accounts is not None:
        infos = {**infos, **read_accounts(accounts)}
        window.accounts = infos
    if not records:
        raise typer.BadParameter(f"{log} holds no traffic records" + (f" ({window.summary()})" if since or until
                                                                      or window.excluded_records else ""),
                                 param_hint="--log")
    if fit:
        try:
            cfg = settings.resolve(config, load=_load_detect_config)
        except ConfigError as exc:
            fail(exc)
        label_map = None
        pool = None
        if labels is not None:
            from dataclasses import replace

            from stillhouse.guard.detect.supervised import LabelError, read_labels

            try:
                label_map = read_labels(labels)
            except LabelError as exc:
                raise typer.BadParameter(str(exc), param_hint="--labels") from exc
            cfg = replace(cfg, mode="supervised")
            if labelled_log is not None:
                try:
                    pool, more = read_log(labelled_log)
                except LogError as exc:
                    raise typer.BadParameter(str(exc), param_hint="--labelled-log") from exc
                infos = {**more, **infos}
            elif window.excluded_records:  # the labelled accounts' traffic: the window with nobody left out
                whole = read_window(log, t0, t1, exclude=False)
                pool, infos = whole.records, {**whole.accounts, **infos}
            window.accounts = infos
        elif cfg.mode == "supervised":
            raise typer.BadParameter("the config says mode 'supervised': give --labels FILE", param_hint="--labels")
        console.print(window.summary(), highlight=False, soft_wrap=True)
        with Progress(console=console, transient=True) as progress:
            try:
                det = fit_window(cfg, window, progress=progress, labels=label_map, labelled=pool)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--labels" if labels else "--log") from exc
        det.save(model)
        console.print(f"fitted on {len(records)} benign records -> {model}/  thresholds {det.thresholds_}")
        console.print(f"calibration: {det.calibration_}")
        console.print(f"next: check it on a later window before enforcing: stillhouse detect check --log {log} "
                      f"--model {model} --since ... --until ...", highlight=False, soft_wrap=True)
        return
    try:
        det = WindowDetector.load(model)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from exc
    verdicts = replay(det, records, infos)
    det.refresh_clusters()
    verdicts = {a: det.verdict(a) for a in verdicts}  # type: ignore[misc]
    if out is not None:
        with out.open("w") as f:
            for v in verdicts.values():
                f.write(json.dumps(dataclasses.asdict(v)) + "\n")
    ranked = sorted((v for v in verdicts.values() if v is not None), key=lambda v: -v.score)
    flagged = sum(v.flagged for v in ranked)
    table = Table(title=f"{len(ranked)} accounts, {flagged} flagged (thresholds {det.thresholds_})")
    for col in ("account", "score", "action", "cluster", "top signals"):
        table.add_column(col)
    for v in ranked[:show]:
        table.add_row(v.account_id, f"{v.score:.2f}", v.suggested, v.cluster_id or "",
                      ", ".join(f"{n}={s:.1f}" for n, s in v.reasons[:4]))
    console.print(table)


def _load_detect_config(cls: type[DetectConfig], path: str | Path) -> DetectConfig:
    """A DetectConfig JSON, or the ``config`` a saved detector.json carries."""
    from stillhouse.config import config_from_dict, load_config, read_json_object

    data = read_json_object(path)
    if isinstance(data.get("config"), dict):  # a saved detector.json
        return config_from_dict(cls, data["config"], source=str(path))
    return load_config(cls, path)


def arena(
    settings: Given[ArenaConfig],
    quick: bool = typer.Option(False, "--quick", help="The small CI scenario (~30 s): 2 days, 400+250 benign accounts "
                                                      "(the settings given too override it)."),
    out: Path = typer.Option(Path("arena-run"), "--out", help="Run directory (report.md, metrics.json, PNGs, logs)."),
    config: Path | None = typer.Option(None, "--config", help="ArenaConfig JSON (e.g. a previous run's arena.json); "
                                                                  "the settings given too override it."),
    capability_only: bool = typer.Option(False, "--capability-only", help="Only the capability stage, with the "
                                         "fitted detector of an earlier run in --out (OUT/detector)."),
    capability_config: Path | None = typer.Option(None, "--capability-config", help="CapabilityConfig JSON "
                                                  "(e.g. a previous OUT/capability/capability_config.json)."),
) -> None:
    """Campaigns and benign users through the real guard in simulated time; what is caught, how early, what leaks.

    \b
    1. a benign calibration population through the guard -> detector fitted on benign traffic only;
    2. a fresh benign population (another seed) + campaigns (cot, rubric, agentic, hydra, slow,
       paraphrase, harvest, mixed at 5/10/25/50% attacker fraction) through the guard with the
       detector and policy enforcing;
    3. online == offline check on the guard's own log; report.md + roc.png + leak_curve.png
       + fractions.png; every TPR/FPR with its Wilson interval and account count;
    4. with --capability: students trained on what leaked vs on the unblocked harvest.
    Default scenario: 6,000 + 5,000 benign accounts, 7 days, ~9 CPU-minutes (one core busy);
    --capability adds ~8 CPU-minutes (bundled teacher, two SFT runs, eval). `--quick`: the CI
    scenario (~30 s).

    \b
    --population real: a benign population of real people (ShareGPT conversations with their
    real replies; offices, VPNs, a chat app, eval runners, LLM judges, batch services, a
    startup, a classroom) and campaigns on general-chat topics; development seeds.
      stillhouse arena --population real                          (calibrated on real traffic)
      stillhouse arena --population real --calibrate-on synthetic (the default arena's detector)
    """
    from dataclasses import replace

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from stillhouse.arena.capability import CapabilityConfig, CapabilityError, run_capability, with_operator
    from stillhouse.arena.report import capability_lines, merge_capability
    from stillhouse.arena.run import (
        QUICK,
        REAL,
        REAL_QUICK,
        SEED_FIELDS,
        ArenaConfig,
        run_arena,
        seed_set_config,
        seed_set_label,
    )
    from stillhouse.arena.sharegpt import ShareGPTMissing
    from stillhouse.config import load_config

    try:
        cap_cfg = (load_config(CapabilityConfig, capability_config) if capability_config is not None
                   else CapabilityConfig())
    except (ConfigError, ValueError) as exc:
        fail(f"--capability-config: {exc}")
    if capability_only:
        cap_cfg = with_operator(cap_cfg, settings.values.get("review_every_h", 0.0),  # as inside a whole arena run
                                settings.values.get("reviewer", ArenaConfig.reviewer))
        console = Console()
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as progress:
            try:
                cap = run_capability(cap_cfg, out / "detector", out / "capability", progress=progress)
            except CapabilityError as exc:
                raise typer.BadParameter(str(exc), param_hint="--out") from exc
        merge_capability(out, cap)
        console.print("\n".join(capability_lines(cap)))
        console.print(f"report: {out / 'capability' / 'report.md'} (and the Capability section of "
                      f"{out / 'report.md'} when it exists)")
        return
    try:
        if config is not None:
            try:
                base: ArenaConfig | None = load_config(ArenaConfig, config)
            except ConfigError:
                raise
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"--config {config}: {exc}") from exc
        else:
            if settings.values.get("population") == "real":
                base = REAL_QUICK if quick else REAL
                if settings.values.get("calib_population") == "synthetic":
                    synthetic = QUICK if quick else ArenaConfig()  # the synthetic scenario's own calibration
                    base = replace(base, seeds="", **{k: getattr(synthetic, k)
                                                      for k in ("calib_accounts", "calib_seed") if k not in settings})
            else:
                base = QUICK if quick else None
        seeds = settings.values.get("seeds")
        if seeds:  # a named seed set fixes the seeds and the split (a test set: the test pools)
            base = seed_set_config(base or ArenaConfig(), seeds)
        elif base is not None and base.seeds and any(k in settings for k in SEED_FIELDS):
            base = replace(base, seeds="")  # seeds typed by hand: no longer the named set
        cfg = settings.config(base)
    except ConfigError as exc:
        fail(exc)
    except ValueError as exc:  # an unknown seed set name
        fail(f"--seeds: {exc}")
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        try:
            metrics = run_arena(cfg, out, progress=progress, capability=cap_cfg)
        except ShareGPTMissing as exc:
            fail(f"--population: {exc}")
    op = metrics["operational"]
    console.print(f"seed set: {seed_set_label(cfg)}")
    console.print(f"block tier: campaign TPR {op['block']['tpr']:.3f}, benign FPR {op['block']['benign_fpr']:.4f} "
                  f"({op['block']['benign_flagged']}/{op['benign_accounts']}); offline==online: "
                  f"{metrics['offline_equals_online']}")
    if isinstance(metrics["capability_leaked"], dict):
        r = metrics["capability_leaked"]["gain_ratio"]
        console.print(f"capability leaked: gain ratio {r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]")
    console.print(f"report: {out / 'report.md'}")
