"""``stillhouse detect check`` and ``stillhouse detect watch``: the operator path after ``detect --fit``.

Thin: parse, call :mod:`.check` / :mod:`.watch`, print. Their settings are the fields of ``CheckConfig`` and
``WatchConfig`` (derived by :mod:`stillhouse.cli_config`); ``stillhouse detect`` itself (fit and score) lives
with the arena's verbs (``arena/commands.py``), which registers these two under it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from stillhouse.cli_config import ConfigError, Given, fail

if TYPE_CHECKING:
    from stillhouse.guard.detect.check import CheckConfig
    from stillhouse.guard.detect.watch import WatchConfig

ADMIN_ENV = "STILLHOUSE_GUARD_ADMIN_TOKEN"


def check(
    settings: Given[CheckConfig],
    log: str = typer.Option(..., "--log", help="The guard's traffic log (sqlite:///path/guard.db, postgresql://...) "
                                                "or a .jsonl file; run the guard in shadow mode to collect it."),
    model: Path = typer.Option(Path("detector"), "--model", help="The fitted detector to check (`stillhouse detect "
                                                                 "--fit`)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the report (JSON) here."),
    record: bool = typer.Option(True, "--record/--no-record", help="Write the report to MODEL/check.json (the watch "
                                                                   "reads its score distribution as the drift "
                                                                   "reference)."),
) -> None:
    """Check a fitted detector against a second window of the log before enforcing it.

    \b
    Replays the window through the detector (the guard's own code, offline) and reports, for the accounts with
    at least min_requests requests, the share over each tier's threshold with its Wilson interval against the
    FPR the tier was set for. Exit code 1 when a tier exceeds --factor times its stated FPR.
      stillhouse detect --fit --log sqlite:///g.db --since 2026-03-01 --until 2026-03-08 --model det
      stillhouse detect check --log sqlite:///g.db --since 2026-03-08 --until 2026-03-15 --model det
    The window should be a shadow window after the fit window: it holds campaigns too, so review the accounts
    it lists (the console's /console/accounts/ID and /console/review) before reading their rate as false positives.
    """
    from stillhouse.guard.detect.check import check_window, window_edges
    from stillhouse.guard.detect.load import DetectorLoadError, load_detector
    from stillhouse.guard.detect.logwindow import WindowError, read_window
    from stillhouse.guard.detect.offline import LogError

    try:
        cfg = settings.config()
        since, until = window_edges(cfg, time.time())
    except (ConfigError, WindowError) as exc:
        fail(exc)
    try:
        det = load_detector(model)
    except DetectorLoadError as exc:
        fail(f"--model: {exc}")
    try:
        window = read_window(log, since, until)
    except LogError as exc:
        fail(f"--log: {exc}")
    if not window.records:
        fail(f"--log: {window.summary()}: nothing to check; widen --since/--until")
    report = check_window(det, window, cfg.factor, cfg.min_requests, cfg.show, model=str(Path(model).resolve()))
    for line in report.lines():
        typer.echo(line)
    text = json.dumps(report.to_dict(), indent=1) + "\n"
    if record:
        from stillhouse.config import atomic_write_text

        atomic_write_text(Path(model) / "check.json", text)
    if out is not None:
        out.write_text(text)
    if not report.passed:
        raise typer.Exit(1)


def watch(
    settings: Given[WatchConfig],
    log: str = typer.Option(..., "--log", help="The guard's traffic log (sqlite:///path/guard.db or "
                                                "postgresql://...)."),
    model: Path = typer.Option(Path("detector"), "--model", help="The live detector: a directory `detect --fit` "
                                                                 "wrote (the first period turns it into a symlink "
                                                                 "to MODEL.versions/...), which the guard's "
                                                                 "--detector names."),
    once: bool = typer.Option(False, "--once", help="Run one period and exit (exit code 1 when it raised an "
                                                    "alarm), e.g. from cron."),
    guard: str | None = typer.Option(None, "--guard", help=f"After a promotion, ask this guard to reload "
                                     f"(POST URL/admin/detector/reload with the admin token in ${ADMIN_ENV}); "
                                     "or let the guard poll (--detector-reload-s)."),
) -> None:
    """Refit on a schedule, alarm on drift, promote a checked candidate atomically.

    \b
    Each period: the live model is replayed over the newest window [now-W, now) and its benign score
    distribution compared with the one it was checked on (PSI); a candidate is fitted on [now-2W, now-W)
    with the live model's config, checked on [now-W, now) and promoted (one rename of the MODEL symlink)
    only if its check passes. Status: MODEL.watch.json (and the guard's /metrics).
      stillhouse detect watch --log sqlite:///g.db --model det --every 24h --window 7d
      stillhouse detect watch --log sqlite:///g.db --model det --window 7d --once --guard http://127.0.0.1:8080
    """
    from stillhouse.guard.detect.load import DetectorLoadError
    from stillhouse.guard.detect.logwindow import WindowError, is_store_url
    from stillhouse.guard.detect.offline import LogError
    from stillhouse.guard.detect.promote import PromoteError
    from stillhouse.guard.detect.watch import status_path, watch_loop

    try:
        cfg = settings.config()
    except ConfigError as exc:
        fail(exc)
    if not is_store_url(log):
        fail(f"--log {log!r}: watch reads the guard's store (sqlite:///path or postgresql://...), where decisions "
             "and reviews say which accounts to leave out")
    if cfg.now.strip() and not once:
        fail("--now fixes the time of one period: add --once")
    on_promote = _reload_guard(guard) if guard else None

    def emit(status: dict[str, Any]) -> None:
        for line in status["lines"]:
            typer.echo(line)
        typer.echo(f"status: {status_path(cfg, model)}")

    try:
        status = watch_loop(cfg, log, model, once=once, emit=emit, on_promote=on_promote)
    except (DetectorLoadError, PromoteError, WindowError, LogError, ValueError) as exc:
        fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    if once and status.get("alarm"):
        raise typer.Exit(1)


def _reload_guard(url: str) -> Any:
    """A promotion hook: POST /admin/detector/reload to a guard; returns what happened, never raises."""
    import urllib.error
    import urllib.request

    token = os.environ.get(ADMIN_ENV, "")
    if not token:
        fail(f"--guard needs the admin token in ${ADMIN_ENV}")

    def hook(version: Path) -> str:
        req = urllib.request.Request(url.rstrip("/") + "/admin/detector/reload", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=900) as resp:
                out = json.loads(resp.read() or b"{}")
            return f"reloaded {out.get('directory')} ({out.get('replayed_records')} records replayed)"
        except urllib.error.HTTPError as exc:
            return f"reload refused ({exc.code}): {exc.read()[:300].decode('utf-8', 'replace')}"
        except OSError as exc:
            return f"reload failed: cannot reach {url}: {exc}"
    return hook
