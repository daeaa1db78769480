"""A timer thread: runs callbacks at given times (ETA tasks, rate limits, soft time limits)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Timer"]

logger = logging.getLogger("celeriac.worker")


class Timer:
    """Calls ``fn()`` at Unix time ``when``, in one background thread, in time order."""

    def __init__(self, name: str = "Timer") -> None:
        self._heap: list[tuple[float, int, Callable[[], Any], Any]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_at(self, when: float, fn: Callable[[], Any], tag: Any = None) -> None:
        """Schedule ``fn`` for Unix time ``when``; ``tag`` lets :meth:`pending` find it."""
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._counter), fn, tag))
            self._cond.notify()

    def call_later(self, delay: float, fn: Callable[[], Any], tag: Any = None) -> None:
        """Schedule ``fn`` in ``delay`` seconds."""
        self.call_at(time.time() + delay, fn, tag)

    def pending(self) -> list[Any]:
        """Tags of the entries not run yet, in time order."""
        with self._cond:
            return [entry[3] for entry in sorted(self._heap) if entry[3] is not None]

    def clear(self) -> list[Any]:
        """Drop every entry; return their tags."""
        with self._cond:
            tags = [entry[3] for entry in self._heap if entry[3] is not None]
            self._heap.clear()
            return tags

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and (not self._heap or self._heap[0][0] > time.time()):
                    timeout = self._heap[0][0] - time.time() if self._heap else None
                    self._cond.wait(timeout)
                if not self._running:
                    return
                _, _, fn, _ = heapq.heappop(self._heap)
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
