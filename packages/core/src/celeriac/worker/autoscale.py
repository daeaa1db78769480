"""``worker --autoscale=MAX,MIN``: grow the pool while work waits, shrink it when idle."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from celeriac.worker.pool import Pool

__all__ = ["Autoscaler", "parse_autoscale"]

logger = logging.getLogger("celeriac.worker")


def parse_autoscale(value: str) -> tuple[int, int]:
    """``"10,3"`` (Celery's ``MAX,MIN``) or ``"10"`` (MIN 0) as ``(max, min)``.

    Raises ``ValueError`` with a sentence saying what is expected."""
    parts = [p.strip() for p in str(value).split(",")]
    try:
        numbers = [int(p) for p in parts if p]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or any(n < 0 for n in numbers) or numbers[0] < 1:
        raise ValueError(f"Invalid --autoscale value {value!r}: use MAX,MIN, e.g. --autoscale=10,3.")
    high, low = numbers[0], numbers[1] if len(numbers) == 2 else 0
    if low > high:
        high, low = low, high
    return high, low


class Autoscaler:
    """Keeps the pool between ``min_concurrency`` and ``max_concurrency`` slots.

    Every ``interval`` seconds: when more tasks are reserved than the pool has slots, it grows
    (up to the maximum); after ``keepalive`` seconds with idle slots it shrinks (down to the
    minimum, and never below what is running). ``reserved()`` returns the number of tasks handed
    to the pool and not finished. ``on_resize(concurrency)`` is called after every change.
    """

    def __init__(self, pool: Pool, reserved: Callable[[], int], max_concurrency: int, min_concurrency: int,
                 on_resize: Callable[[int], None] | None = None, keepalive: float = 30.0,
                 interval: float = 1.0) -> None:
        self.pool = pool
        self.reserved = reserved
        self.max_concurrency = max_concurrency
        self.min_concurrency = min_concurrency
        self.on_resize = on_resize
        self.keepalive = keepalive
        self.interval = interval
        self._last_busy = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="Autoscaler", daemon=True)

    def start(self) -> None:
        """Start scaling in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop scaling (the pool keeps its current size)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def update(self, max_concurrency: int | None = None, min_concurrency: int | None = None) -> tuple[int, int]:
        """Change the limits (``control autoscale MAX MIN``); return ``(max, min)``."""
        if max_concurrency is not None:
            self.max_concurrency = max(1, int(max_concurrency))
        if min_concurrency is not None:
            self.min_concurrency = max(0, int(min_concurrency))
        if self.min_concurrency > self.max_concurrency:
            self.min_concurrency = self.max_concurrency
        self.scale()
        return self.max_concurrency, self.min_concurrency

    def scale(self) -> None:
        """Apply one scaling decision now."""
        size = self.pool.concurrency
        waiting = self.reserved()
        now = time.monotonic()
        target = size
        if waiting >= size:
            self._last_busy = now
            if waiting > size:
                target = min(waiting, self.max_concurrency)
        elif now - self._last_busy > self.keepalive:
            target = max(waiting, self.min_concurrency, 1)
        target = min(max(target, self.min_concurrency, 1), self.max_concurrency)
        if target > size:
            self.pool.grow(target - size)
        elif target < size:
            self.pool.shrink(size - target)
        else:
            return
        logger.info("Autoscaler: pool %s from %d to %d", "grown" if target > size else "shrunk", size, target)
        if self.on_resize is not None:
            self.on_resize(self.pool.concurrency)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scale()
            except NotImplementedError as exc:
                logger.error("Autoscaler stopped: %s", exc)
                return
            except Exception:
                logger.exception("Autoscaler error")
