"""Reloading the guard's detector without a restart: ``POST /admin/detector/reload`` and the directory poll.

``stillhouse detect watch`` promotes a checked model by swapping the symlink ``GuardConfig.detector_dir``
names (``detect/promote.py``). The guard picks it up when told (the admin endpoint, or ``stillhouse guard admin
reload-detector``) or by itself every ``GuardConfig.detector_reload_s`` seconds when the link points to a new
version. A reload:

1. starts keeping the records the guard finishes from now on, and flushes the traffic log, so every record
   is either in the log or kept;
2. loads the new model and replays the log's last ``window_s`` into it (``detect/rebuild.py``): in the
   detector's own process (``detect_mode="process"``: a second child does it while the first keeps scoring)
   or in a worker thread (inline);
3. swaps it in: it observes the kept records its replay did not hold, and its verdict on every account of its
   window goes to the policy engine at once (a promoted model that blocks an account blocks it now).

A directory that holds no fitted detector fails the reload (422) and the current model keeps scoring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stillhouse.guard.app import GuardApp
    from stillhouse.guard.events import AccountInfo, TrafficRecord

log = logging.getLogger("stillhouse.guard")


class ReloadError(Exception):
    """A reload that cannot run (409) or failed (422); the current detector keeps scoring."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def version_of(directory: str) -> tuple[str, int] | None:
    """(resolved directory, detector.json's mtime in ns) — what changes when a new version is promoted."""
    try:
        resolved = Path(directory).resolve()
        return str(resolved), (resolved / "detector.json").stat().st_mtime_ns
    except OSError:
        return None


class DetectorReloader:
    """The guard's detector reloads (one at a time) and what is loaded now."""

    def __init__(self, app: GuardApp):
        self.app = app
        cfg = app.config
        self.version = version_of(cfg.detector_dir) if cfg.detector_dir else None
        self.loaded_at = time.time() if app.detector is not None else None
        self.results: Counter[str] = Counter()
        self.last: dict[str, Any] | None = None
        self._buffer: list[tuple[TrafficRecord, AccountInfo]] | None = None
        self._busy = False
        self._poll: asyncio.Task[None] | None = None

    def capture(self, rec: TrafficRecord, account: AccountInfo) -> None:
        """An inline detector's record, kept while a reload rebuilds the next one."""
        if self._buffer is not None:
            self._buffer.append((rec, account))

    def state(self) -> dict[str, Any]:
        """``GET /admin/detector``: what is loaded, and the last reload."""
        app = self.app
        remote = app._remote
        if remote is not None:
            loaded = remote.info
        elif app.detector is not None:
            loaded = {"thresholds": getattr(app.detector, "thresholds_", None),
                      "directory": self.version[0] if self.version else None}
        else:
            loaded = {}
        return {"configured": app.config.detector_dir or None, "mode": "process" if remote is not None else
                ("inline" if app.detector is not None else None), "loaded": loaded,
                "loaded_at": self.loaded_at, "reloads": dict(self.results), "last_reload": self.last,
                "reloading": self._busy, "poll_s": app.config.detector_reload_s}

    async def reload(self) -> dict[str, Any]:
        """Load the model ``detector_dir`` points to now and rebuild its window (see the module docstring)."""
        from stillhouse.guard.detect.load import DetectorLoadError

        app, cfg = self.app, self.app.config
        if not cfg.detector_dir:
            raise ReloadError(409, "the guard has no detector directory to reload from: start it with "
                                   "--detector DIR (GuardConfig.detector_dir)")
        if app.detector is None:
            raise ReloadError(409, "the guard runs without a detector; restart it with --detector DIR")
        if self._busy:
            raise ReloadError(409, "a detector reload is already running; try again when it has finished")
        self._busy = True
        t0 = time.perf_counter()
        target = version_of(cfg.detector_dir)
        directory = target[0] if target else str(Path(cfg.detector_dir).resolve())
        now = app.clock()
        try:
            if app._remote is not None:
                from stillhouse.guard.detect.load import load_detector

                # a clear error before a child is started for it (the child loads its own copy)
                await asyncio.get_running_loop().run_in_executor(None, load_detector, directory)
                app._remote.begin_reload()
                await app.writer.flush()
                info = await app._remote.reload(directory, cfg.db_url, now)
            else:
                info = await self._reload_inline(directory, now)
        except DetectorLoadError as exc:
            self.results["failed"] += 1
            raise ReloadError(422, f"{exc}; the current detector keeps scoring") from exc
        except RuntimeError as exc:  # the new detector process did not come up
            self.results["failed"] += 1
            raise ReloadError(422, f"{exc}; the current detector keeps scoring") from exc
        finally:
            self._busy = False
        self.version = target
        self.loaded_at = time.time()
        self.results["ok"] += 1
        self.last = {**info, "at": now, "seconds": round(time.perf_counter() - t0, 3),
                     **({"warning": f"the log is redacted ({cfg.redact}): the rebuilt window scores the redacted "
                                    "text"} if cfg.redact != "none" else {})}
        log.warning("guard: detector reloaded from %s (%s records replayed)", directory,
                    info.get("replayed_records"))
        return self.last

    async def _reload_inline(self, directory: str, now: float) -> dict[str, Any]:
        from stillhouse.guard.detect.rebuild import rebuild

        app = self.app
        self._buffer = []
        try:
            await app.writer.flush()
            det, built = await asyncio.get_running_loop().run_in_executor(None, rebuild, directory,
                                                                           app.config.db_url, now)
        except BaseException:
            self._buffer = None
            raise
        app._drain_detect(None)  # the old detector finishes what it was handed (also kept for the new one)
        kept, self._buffer = self._buffer, None
        fed = 0
        for rec, account in kept:
            if rec.request_id not in built.request_ids:
                det.observe(rec, account)
                fed += 1
        app.detector = det
        verdicts = [det.verdict(a) for a in det.own_]
        app._take_verdicts(verdicts)
        return {**built.to_dict(), "thresholds": det.thresholds_, "buffered_records": fed,
                "window_verdicts": len(verdicts)}

    # -- the poll ------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.app.config
        if cfg.detector_reload_s > 0 and cfg.detector_dir and self.app.detector is not None:
            self._poll = asyncio.create_task(self._poll_loop(), name="guard-detector-poll")

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
            self._poll = None

    async def _poll_loop(self) -> None:
        cfg = self.app.config
        while True:
            await asyncio.sleep(cfg.detector_reload_s)
            now = version_of(cfg.detector_dir)
            if now is None or now == self.version or self._busy:
                continue
            try:
                await self.reload()
            except ReloadError as exc:
                self.version = now  # do not retry a broken version every period; a new one is tried
                log.error("guard: detector reload from %s failed: %s", cfg.detector_dir, exc)
            except Exception:  # the store went away mid-replay: keep the current model, try again next period
                log.exception("guard: detector reload from %s failed", cfg.detector_dir)


__all__ = ["DetectorReloader", "ReloadError", "version_of"]
