"""A heartbeat file for liveness probes (``celeriac worker --heartbeat-file PATH``).

A worker whose process runs but whose consumer has stalled (its broker connection half-open,
its loop stuck in a call that never returns) is alive for a process check and dead for its
queue. :class:`HeartbeatFile` makes that visible: a thread touches ``PATH`` (its mtime) every
``interval / 2`` seconds, but only while both hold:

- the consumer loop turned within the last ``stall_after`` seconds (``interval``, or twice the
  fetch timeout if that is longer; the loop marks each turn in ``TaskConsumer.loop_at`` and turns
  at least every fetch timeout, also while the pool is full, so long tasks do not make a healthy
  worker look stalled);
- a round trip to the broker (``queue_size`` of the first queue consumed where the broker has
  that capability, else ``connect()``) answered within the same interval.

So the file's age stays under ``interval / 2`` (plus one round trip) while the worker consumes
normally, and passes ``interval`` within ``2 * interval`` of a stall (within ``interval`` when the
round trip itself hangs). A probe::

    test $(( $(date +%s) - $(stat -c %Y PATH) )) -lt INTERVAL

The file is removed at shutdown: a stopped worker is not alive. See docs/liveness.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

__all__ = ["HeartbeatFile"]

logger = logging.getLogger("celeriac.worker")


class HeartbeatFile:
    """Touch ``path`` while ``loop_mark()`` is recent and ``probe()`` returns.

    ``loop_mark`` returns the ``time.monotonic()`` of the consumer loop's last turn; ``probe``
    is a broker round trip that raises (or blocks) when the broker does not answer. Both are
    called from this object's own thread only. :meth:`start` and :meth:`stop` are not
    thread-safe with each other; call them from the worker's thread.
    """

    def __init__(self, path: str, interval: float, loop_mark: Callable[[], float],
                 probe: Callable[[], object], stall_after: float | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"The heartbeat file interval must be positive, not {interval!r}.")
        self.path = os.path.abspath(path)
        self.interval = float(interval)
        self.loop_mark = loop_mark
        self.probe = probe
        self.stall_after = max(self.interval, stall_after or 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="HeartbeatFile", daemon=True)
        self._stalled: str | None = None

    def start(self) -> None:
        """Start touching the file (the first touch is immediate when the worker is healthy)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop touching and remove the file."""
        self._stop.set()
        self._thread.join(1.0)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def check(self) -> str | None:
        """One check: None when healthy (and the file was touched), else why not."""
        age = time.monotonic() - self.loop_mark()
        if age > self.stall_after:
            return f"the consumer loop has not turned for {age:.0f} s"
        try:
            self.probe()
        except Exception as exc:  # any failure means: not healthy now
            return f"the broker did not answer ({exc.__class__.__name__}: {exc})"
        if self._stop.is_set():
            return "stopping"
        self.touch()
        return None

    def touch(self) -> None:
        """Set the file's mtime to now, creating it if needed."""
        with open(self.path, "a"):
            pass
        os.utime(self.path, None)

    def _run(self) -> None:
        while True:
            try:
                reason = self.check()
            except OSError as exc:  # the file itself: a full or read-only disk
                reason = f"cannot write {self.path}: {exc}"
            if self._stop.is_set():
                return
            # One log line when the worker stalls and one when it recovers, not one per check.
            if reason is not None and self._stalled is None:
                logger.warning("Liveness: not touching %s: %s.", self.path, reason)
            elif reason is None and self._stalled is not None:
                logger.warning("Liveness: healthy again; touching %s.", self.path)
            self._stalled = reason
            if self._stop.wait(self.interval / 2):
                return
