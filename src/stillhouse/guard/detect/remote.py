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


class ProcessDetector:
    """A fitted detector (``stillhouse detect --fit ... --model DIR``) running in a child process.

    ``await start(on_verdicts)``; then ``submit(record, account)`` per finished request (cheap: it
    batches the records of one loop turn into one write); ``on_verdicts(list)`` is called on the
    loop with the verdicts in submission order; ``await stop()`` lets the child finish what it
    was sent (up to ``timeout_s``) and delivers those verdicts before returning.
    """

    def __init__(self, directory: str | Path, python: str = sys.executable, restart_s: float = 1.0,
                 ready_timeout_s: float = 120.0):
        self.directory = str(directory)
        self.python = python
        self.restart_s = restart_s
        self.ready_timeout_s = ready_timeout_s
        self.sent = 0
        self.applied = 0
        self.lost = 0
        self.restarts = 0
        self._batch: list[tuple[TrafficRecord, AccountInfo]] = []
        self._scheduled = False
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._on_verdicts: Callable[[list[Verdict | None]], None] = lambda v: None
        self._stopping = False
        self._in_child = 0
        """Records written to the current child whose verdicts have not come back."""

    async def start(self, on_verdicts: Callable[[list[Verdict | None]], None]) -> None:
        self._on_verdicts = on_verdicts
        self._stopping = False
        await self._spawn()

    async def _spawn(self) -> None:
        """Start the child and wait until it has loaded the detector (an empty first frame)."""
        proc = self._proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "stillhouse.guard.detect.remote", self.directory,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        self._in_child = 0
        assert proc.stdout is not None
        try:
            head = await asyncio.wait_for(proc.stdout.readexactly(_HEAD), self.ready_timeout_s)
            await proc.stdout.readexactly(int.from_bytes(head, "big"))
        except (TimeoutError, asyncio.IncompleteReadError) as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            why = "did not get ready in time" if isinstance(exc, TimeoutError) else f"exited ({proc.returncode})"
            raise RuntimeError(f"the detector process for {self.directory} {why}; its error is above. "
                               f"Check it with `stillhouse detect --log LOG --model {self.directory}`") from exc
        self._reader = asyncio.create_task(self._read(proc), name="guard-detector-reader")

    def submit(self, record: TrafficRecord, account: AccountInfo) -> None:
        """Queue one finished request for the child (written at the end of this loop turn)."""
        self._batch.append((record, account))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, []
        if not batch:
            return
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None or proc.stdin.is_closing():
            self.lost += len(batch)  # between a crash and the restart
            return
        proc.stdin.write(_frame(batch))
        self.sent += len(batch)
        self._in_child += len(batch)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                head = await proc.stdout.readexactly(_HEAD)
                verdicts = pickle.loads(await proc.stdout.readexactly(int.from_bytes(head, "big")))
                self._in_child -= len(verdicts)
                self.applied += len(verdicts)
                try:
                    self._on_verdicts(verdicts)
                except Exception:
                    log.exception("guard: applying detector verdicts failed")
        except asyncio.IncompleteReadError:
            pass  # the child exited
        code = await proc.wait()
        if self._stopping:
            return
        self.lost += self._in_child
        self.restarts += 1
        log.error("guard: the detector process exited with code %s; %d record(s) in flight to it are not "
                  "scored; restarting it in %gs with an empty window", code, self._in_child, self.restart_s)
        await asyncio.sleep(self.restart_s)
        if not self._stopping:
            try:
                await self._spawn()
            except RuntimeError:
                log.exception("guard: the detector could not be restarted; requests are no longer scored")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, close the child's input and wait for its last verdicts."""
        self._send()
        self._stopping = True
        proc, reader = self._proc, self._reader
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
        try:
            if reader is not None:
                await asyncio.wait_for(asyncio.shield(reader), timeout_s)
        except TimeoutError:
            log.warning("guard: the detector process did not finish within %gs; %d record(s) not scored",
                        timeout_s, self._in_child)
            self.lost += self._in_child
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
        return {"mode": "process", "pid": self.pid, "sent": self.sent, "applied": self.applied,
                "backlog": self._in_child + len(self._batch),
                "lost": self.lost, "restarts": self.restarts}


def warm_up(directory: str) -> None:
    """Score one made-up request on a throwaway copy of the detector in ``directory``.

    The first observe imports datasketch and fills caches (about a second here); done before the
    guard takes traffic, the first real requests are scored at full speed."""
    from stillhouse.guard.detect.load import load_detector

    spare = load_detector(directory)
    spare.observe(TrafficRecord("warm-up", 0.0, "warm-up", "warm-up", messages=[{"role": "user", "content": "hi"}]),
                  AccountInfo("warm-up"))
    spare.verdict("warm-up")


def serve(directory: str, inp: Any, out: Any) -> int:
    """The child's loop: frames of (record, account) in, frames of verdicts out, until EOF."""
    from stillhouse.guard.detect.load import load_detector

    det = load_detector(directory)
    warm_up(directory)
    out.write(_frame([]))  # ready
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
    if len(args) != 1:
        sys.exit("usage: python -m stillhouse.guard.detect.remote DETECTOR_DIR (started by the guard)")
    # stdout carries the frames: anything else printed by a library must go to stderr.
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    serve(args[0], sys.stdin.buffer, out)


if __name__ == "__main__":
    main()
