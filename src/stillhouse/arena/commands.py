"""CLI verbs of detect and arena: ``stillhouse detect``, ``stillhouse arena``, ``stillhouse bench detect``.

Heavy imports happen inside the commands, so ``stillhouse --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    """Add this area's verbs to the CLI."""
    app.command("detect")(detect)
    app.command("arena")(arena)


def detect(
    log: str = typer.Option(..., "--log", help="Traffic log: sqlite:///path/guard.db, postgresql://..., or a .jsonl "
                                                "file of TrafficRecords (one JSON object per line)."),
    model: Path = typer.Option(Path("detector"), "--model", help="Fitted detector directory (detector.json + .npz)."),
    fit: bool = typer.Option(False, "--fit", help="Calibrate: treat --log as BENIGN traffic only and write the "
                                                 "fitted detector to --model (thresholds from benign quantiles)."),
    config: Path | None = typer.Option(None, "--config", help="DetectConfig JSON (with --fit); replays a saved "
                                                                  "detector.json's 'config' too."),
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
    """Score a traffic log offline with the same code the guard runs online (identical verdicts).

    \b
    Calibrate on benign traffic, then score any log:
      stillhouse detect --fit --log benign.jsonl --model run/detector
      stillhouse detect --log sqlite:///run/guard.db --model run/detector --out verdicts.jsonl
    With reviewed accounts (the console's labels), weight the evidence by what analysts confirmed:
      stillhouse detect --fit --log benign.jsonl --labels labels.jsonl --labelled-log sqlite:///run/guard.db
    Every verdict lists its top signals; thresholds carry the benign FPR they were set for.
    """
    import dataclasses

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from stillhouse.config import load_config
    from stillhouse.guard.detect import DetectConfig, WindowDetector
    from stillhouse.guard.detect.offline import LogError, read_accounts, read_log, replay

    console = Console()
    try:
        records, infos = read_log(log)
    except LogError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log") from exc
    if accounts is not None:
        infos = {**infos, **read_accounts(accounts)}
    if not records:
        raise typer.BadParameter(f"{log} holds no traffic records", param_hint="--log")
    if fit:
        cfg = DetectConfig()
        if config is not None:
            data = json.loads(config.read_text())
            if "config" in data and isinstance(data["config"], dict):  # a saved detector.json
                from stillhouse.config import config_from_dict

                cfg = config_from_dict(DetectConfig, data["config"], source=str(config))
            else:
                cfg = load_config(DetectConfig, config)
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
        elif cfg.mode == "supervised":
            raise typer.BadParameter("the config says mode 'supervised': give --labels FILE", param_hint="--labels")
        with Progress(console=console, transient=True) as progress:
            try:
                det = WindowDetector(cfg).fit(records, infos, progress=progress, labels=label_map, labelled=pool)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--labels") from exc
        det.save(model)
        console.print(f"fitted on {len(records)} benign records -> {model}/  thresholds {det.thresholds_}")
        console.print(f"calibration: {det.calibration_}")
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


def arena(
    quick: bool = typer.Option(False, "--quick", help="The small CI scenario (~30 s): 2 days, 400+250 benign accounts."),
    out: Path = typer.Option(Path("arena-run"), "--out", help="Run directory (report.md, metrics.json, PNGs, logs)."),
    config: Path | None = typer.Option(None, "--config", help="ArenaConfig JSON (e.g. a previous run's arena.json)."),
    gateway: str | None = typer.Option(None, "--gateway", help="'guard' (real guard app, default) or 'direct'."),
    upstream: str | None = typer.Option(None, "--upstream", help="'sim' (fast length-aware fake, default) or a "
                                                                     "teacher base URL, e.g. http://127.0.0.1:8000 "
                                                                     "from `stillhouse serve`."),
    days: float | None = typer.Option(None, "--days", help="Simulated days (overrides the scenario)."),
    embedder: str | None = typer.Option(None, "--embedder", help="'hash' (default) or 'minilm'."),
    capability: bool = typer.Option(False, "--capability", help="Also measure capability leaked: a harvest "
                                    "campaign through the guard to the real bundled teacher, then SFT students on "
                                    "what leaked vs the unblocked harvest, scored on held-out additions (minutes "
                                    "more on 2 cores)."),
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
    """
    from dataclasses import replace

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from stillhouse.arena.capability import CapabilityConfig, CapabilityError, run_capability
    from stillhouse.arena.report import capability_lines, merge_capability
    from stillhouse.arena.run import QUICK, ArenaConfig, run_arena
    from stillhouse.config import load_config

    cap_cfg = load_config(CapabilityConfig, capability_config) if capability_config is not None else CapabilityConfig()
    if capability_only:
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
    cfg = load_config(ArenaConfig, config) if config is not None else (QUICK if quick else ArenaConfig())
    overrides: dict[str, Any] = {k: v for k, v in {"gateway": gateway, "upstream": upstream, "days": days,
                                   "embedder": embedder, "capability": capability or None}.items() if v is not None}
    try:
        cfg = replace(cfg, **overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        metrics = run_arena(cfg, out, progress=progress, capability=cap_cfg)
    op = metrics["operational"]
    console.print(f"block tier: campaign TPR {op['block']['tpr']:.3f}, benign FPR {op['block']['benign_fpr']:.4f} "
                  f"({op['block']['benign_flagged']}/{op['benign_accounts']}); offline==online: "
                  f"{metrics['offline_equals_online']}")
    if isinstance(metrics["capability_leaked"], dict):
        r = metrics["capability_leaked"]["gain_ratio"]
        console.print(f"capability leaked: gain ratio {r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]")
    console.print(f"report: {out / 'report.md'}")
