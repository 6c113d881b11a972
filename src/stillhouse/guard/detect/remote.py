"""The online detector in its own process, so that scoring never runs on the guard's event loop.

Inline (``GuardConfig.detect_mode = "inline"``), ``WindowDetector.observe`` costs the guard
0.2-0.5 ms of its loop per request (docs/benchmarks.md, detect), and with clients that send
their next request as soon as an answer arrives, that next request waits for it: deferring the
work behind the answer does not help a closed loop. Here (``"process"``, the default of
``stillhouse guard --detector DIR``) the guard only pickles each finished record into a pipe;
a child process (``python -m stillhouse.guard.detect.remote DIR``) loads the same fitted
detector, observes the records in arrival order (so its scores are exactly the inline ones on
the same records) and sends back one verdict per record, which the guard hands to its policy
engine as they arrive.

Wire format, both ways: a 4-byte big-endian length, then a pickle (the guard's own child on a
pipe, never a network peer). Guard → child: a list of (TrafficRecord, AccountInfo); child →
guard: the list of their verdicts (``Verdict`` or None), in the same order.

What changes against inline: a verdict applies from the first decision after it has come back
(the pipe round trip plus the child's backlog, about a millisecond when it keeps up) rather
than from the next request. ``stats()`` reports the backlog. If the child dies it is started
again after ``restart_s`` with an empty window (as a guard restart would); the records that were
in flight to it are counted as ``lost`` in ``stats()`` and a warning is logged.

Reload (``reload``; ``POST /admin/detector/reload``, ``guard/reload.py``): a second child is started with
``--replay DB_URL NOW``; it loads the new model and rebuilds its window from the guard's log
(:mod:`.rebuild`) while the first one keeps scoring. Records the guard submits meanwhile are kept; once
the new child is ready it becomes the scorer, gets those records (it skips the ones its replay already
held) and its verdicts for every account of its window, and the old child finishes what it was sent and
exits. Its ready frame is a dict: the directory it loaded, its thresholds, what it replayed.

Why not multiprocessing: its ``Connection.send`` blocks when the pipe is full, which would stall
the guard's loop; asyncio's subprocess pipes buffer instead, and the child needs no fork of a
process that runs uvloop and threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stillhouse.guard.events import AccountInfo, TrafficRecord, Verdict

log = logging.getLogger("stillhouse.guard")

_HEAD = 4


def _frame(obj: Any) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(payload).to_bytes(_HEAD, "big") + payload


class _Child:
    """One detector process and what is in flight to it."""

    def __init__(self, proc: asyncio.subprocess.Process, info: dict[str, Any]):
        self.proc = proc
        self.info = info
        """Its ready frame: directory, thresholds, and for a reload what it replayed and its window's verdicts."""
        self.reader: asyncio.Task[None] | None = None
        self.in_flight = 0
        """Records written to it whose verdicts have not come back."""


class ProcessDetector:
    """A fitted detector (``stillhouse detect --fit ... --model DIR``) running in a child process.

    ``await start(on_verdicts)``; then ``submit(record, account)`` per finished request (cheap: it
    batches the records of one loop turn into one write); ``on_verdicts(list)`` is called on the
    loop with the verdicts in submission order; ``await stop()`` lets the child finish what it
    was sent (up to ``timeout_s``) and delivers those verdicts before returning. ``begin_reload()``
    then ``await reload(directory, db_url, now)`` swaps in a new model with its window rebuilt.
    """

    def __init__(self, directory: str | Path, python: str = sys.executable, restart_s: float = 1.0,
                 ready_timeout_s: float = 120.0, reload_timeout_s: float = 900.0):
        self.directory = str(directory)
        self.python = python
        self.restart_s = restart_s
        self.ready_timeout_s = ready_timeout_s
        self.reload_timeout_s = reload_timeout_s
        self.sent = 0
        self.applied = 0
        self.lost = 0
        self.restarts = 0
        self.reloads = 0
        self._batch: list[tuple[TrafficRecord, AccountInfo]] = []
        self._scheduled = False
        self._child: _Child | None = None
        self._on_verdicts: Callable[[list[Verdict | None]], None] = lambda v: None
        self._stopping = False
        self._buffer: list[tuple[TrafficRecord, AccountInfo]] | None = None
        """While a reload runs: every record submitted since it began (the new child gets them)."""

    @property
    def _proc(self) -> asyncio.subprocess.Process | None:
        return self._child.proc if self._child is not None else None

    @property
    def _reader(self) -> asyncio.Task[None] | None:
        return self._child.reader if self._child is not None else None

    @property
    def info(self) -> dict[str, Any]:
        """The current child's ready frame (directory, thresholds, replay facts), without the verdicts."""
        return {k: v for k, v in (self._child.info if self._child else {}).items() if k != "verdicts"}

    async def start(self, on_verdicts: Callable[[list[Verdict | None]], None]) -> None:
        self._on_verdicts = on_verdicts
        self._stopping = False
        self._child = await self._spawn(self.directory)

    async def _spawn(self, directory: str, replay: tuple[str, float] | None = None) -> _Child:
        """Start a child and wait until it has loaded the detector (and replayed the log): its ready frame."""
        args = [self.python, "-m", "stillhouse.guard.detect.remote", directory]
        if replay is not None:
            args += ["--replay", replay[0], repr(float(replay[1]))]
        proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        assert proc.stdout is not None
        timeout = self.ready_timeout_s if replay is None else self.reload_timeout_s
        try:
            head = await asyncio.wait_for(proc.stdout.readexactly(_HEAD), timeout)
            ready = pickle.loads(await proc.stdout.readexactly(int.from_bytes(head, "big")))
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            why = "did not get ready in time" if isinstance(exc, TimeoutError) else f"exited ({proc.returncode})"
            raise RuntimeError(f"the detector process for {directory} {why}; its error is above. "
                               f"Check it with `stillhouse detect --log LOG --model {directory}`") from exc
        child = _Child(proc, ready if isinstance(ready, dict) else {})
        child.reader = asyncio.create_task(self._read(child), name="guard-detector-reader")
        return child

    def submit(self, record: TrafficRecord, account: AccountInfo) -> None:
        """Queue one finished request for the child (written at the end of this loop turn)."""
        self._batch.append((record, account))
        if self._buffer is not None:
            self._buffer.append((record, account))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, []
        if batch:
            self._write(self._child, batch)

    def _write(self, child: _Child | None, batch: list[tuple[TrafficRecord, AccountInfo]]) -> None:
        proc = child.proc if child is not None else None
        if child is None or proc is None or proc.stdin is None or proc.returncode is not None \
                or proc.stdin.is_closing():
            self.lost += len(batch)  # between a crash and the restart
            return
        proc.stdin.write(_frame(batch))
        self.sent += len(batch)
        child.in_flight += len(batch)

    async def _read(self, child: _Child) -> None:
        proc = child.proc
        assert proc.stdout is not None
        try:
            while True:
                head = await proc.stdout.readexactly(_HEAD)
                verdicts = pickle.loads(await proc.stdout.readexactly(int.from_bytes(head, "big")))
                child.in_flight -= len(verdicts)
                self.applied += len(verdicts)
                try:
                    self._on_verdicts(verdicts)
                except Exception:
                    log.exception("guard: applying detector verdicts failed")
        except asyncio.IncompleteReadError:
            pass  # the child exited
        code = await proc.wait()
        if self._stopping or child is not self._child:
            return  # stopped, or retired by a reload
        self.lost += child.in_flight
        self.restarts += 1
        log.error("guard: the detector process exited with code %s; %d record(s) in flight to it are not "
                  "scored; restarting it in %gs with an empty window", code, child.in_flight, self.restart_s)
        await asyncio.sleep(self.restart_s)
        if not self._stopping and child is self._child:
            try:
                self._child = await self._spawn(self.directory)
            except RuntimeError:
                log.exception("guard: the detector could not be restarted; requests are no longer scored")

    def begin_reload(self) -> None:
        """Start keeping the records submitted from now on (call before flushing the log for the replay)."""
        if self._buffer is not None:
            raise RuntimeError("a detector reload is already running")
        self._buffer = []

    async def reload(self, directory: str, db_url: str, now: float) -> dict[str, Any]:
        """Swap in the model of ``directory``, its window rebuilt from the log's last ``window_s`` before
        ``now`` (see the module docstring); returns the new child's ready facts. On failure the current
        child keeps scoring and the error is raised."""
        if self._buffer is None:
            self.begin_reload()
        try:
            child = await self._spawn(directory, replay=(db_url, now))
        except BaseException:
            self._buffer = None
            raise
        self._send()  # what is queued goes to the old child: the new one gets it from the buffer
        old, self._child, self.directory = self._child, child, directory
        buffered, self._buffer = self._buffer or [], None
        verdicts = child.info.get("verdicts") or []
        if verdicts:
            try:
                self._on_verdicts(verdicts)
            except Exception:
                log.exception("guard: applying the reloaded detector's verdicts failed")
        if buffered:
            self._write(child, buffered)
        if old is not None and old.proc.stdin is not None:
            with contextlib.suppress(Exception):
                old.proc.stdin.close()  # it finishes what it was sent, then exits (no restart: retired)
        self.reloads += 1
        return {**self.info, "buffered_records": len(buffered), "window_verdicts": len(verdicts)}

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, close the child's input and wait for its last verdicts."""
        self._send()
        self._stopping = True
        child = self._child
        if child is None:
            return
        proc, reader = child.proc, child.reader
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
        try:
            if reader is not None:
                await asyncio.wait_for(asyncio.shield(reader), timeout_s)
        except TimeoutError:
            log.warning("guard: the detector process did not finish within %gs; %d record(s) not scored",
                        timeout_s, child.in_flight)
            self.lost += child.in_flight
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
        with contextlib.suppress(Exception):
            await proc.wait()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stats(self) -> dict[str, Any]:
        backlog = (self._child.in_flight if self._child else 0) + len(self._batch)
        return {"mode": "process", "pid": self.pid, "sent": self.sent, "applied": self.applied,
                "backlog": backlog, "lost": self.lost, "restarts": self.restarts, "reloads": self.reloads,
                "directory": self.directory}


def warm_up(directory: str) -> None:
    """Score one made-up request on a throwaway copy of the detector in ``directory``.

    The first observe imports datasketch and fills caches (about a second here); done before the
    guard takes traffic, the first real requests are scored at full speed."""
    from stillhouse.guard.detect.load import load_detector

    spare = load_detector(directory)
    spare.observe(TrafficRecord("warm-up", 0.0, "warm-up", "warm-up", messages=[{"role": "user", "content": "hi"}]),
                  AccountInfo("warm-up"))
    spare.verdict("warm-up")


def serve(directory: str, inp: Any, out: Any, replay: tuple[str, float] | None = None) -> int:
    """The child's loop: a ready frame, then frames of (record, account) in, frames of verdicts out, until EOF.

    ``replay`` = (db_url, now): rebuild the window from the log first (:mod:`.rebuild`); records the guard
    sends later that the replay already held are not observed again (their verdict is still answered)."""
    from stillhouse.guard.detect.load import load_detector

    replayed: set[str] = set()
    ready: dict[str, Any] = {}
    if replay is not None:
        from stillhouse.guard.detect.rebuild import rebuild

        det, info = rebuild(directory, replay[0], replay[1])
        replayed = info.request_ids
        ready.update(info.to_dict())
        ready["verdicts"] = [det.verdict(a) for a in det.own_]
    else:
        det = load_detector(directory)
        ready["directory"] = str(Path(directory).resolve())
    ready["thresholds"] = det.thresholds_
    warm_up(directory)
    out.write(_frame(ready))
    out.flush()
    n = 0
    while True:
        head = inp.read(_HEAD)
        if len(head) < _HEAD:
            return n
        batch = pickle.loads(inp.read(int.from_bytes(head, "big")))
        verdicts: list[Verdict | None] = []
        for record, account in batch:
            try:
                if record.request_id not in replayed:
                    det.observe(record, account)
                verdicts.append(det.verdict(record.account_id))
            except Exception:  # noqa: BLE001 - one bad record must not stop scoring the others
                traceback.print_exc(file=sys.stderr)
                verdicts.append(None)
        out.write(_frame(verdicts))
        out.flush()
        n += len(batch)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    replay = None
    if len(args) == 4 and args[1] == "--replay":
        replay = (args[2], float(args[3]))
    elif len(args) != 1:
        sys.exit("usage: python -m stillhouse.guard.detect.remote DETECTOR_DIR [--replay DB_URL NOW] "
                 "(started by the guard)")
    # stdout carries the frames: anything else printed by a library must go to stderr.
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    serve(args[0], sys.stdin.buffer, out, replay)


if __name__ == "__main__":
    main()
