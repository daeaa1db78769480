"""Remote control, client side: ``app.control.revoke(id)``, ``app.control.inspect().active()``.

Requests are broadcast on the ``celery.pidbox`` exchange in Celery's pidbox format; replies come
back on a private reply queue (``<oid>.reply.celery.pidbox``). Needs a broker with the
``broadcast`` and ``reply_queues`` capabilities.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from celeriac.broker.base import BROADCAST, REPLY_QUEUES
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol import Message
from celeriac.routing import Exchange, Queue
from celeriac.serialization import json_dumps, json_loads

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["PIDBOX_EXCHANGE", "REPLY_EXCHANGE", "Control", "Inspect", "flatten_reply"]

PIDBOX_EXCHANGE = "celery.pidbox"
REPLY_EXCHANGE = "reply.celery.pidbox"


def flatten_reply(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """``[{node: reply}, ...]`` as one ``{node: reply}`` dict."""
    flat: dict[str, Any] = {}
    for reply in replies:
        flat.update(reply)
    return flat


class Control:
    """Sends remote control commands to workers."""

    def __init__(self, app: Celeriac) -> None:
        self.app = app

    def _check(self) -> None:
        broker = self.app.broker
        if not (broker.has(BROADCAST) and broker.has(REPLY_QUEUES)):
            raise ImproperlyConfigured(
                f"The broker {broker.safe_url} does not support broadcast messages, so remote "
                "control (inspect, control, status, revoke) is not available on it."
            )

    def broadcast(self, command: str, arguments: dict[str, Any] | None = None,
                  destination: list[str] | None = None, reply: bool = False, timeout: float = 1.0,
                  limit: int | None = None) -> list[dict[str, Any]]:
        """Send ``command`` to the workers (all, or ``destination``); with ``reply`` collect
        the replies for ``timeout`` seconds (or until ``limit`` replies arrived)."""
        self._check()
        broker = self.app.broker
        ticket = str(uuid.uuid4())
        body: dict[str, Any] = {"method": command, "arguments": arguments or {},
                                "destination": destination, "pattern": None, "matcher": None}
        consumer = None
        if reply:
            oid = self.app.thread_oid
            queue = Queue(f"{oid}.reply.celery.pidbox", Exchange(REPLY_EXCHANGE, "direct", durable=False),
                          oid, durable=False, auto_delete=True, expires=10.0)
            broker.declare(queue)
            consumer = broker.consumer([queue], 0, no_ack=True)
            body["ticket"] = ticket
            body["reply_to"] = {"exchange": REPLY_EXCHANGE, "routing_key": oid}
        headers = {"clock": 0, "expires": time.time() + timeout}
        broker.broadcast(PIDBOX_EXCHANGE, Message(headers, {"delivery_mode": 1}, json_dumps(body)))
        if consumer is None:
            return []
        replies: list[dict[str, Any]] = []
        if limit is None and destination:
            limit = len(destination)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and (limit is None or len(replies) < limit):
                for delivery in consumer.fetch(100, max(0.0, deadline - time.monotonic())):
                    if delivery.message.headers.get("ticket") != ticket:
                        continue
                    try:
                        replies.append(json_loads(delivery.message.body))
                    except Exception:
                        continue
        finally:
            consumer.close()
        return replies

    def inspect(self, destination: list[str] | None = None, timeout: float = 1.0) -> Inspect:
        """Read-only queries of worker state."""
        return Inspect(self, destination, timeout)

    def ping(self, destination: list[str] | None = None, timeout: float = 1.0) -> list[dict[str, Any]]:
        """``[{node: {"ok": "pong"}}, ...]`` for every worker that answered."""
        return self.broadcast("ping", reply=True, destination=destination, timeout=timeout)

    def revoke(self, task_id: str | list[str], destination: list[str] | None = None, terminate: bool = False,
               signal: str = "SIGTERM", reply: bool = False, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Tell the workers (all, or the node names in ``destination``) not to run ``task_id``
        (an id or a list of ids), and with ``terminate`` to stop it where it runs, sending
        ``signal`` (a name such as ``"SIGKILL"``) to a process pool's child. Celery's argument
        order. With ``reply``, returns ``[{node: reply}]`` collected for ``timeout`` seconds."""
        return self.broadcast("revoke", {"task_id": task_id, "terminate": terminate, "signal": signal},
                              destination=destination, reply=reply, timeout=timeout)

    def rate_limit(self, task_name: str, rate_limit: str | float | None,
                   destination: list[str] | None = None, reply: bool = False,
                   timeout: float = 1.0) -> list[dict[str, Any]]:
        """Change a task's rate limit on the workers (``"10/m"``; None or "" removes it)."""
        return self.broadcast("rate_limit", {"task_name": task_name, "rate_limit": rate_limit},
                              destination=destination, reply=reply, timeout=timeout)

    def time_limit(self, task_name: str, soft: float | None = None, hard: float | None = None,
                   destination: list[str] | None = None, reply: bool = False,
                   timeout: float = 1.0) -> list[dict[str, Any]]:
        """Change a task's time limits on the workers."""
        return self.broadcast("time_limit", {"task_name": task_name, "soft": soft, "hard": hard},
                              destination=destination, reply=reply, timeout=timeout)

    def shutdown(self, destination: list[str] | None = None) -> None:
        """Warm shutdown of the workers."""
        self.broadcast("shutdown", destination=destination)

    def enable_events(self, destination: list[str] | None = None, reply: bool = False,
                      timeout: float = 1.0) -> list[dict[str, Any]]:
        """Turn task events on (with ``reply``, the workers' answers, as ``broadcast``)."""
        return self.broadcast("enable_events", destination=destination, reply=reply, timeout=timeout)

    def disable_events(self, destination: list[str] | None = None, reply: bool = False,
                       timeout: float = 1.0) -> list[dict[str, Any]]:
        """Turn task events off (with ``reply``, the workers' answers, as ``broadcast``)."""
        return self.broadcast("disable_events", destination=destination, reply=reply, timeout=timeout)


class Inspect:
    """``app.control.inspect()``: each method returns ``{node: reply}`` or None when nobody replied."""

    def __init__(self, control: Control, destination: list[str] | None, timeout: float) -> None:
        self.control = control
        self.destination = destination
        self.timeout = timeout

    def _request(self, command: str, **arguments: Any) -> dict[str, Any] | None:
        replies = self.control.broadcast(command, arguments, destination=self.destination,
                                         reply=True, timeout=self.timeout)
        return flatten_reply(replies) or None

    def ping(self) -> dict[str, Any] | None:
        """``{node: {"ok": "pong"}}``."""
        return self._request("ping")

    def active(self, safe: bool = False) -> dict[str, Any] | None:
        """Tasks being executed."""
        return self._request("active", safe=safe)

    def reserved(self) -> dict[str, Any] | None:
        """Tasks received and waiting for a pool slot."""
        return self._request("reserved")

    def scheduled(self) -> dict[str, Any] | None:
        """Tasks held until their ETA."""
        return self._request("scheduled")

    def revoked(self) -> dict[str, Any] | None:
        """Ids the workers will not run."""
        return self._request("revoked")

    def registered(self) -> dict[str, Any] | None:
        """Registered task names."""
        return self._request("registered")

    def stats(self) -> dict[str, Any] | None:
        """Counters, pool, broker and prefetch of each worker."""
        return self._request("stats")

    def active_queues(self) -> dict[str, Any] | None:
        """Queues each worker consumes."""
        return self._request("active_queues")

    def query_task(self, *ids: str) -> dict[str, Any] | None:
        """``{node: {id: [state, info]}}`` for ids the workers know."""
        return self._request("query_task", ids=list(ids))

    def conf(self, with_defaults: bool = False) -> dict[str, Any] | None:
        """Each worker's configuration."""
        return self._request("conf", with_defaults=with_defaults)

    def clock(self) -> dict[str, Any] | None:
        """Each worker's logical clock."""
        return self._request("clock")
