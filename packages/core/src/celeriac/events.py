"""Events: what workers report about tasks and themselves (``-E``), and a receiver for monitors.

Events travel on the ``celeryev`` exchange with Celery's field names; the routing key is the
event type with ``-`` replaced by ``.`` (``task.succeeded``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from celeriac.broker.base import BROADCAST
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol import Message
from celeriac.serialization import json_dumps, json_loads

if TYPE_CHECKING:
    from celeriac.app import Celeriac
    from celeriac.broker.base import Broker

__all__ = ["EVENT_EXCHANGE", "EventDispatcher", "EventReceiver", "format_event"]

EVENT_EXCHANGE = "celeryev"


class EventDispatcher:
    """Publishes events for one node. ``send`` costs nothing while disabled."""

    def __init__(self, broker: Broker, hostname: str, enabled: bool = True) -> None:
        self.broker = broker
        self.hostname = hostname
        self.enabled = enabled and broker.has(BROADCAST)
        self.pid = os.getpid()
        self.clock = 0
        self.utcoffset = -time.timezone // 3600

    def send(self, event_type: str, **fields: Any) -> None:
        """Publish one event (errors are swallowed: events must never break a task)."""
        if not self.enabled:
            return
        self.clock += 1
        body = {"type": event_type, "hostname": self.hostname, "timestamp": time.time(),
                "utcoffset": self.utcoffset, "pid": self.pid, "clock": self.clock, **fields}
        try:
            self.broker.broadcast(EVENT_EXCHANGE, Message({"hostname": self.hostname}, {"delivery_mode": 1},
                                                          json_dumps(body)),
                                  routing_key=event_type.replace("-", "."))
        except Exception:
            pass


class EventReceiver:
    """Iterates over events from every worker: ``for event in EventReceiver(app).itercapture()``."""

    def __init__(self, app: Celeriac, pattern: str = "#") -> None:
        broker = app.broker
        if not broker.has(BROADCAST):
            raise ImproperlyConfigured(f"The broker {broker.safe_url} does not support broadcast "
                                       "messages, so events cannot be received from it.")
        self.subscription = broker.subscribe(EVENT_EXCHANGE, pattern)

    def itercapture(self, timeout: float | None = None, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Yield events as they arrive, for ``timeout`` seconds or ``limit`` events."""
        deadline = None if timeout is None else time.monotonic() + timeout
        count = 0
        while deadline is None or time.monotonic() < deadline:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            for message in self.subscription.fetch(wait):
                try:
                    payload = json_loads(message.body)
                except Exception:
                    continue
                for event in payload if isinstance(payload, list) else [payload]:
                    if isinstance(event, dict):
                        event["local_received"] = time.time()
                        yield event
                        count += 1
                        if limit is not None and count >= limit:
                            return

    def capture(self, handler: Callable[[dict[str, Any]], None], timeout: float | None = None) -> None:
        """Call ``handler(event)`` for each event."""
        for event in self.itercapture(timeout):
            handler(event)

    def close(self) -> None:
        """Stop receiving."""
        self.subscription.close()


def format_event(event: dict[str, Any]) -> str:
    """One line per event, like ``celery events --dump``."""
    import datetime as dt

    when = dt.datetime.fromtimestamp(float(event.get("timestamp", 0)), dt.timezone.utc)
    kind = str(event.get("type", "?"))
    group, _, action = kind.partition("-")
    human = {"online": "started", "offline": "shutdown"}.get(action, action)
    skip = {"type", "hostname", "timestamp", "local_received", "utcoffset", "pid", "clock"}
    fields = ", ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    return f"{event.get('hostname')} [{when}] {group} {human}: {fields}"
