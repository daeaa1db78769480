"""A timer thread: runs callbacks at given times (time limits, heartbeats)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Timer", "TimerEntry"]

logger = logging.getLogger("celeriac.worker")


class TimerEntry:
    """One scheduled call; :meth:`Timer.cancel` takes it back."""

    __slots__ = ("fn", "seq", "tag", "when")

    def __init__(self, when: float, seq: int, fn: Callable[[], Any] | None, tag: Any) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.tag = tag

    def __lt__(self, other: TimerEntry) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class Timer:
    """Calls ``fn()`` at Unix time ``when``, in one background thread, in time order.

    Cancelled entries cost nothing when they come due, and the heap is compacted once they
    make up half of it, so cancelling every entry (time limits of tasks that ended in time)
    keeps memory flat.
    """

    def __init__(self, name: str = "Timer") -> None:
        self._heap: list[TimerEntry] = []
        self._cancelled = 0
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_at(self, when: float, fn: Callable[[], Any], tag: Any = None) -> TimerEntry:
        """Schedule ``fn`` for Unix time ``when`` (seconds); ``tag`` lets :meth:`pending` find it.

        Thread-safe. Returns the entry, for :meth:`cancel`."""
        entry = TimerEntry(when, next(self._counter), fn, tag)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    def call_later(self, delay: float, fn: Callable[[], Any], tag: Any = None) -> TimerEntry:
        """Schedule ``fn`` in ``delay`` seconds; thread-safe; returns the entry."""
        return self.call_at(time.time() + delay, fn, tag)

    def cancel(self, entry: TimerEntry) -> None:
        """Drop ``entry`` if it has not run yet (thread-safe; a second cancel does nothing)."""
        with self._cond:
            if entry.fn is None:
                return
            entry.fn = None
            entry.tag = None
            self._cancelled += 1
            if self._cancelled * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e.fn is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def pending(self) -> list[Any]:
        """Tags of the entries not run yet, in time order."""
        with self._cond:
            return [entry.tag for entry in sorted(self._heap) if entry.tag is not None]

    def __len__(self) -> int:
        """The number of entries that will still run."""
        with self._cond:
            return len(self._heap) - self._cancelled

    def clear(self) -> list[Any]:
        """Drop every entry; return their tags."""
        with self._cond:
            tags = [entry.tag for entry in self._heap if entry.tag is not None]
            for entry in self._heap:
                entry.fn = None
            self._heap.clear()
            self._cancelled = 0
            return tags

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and (not self._heap or self._heap[0].when > time.time()):
                    timeout = self._heap[0].when - time.time() if self._heap else None
                    self._cond.wait(timeout)
                if not self._running:
                    return
                entry = heapq.heappop(self._heap)
                fn = entry.fn
                if fn is None:
                    self._cancelled -= 1
                    continue
                entry.fn = None
            try:
                fn()
            except Exception:
                logger.exception("Timer callback %r failed", fn)

    def stop(self) -> None:
        """Stop the thread; entries not run are dropped."""
        with self._cond:
            self._running = False
            self._cond.notify()
        self._thread.join(timeout=5)
