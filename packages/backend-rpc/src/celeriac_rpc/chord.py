"""The chord join for the RPC backend, kept in the broker so it is counted exactly once.

RPC results travel to the caller only, so no worker can see the other header members' results.
The join therefore uses two broker queues per chord (group id ``gid``), through the plain broker
SPI (any broker with the ``queue_size`` capability):

``celeriac.chord.<gid>``        every finished member publishes its entry here
                                (task id, group index, state, result).
``celeriac.chord.<gid>.token``  holds exactly one message, the *token*, put there by
                                :func:`start` (called by the client before it sends the
                                header) with the chord size in its body.

A finishing member publishes its entry (confirmed), then takes the token (a consumer with
prefetch 1: the broker hands the single message to one consumer at a time, and gives it back
if that consumer's connection dies). Holding it, it counts the entries: fewer than the size,
it returns the token and is done; otherwise it reads the entries, and if they cover every
member it replaces the token with a *done* marker, acknowledges the token and the entries and
returns them: that caller, and only that one, sends the chord body. Members holding the token
after that see the marker and stop. The last member to publish always gets the token after its
entry is counted, so the chord cannot be missed; entries of a redelivered member are
de-duplicated by task id. The joiner deletes the entries queue; the token queue, which may
still have members waiting on it, keeps the marker and expires (``x-expires``) after
``result_expires`` without use, as Celery's Redis chord keys do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from celeriac.backends.base import ChordEntry
from celeriac.broker.base import QUEUE_SIZE, Broker, Delivery
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol import Message
from celeriac.routing import Exchange, Queue
from celeriac.serialization import json_dumps, json_loads

__all__ = ["ChordJoin"]

logger = logging.getLogger("celeriac.rpc")

PREFIX = "celeriac.chord."


def _encode(data: Any) -> bytes:
    raw = json_dumps(data)
    return raw if isinstance(raw, bytes) else raw.encode("utf-8")


def _message(data: Any) -> Message:
    return Message({}, {"delivery_mode": 2}, _encode(data), "application/json", "utf-8")


class ChordJoin:
    """Broker-side chord counter used by :class:`celeriac_rpc.backend.RPCBackend`."""

    def __init__(self, broker: Broker, conf: Mapping[str, Any], expires: float | None) -> None:
        self.broker = broker
        self.expires = expires
        self.token_timeout = float(conf.get("rpc_chord_token_timeout") or 300.0)

    def _queues(self, group_id: str) -> tuple[Queue, Queue]:
        entries = Queue(PREFIX + group_id, Exchange(""), PREFIX + group_id, durable=True,
                        expires=self.expires)
        token = Queue(PREFIX + group_id + ".token", Exchange(""), PREFIX + group_id + ".token",
                      durable=True, expires=self.expires)
        return entries, token

    def _check(self) -> None:
        if not self.broker.has(QUEUE_SIZE):
            raise ImproperlyConfigured(
                f"Chords with the rpc:// result backend need a broker that can count queued "
                f"messages; {type(self.broker).__name__} cannot. Use a result backend with "
                "chord support (redis://, sqlite://) for chords.")

    def start(self, group_id: str, size: int) -> None:
        """Create the chord's queues and its token (client side, before the header is sent)."""
        self._check()
        entries, token = self._queues(group_id)
        self.broker.declare(entries)
        self.broker.declare(token)
        self.broker.purge(token.name)  # called twice for one chord: still a single token
        self.broker.publish(_message({"size": int(size)}), "", token.name, queue=token)

    def part_return(self, group_id: str, group_index: int | None, task_id: str, state: str,
                    result: Any) -> list[ChordEntry] | None:
        """Record one finished member; return all entries to the one caller that completes
        the chord, None to every other caller."""
        self._check()
        entries, token = self._queues(group_id)
        entry = {"task_id": task_id, "index": group_index, "state": state, "result": result}
        self.broker.publish(_message(entry), "", entries.name, queue=entries)
        consumer = self.broker.consumer([token], 1)
        try:
            held = self._take_token(consumer, group_id)
            if held is None:
                return None
            data = json_loads(held.message.body)
            if not isinstance(data, dict) or data.get("done"):
                # joined already: what is in the entries queue now is a late duplicate
                consumer.reject(held, requeue=True)
                self.broker.delete_queue(entries.name)
                return None
            size = int(data.get("size", 0))
            found = self._join(entries, size)
            if found is None:
                consumer.reject(held, requeue=True)
                return None
            self.broker.publish(_message({"done": True}), "", token.name, queue=token)
            consumer.ack(held)
            consumer.flush()
            return found
        finally:
            consumer.close()

    def _take_token(self, consumer: Any, group_id: str) -> Delivery | None:
        deadline = time.monotonic() + self.token_timeout
        while time.monotonic() < deadline:
            got = consumer.fetch(1, 1.0)
            if got:
                return got[0]  # type: ignore[no-any-return]
        logger.error("Chord %s: no join token within %.0f s (was the chord started with this "
                     "rpc:// backend's set_chord_size?); this member is not counted.",
                     group_id, self.token_timeout)
        return None

    def _join(self, entries: Queue, size: int) -> list[ChordEntry] | None:
        """With the token held: read all entries if they cover ``size`` members."""
        count = self.broker.queue_size(entries.name) or 0
        if count < size:
            return None
        reader = self.broker.consumer([entries], 0)
        taken: list[Delivery] = []
        try:
            deadline = time.monotonic() + 30.0
            while len(taken) < count and time.monotonic() < deadline:
                taken.extend(reader.fetch(count - len(taken), 0.5))
            latest: dict[str, dict[str, Any]] = {}
            for delivery in taken:
                data = json_loads(delivery.message.body)
                if isinstance(data, dict) and "task_id" in data:
                    latest[str(data["task_id"])] = data
            if len(latest) < size:
                for delivery in taken:
                    reader.reject(delivery, requeue=True)
                return None
            for delivery in taken:
                reader.ack(delivery)
            reader.flush()
        finally:
            reader.close()
        ordered = sorted(latest.values(), key=lambda d: (d["index"] is None, d["index"] or 0))
        self.broker.delete_queue(entries.name)
        return [(d["task_id"], d["state"], d["result"]) for d in ordered]
