"""The harvest store's writer thread: finished rows committed in batches, off the event loop."""

from __future__ import annotations

import queue
import threading
from typing import Any

from stillhouse.distill.store import HarvestStore


class StoreWriter:
    """The one thread that writes finished rows into the store, one committed transaction per batch.

    The event loop only hands batches over (``put``); SQLite runs here, off the loop. Batches that
    queue up while a write runs are merged into the next transaction. ``close`` writes what is
    queued and joins the thread; after a failed write, ``error`` holds it and later batches are
    dropped (not committed, so the next run redoes them).
    """

    def __init__(self, store: HarvestStore):
        self.store = store
        self.error: BaseException | None = None
        self._q: queue.SimpleQueue[list[tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="harvest-writer", daemon=True)
        self._thread.start()

    def put(self, batch: list[tuple[Any, ...]]) -> None:
        self._q.put(batch)

    def _run(self) -> None:
        done = False
        while not done:
            batch = self._q.get()
            if batch is None:
                break
            while True:  # merge whatever queued meanwhile
                try:
                    more = self._q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                batch.extend(more)
            if self.error is not None:
                continue
            try:
                self.store.put_rows(batch)
            except BaseException as exc:  # kept and raised on the loop's side  # noqa: BLE001
                self.error = exc

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
