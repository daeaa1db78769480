"""Changing the queues a running worker consumes (``control add_consumer`` / ``cancel_consumer``).

The broker SPI gives a consumer a fixed set of queues, so a change opens a new broker consumer
for the new set and lets the old one drain: deliveries it handed out are still acked or rejected
on it (only the consumer that produced a delivery may settle it), and it is closed once none is
outstanding, which gives back whatever it had prefetched and not handed out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence

from celeriac.broker.base import Consumer, Delivery
from celeriac.routing import Queue

__all__ = ["SwitchingConsumer"]

logger = logging.getLogger("celeriac.worker")


class SwitchingConsumer(Consumer):
    """A :class:`~celeriac.broker.base.Consumer` whose queues can be changed while it runs.

    ``open_consumer(queues)`` builds a broker consumer for a list of queues; ``current`` is the
    one in use when the first change comes (the worker wraps it only then). :meth:`fetch` and
    :meth:`switch` are called from the worker's consumer thread only; :meth:`ack` and
    :meth:`reject` from any thread. Settling a delivery costs one empty-dict check unless a
    switch is draining.
    """

    def __init__(self, open_consumer: Callable[[Sequence[Queue]], Consumer], current: Consumer) -> None:
        self._open = open_consumer
        self.current = current
        # id(delivery) -> the old consumer that produced it, for deliveries outstanding at a switch.
        self._owners: dict[int, Consumer] = {}
        self._draining: list[Consumer] = []
        self._lock = threading.Lock()

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Fetch from the current broker consumer (see :meth:`Consumer.fetch`); consumer thread."""
        if self._draining:
            self._settle_draining()
        return self.current.fetch(max_count, timeout)

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery`` on the consumer that produced it. Thread-safe."""
        owner = self._owners.pop(id(delivery), None) if self._owners else None
        (owner or self.current).ack(delivery)

    def reject(self, delivery: Delivery, requeue: bool = False) -> None:
        """Reject ``delivery`` on the consumer that produced it. Thread-safe."""
        owner = self._owners.pop(id(delivery), None) if self._owners else None
        (owner or self.current).reject(delivery, requeue=requeue)

    def flush(self) -> None:
        """Send queued acks of the current and the draining consumers."""
        for consumer in (*self._draining, self.current):
            consumer.flush()

    def on_idle(self) -> None:
        """Tell the current and the draining consumers that the worker runs nothing."""
        for consumer in (*self._draining, self.current):
            consumer.on_idle()

    def close(self) -> None:
        """Close every broker consumer (unacked deliveries go back to the broker)."""
        for consumer in (*self._draining, self.current):
            try:
                consumer.close()
            except Exception:
                logger.exception("Could not close a broker consumer")
        self._draining.clear()
        self._owners.clear()

    def switch(self, queues: Sequence[Queue], outstanding: Iterable[Delivery]) -> None:
        """Consume ``queues`` from now on; ``outstanding`` are the deliveries handed out and not
        settled yet, which stay with the old consumer. Consumer thread only.

        Raises what the broker raises when the new consumer cannot be opened (the old one then
        stays current)."""
        new = self._open(list(queues))
        with self._lock:
            old = self.current
            for delivery in outstanding:
                self._owners.setdefault(id(delivery), old)
            self._draining.append(old)
            self.current = new

    def _settle_draining(self) -> None:
        with self._lock:
            busy = set(map(id, self._owners.values()))
            finished = [c for c in self._draining if id(c) not in busy]
            self._draining = [c for c in self._draining if id(c) in busy]
        for consumer in self._draining:
            consumer.flush()
        for consumer in finished:
            try:
                consumer.close()
            except Exception:
                logger.exception("Could not close a drained broker consumer")
