"""``memory://``: an in-process broker for tests and single-process apps.

Every :class:`MemoryBroker` created with the same URL (``netloc + path``) in one process shares
one set of queues, so a client and a worker thread in the same process talk through it.
``memory://`` and ``memory://other`` are two separate brokers. Nothing survives the process.

The module also holds the exchange-routing helpers the embedded SQLite broker shares:
:func:`topic_matches` and :func:`route`.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from celeriac.broker.base import (
    BATCH,
    BROADCAST,
    DELAY,
    PRIORITY,
    QUEUE_SIZE,
    REPLY_QUEUES,
    Broker,
    Consumer,
    Delivery,
    Subscription,
)
from celeriac.protocol import Message
from celeriac.routing import Queue

__all__ = ["Binding", "MemoryBroker", "message_priority", "route", "topic_matches"]


# -- exchange routing (shared with the SQLite broker) -----------------------------------------


@dataclass(frozen=True, slots=True)
class Binding:
    """One queue bound to an exchange: ``exchange_type`` is direct, topic or fanout."""

    exchange: str
    exchange_type: str
    key: str
    queue: str


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: words split on ``.``, ``*`` is one word, ``#`` zero or more."""
    if pattern == "#" or pattern == key:
        return True
    return _match_words(pattern.split("."), key.split(".") if key else [])


def _match_words(pat: list[str], words: list[str]) -> bool:
    if not pat:
        return not words
    head = pat[0]
    if head == "#":
        rest = pat[1:]
        return any(_match_words(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    if head == "*" or head == words[0]:
        return _match_words(pat[1:], words[1:])
    return False


def route(bindings: Iterable[Binding], routing_key: str) -> list[str]:
    """Names of the queues (deduplicated, in binding order) a message with ``routing_key``
    published to the exchange of ``bindings`` goes to."""
    found: dict[str, None] = {}
    for binding in bindings:
        kind = binding.exchange_type
        if kind == "fanout":
            hit = True
        elif kind == "topic":
            hit = topic_matches(binding.key, routing_key)
        else:
            hit = binding.key == routing_key
        if hit:
            found[binding.queue] = None
    return list(found)


def message_priority(message: Message, max_priority: int | None) -> int:
    """The message's AMQP ``priority`` property as an int, clamped to ``[0, max_priority]``."""
    raw = message.properties.get("priority")
    if raw is None:
        return 0
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return 0
    if value < 0:
        return 0
    if max_priority is not None and value > max_priority:
        return max_priority
    return value


# -- in-process state -------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """A stored message with the bookkeeping the broker needs."""

    message: Message
    queue: str
    exchange: str
    routing_key: str
    priority: int
    seq: int
    redelivered: bool = False


@dataclass(slots=True)
class _QueueState:
    declaration: Queue | None
    ready: list[tuple[int, int, _Entry]] = field(default_factory=list)  # heap (-prio, seq, entry)


class _State:
    """One ``memory://`` broker's queues, shared by every MemoryBroker of the same URL."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.queues: dict[str, _QueueState] = {}
        self.bindings: dict[str, dict[Binding, None]] = {}
        self.delayed: list[tuple[float, int, _Entry]] = []  # heap (not_before, seq, entry)
        self.subscriptions: set[_MemorySubscription] = set()
        self.seq = itertools.count()

    def queue(self, name: str) -> _QueueState:
        state = self.queues.get(name)
        if state is None:
            state = self.queues[name] = _QueueState(None)
        return state

    def push(self, entry: _Entry) -> None:
        """Put ``entry`` in its queue's ready heap. Caller holds ``cond``."""
        heapq.heappush(self.queue(entry.queue).ready, (-entry.priority, entry.seq, entry))

    def promote_due(self, now: float) -> None:
        """Move delayed entries whose time has come to their queues. Caller holds ``cond``."""
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            self.push(heapq.heappop(delayed)[2])


_REGISTRY: dict[str, _State] = {}
_REGISTRY_LOCK = threading.Lock()


def _state_for(url: str) -> _State:
    parts = urlsplit(url)
    key = parts.netloc + parts.path
    with _REGISTRY_LOCK:
        state = _REGISTRY.get(key)
        if state is None:
            state = _REGISTRY[key] = _State()
        return state


# -- consumer and subscription ----------------------------------------------------------------


class _MemoryConsumer(Consumer):
    """Consumer of a :class:`MemoryBroker`; ack/reject are thread-safe (one shared lock)."""

    def __init__(self, broker: MemoryBroker, queues: Sequence[str], prefetch: int,
                 no_ack: bool) -> None:
        self.broker = broker
        self.state = broker._state
        self.queues = list(dict.fromkeys(queues))
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.unacked: dict[int, _Entry] = {}
        self.closed = False

    def _take(self, max_count: int) -> list[Delivery]:
        state = self.state
        state.promote_due(time.time())
        heaps = [state.queue(name).ready for name in self.queues]
        out: list[Delivery] = []
        while len(out) < max_count:
            best: list[tuple[int, int, _Entry]] | None = None
            for heap in heaps:
                if heap and (best is None or heap[0][:2] < best[0][:2]):
                    best = heap
            if best is None:
                break
            entry = heapq.heappop(best)[2]
            if not self.no_ack:
                self.unacked[entry.seq] = entry
            out.append(Delivery(entry.message, entry.queue, entry.seq, entry.exchange,
                                entry.routing_key, entry.redelivered))
        return out

    def _room(self, max_count: int) -> int:
        if self.prefetch > 0 and not self.no_ack:
            return min(max_count, self.prefetch - len(self.unacked))
        return max_count

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Return up to ``max_count`` deliveries, waiting up to ``timeout`` s for the first."""
        deadline = time.monotonic() + max(0.0, timeout)
        state = self.state
        with state.cond:
            while True:
                if self.closed:
                    return []
                room = self._room(max_count)
                if room > 0:
                    out = self._take(room)
                    if out:
                        return out
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                if state.delayed:
                    left = min(left, max(0.0, state.delayed[0][0] - time.time()) + 0.001)
                state.cond.wait(left)

    def ack(self, delivery: Delivery) -> None:
        """Forget ``delivery``. Thread-safe; acking twice is harmless."""
        with self.state.cond:
            if self.unacked.pop(delivery.tag, None) is not None:
                self.state.cond.notify_all()  # the prefetch window has room again

    def reject(self, delivery: Delivery, requeue: bool = False) -> None:
        """Drop ``delivery`` or, with ``requeue``, put it back at its place in its queue."""
        state = self.state
        with state.cond:
            entry = self.unacked.pop(delivery.tag, None)
            if entry is not None and requeue:
                entry.redelivered = True
                state.push(entry)
            state.cond.notify_all()

    def close(self) -> None:
        """Stop consuming and requeue every unacked delivery. Idempotent."""
        state = self.state
        with state.cond:
            if self.closed:
                return
            self.closed = True
            for entry in self.unacked.values():
                entry.redelivered = True
                state.push(entry)
            self.unacked.clear()
            state.cond.notify_all()
        self.broker._consumers.discard(self)


class _MemorySubscription(Subscription):
    """Broadcast subscription: messages are appended by :meth:`MemoryBroker.broadcast`."""

    def __init__(self, broker: MemoryBroker, exchange: str, pattern: str) -> None:
        self.broker = broker
        self.exchange = exchange
        self.pattern = pattern
        self.inbox: deque[Message] = deque()

    def fetch(self, timeout: float) -> list[Message]:
        """Return the broadcasts received so far, waiting up to ``timeout`` for the first."""
        state = self.broker._state
        deadline = time.monotonic() + max(0.0, timeout)
        with state.cond:
            while not self.inbox:
                left = deadline - time.monotonic()
                if left <= 0 or self not in state.subscriptions:
                    return []
                state.cond.wait(left)
            out = list(self.inbox)
            self.inbox.clear()
            return out

    def close(self) -> None:
        """Stop receiving. Idempotent."""
        state = self.broker._state
        with state.cond:
            state.subscriptions.discard(self)
            state.cond.notify_all()
        self.broker._subscriptions.discard(self)


# -- the broker -------------------------------------------------------------------------------


class MemoryBroker(Broker):
    """In-process broker shared per URL; every method is thread-safe."""

    capabilities = frozenset({DELAY, PRIORITY, QUEUE_SIZE, BROADCAST, REPLY_QUEUES, BATCH})
    description = "in-memory (this process only)"

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        self._state = _state_for(url)
        self._consumers: set[_MemoryConsumer] = set()
        self._subscriptions: set[_MemorySubscription] = set()

    def declare(self, queue: Queue) -> None:
        """Declare ``queue`` and bind it to its exchange. Idempotent, thread-safe."""
        state = self._state
        with state.cond:
            self._declare_locked(queue)

    def _declare_locked(self, queue: Queue) -> None:
        state = self._state
        qstate = state.queue(queue.name)
        if qstate.declaration is None or qstate.declaration != queue:
            qstate.declaration = queue
        assert queue.exchange is not None
        if queue.exchange.name:
            binding = Binding(queue.exchange.name, queue.exchange.type, queue.binding_key, queue.name)
            state.bindings.setdefault(binding.exchange, {})[binding] = None

    def publish(self, message: Message, exchange: str, routing_key: str, *,
                queue: Queue | None = None, not_before: float | None = None) -> None:
        """Route ``message`` to its queue(s); with ``not_before`` hold it until then.

        An exchange with no matching binding drops the message (AMQP semantics) unless
        ``queue`` is given, which then receives it. Thread-safe.
        """
        state = self._state
        with state.cond:
            if queue is not None and queue.name not in state.queues:
                self._declare_locked(queue)
            if exchange:
                targets = route(state.bindings.get(exchange, ()), routing_key)
                if not targets and queue is not None:
                    targets = [queue.name]
            else:
                targets = [routing_key]
            now = time.time()
            for name in targets:
                qstate = state.queue(name)
                decl = qstate.declaration
                prio = message_priority(message, decl.max_priority if decl else None)
                entry = _Entry(message, name, exchange, routing_key, prio, next(state.seq))
                if not_before is not None and not_before > now:
                    heapq.heappush(state.delayed, (not_before, entry.seq, entry))
                else:
                    state.push(entry)
            state.cond.notify_all()

    def consumer(self, queues: Sequence[Queue], prefetch: int, *, no_ack: bool = False) -> Consumer:
        """Consume ``queues`` (declared here) with at most ``prefetch`` unacked deliveries."""
        for queue in queues:
            self.declare(queue)
        consumer = _MemoryConsumer(self, [q.name for q in queues], prefetch, no_ack)
        self._consumers.add(consumer)
        return consumer

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``; return how many."""
        state = self._state
        with state.cond:
            qstate = state.queues.get(queue)
            count = 0
            if qstate is not None:
                count = len(qstate.ready)
                qstate.ready.clear()
            kept = [item for item in state.delayed if item[2].queue != queue]
            count += len(state.delayed) - len(kept)
            if len(kept) != len(state.delayed):
                heapq.heapify(kept)
                state.delayed = kept
            return count

    def scheduled(self, queues: Sequence[str], limit: int = 1000) -> list[tuple[float, Message]]:
        """The delayed messages of ``queues``, soonest first (see :meth:`Broker.scheduled`)."""
        wanted = set(queues)
        with self._state.cond:
            found = sorted(item[:2] + (item[2].message,) for item in self._state.delayed
                           if item[2].queue in wanted)
        return [(when, message) for when, _, message in found[:limit]]

    def queue_size(self, queue: str) -> int | None:
        """Number of ready messages in ``queue`` (delayed ones are not counted)."""
        state = self._state
        with state.cond:
            state.promote_due(time.time())
            qstate = state.queues.get(queue)
            return len(qstate.ready) if qstate is not None else 0

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue``, its messages and its bindings."""
        self.purge(queue)
        state = self._state
        with state.cond:
            state.queues.pop(queue, None)
            for exchange, bindings in list(state.bindings.items()):
                for binding in [b for b in bindings if b.queue == queue]:
                    del bindings[binding]
                if not bindings:
                    del state.bindings[exchange]

    def broadcast(self, exchange: str, message: Message, routing_key: str = "") -> None:
        """Deliver ``message`` to every current subscriber of ``exchange`` whose pattern matches."""
        state = self._state
        with state.cond:
            for sub in state.subscriptions:
                if sub.exchange == exchange and topic_matches(sub.pattern, routing_key):
                    sub.inbox.append(message)
            state.cond.notify_all()

    def subscribe(self, exchange: str, pattern: str = "#") -> Subscription:
        """Receive broadcasts on ``exchange`` from now on whose routing key matches ``pattern``."""
        sub = _MemorySubscription(self, exchange, pattern)
        with self._state.cond:
            self._state.subscriptions.add(sub)
        self._subscriptions.add(sub)
        return sub

    def close(self) -> None:
        """Close this broker's consumers (requeueing unacked deliveries) and subscriptions."""
        for consumer in list(self._consumers):
            consumer.close()
        for sub in list(self._subscriptions):
            sub.close()
