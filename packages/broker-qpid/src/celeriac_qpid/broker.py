"""``qpid://``, ``amqp10://`` (``qpids://``, ``amqps10://``): any AMQP 1.0 broker through
python-qpid-proton.

One :class:`~celeriac_qpid.reactor.Reactor` (a proton Container in its own thread) owns the
connection; publishing, consuming and acknowledging from any thread is marshalled to it.

AMQP 1.0 has no exchanges or bindings, so routing to named exchanges happens here: the broker
remembers the queues declared through it (and the ``queue=`` a publisher passes), and a message
for exchange ``X`` with routing key ``K`` goes to each known queue bound to ``X`` whose binding
matches ``K`` (direct, topic or fanout rules). A message for an exchange nobody declared here
goes to the dialect's exchange address (RabbitMQ: ``/topic/<X>.<K>`` on ``amq.topic``, where
a remote-control reply queue bound to ``X`` is consumed; see :mod:`celeriac_qpid.address`).

Capabilities: ``broadcast`` (remote control, events; off with the transport option
``broadcast=False``, for a broker with no multicast for the dialect's addresses),
``reply_queues`` (``rpc://``) and ``batch``. Not declared: ``delay`` (AMQP 1.0 brokers differ; the worker holds ETA tasks),
``priority`` (RabbitMQ 3.x cannot declare ``x-max-priority`` over AMQP 1.0: a queue with
``max_priority`` must be created beforehand, and is then honoured) and ``queue_size`` (AMQP 1.0
cannot count a queue).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from celeriac.broker.base import (
    BATCH,
    BROADCAST,
    REPLY_QUEUES,
    Broker,
    BrokerConnectionError,
    Consumer,
    Subscription,
)
from celeriac.protocol import Message
from celeriac.routing import Queue

from celeriac_qpid import codec
from celeriac_qpid.address import Target, dialect_from_conf, parse_url, topic_matches
from celeriac_qpid.consumer import QpidConsumer, QpidSubscription, Source
from celeriac_qpid.reactor import Options, Reactor

__all__ = ["QpidBroker"]

logger = logging.getLogger("celeriac.qpid")

# proton logs connection problems with tracebacks; this plugin reports them in one line.
if logging.getLogger("proton").level == logging.NOTSET:
    logging.getLogger("proton").setLevel(logging.CRITICAL)

_LIVE: weakref.WeakSet[QpidBroker] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """A script that publishes and exits without ``app.close()`` still gets its messages
    confirmed (up to ``publish_retry_timeout``)."""
    for broker in list(_LIVE):
        reactor = broker._reactor
        if (reactor is not None and broker._pid == os.getpid() and reactor._inflight
                and not reactor.flush(reactor.options.publish_timeout)):
            logger.error("%d message(s) were not confirmed by %s before the process exited; "
                             "they may be lost.", reactor._inflight, broker.safe_url)


class QpidBroker(Broker):
    """An AMQP 1.0 broker connection. Every public method is thread-safe."""

    capabilities = frozenset({BROADCAST, REPLY_QUEUES, BATCH})
    description = "AMQP 1.0 (python-qpid-proton)"

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        self.endpoints = parse_url(url)
        self.dialect = dialect_from_conf(conf, self.safe_url)
        self.options = Options.from_conf(conf)
        if not (conf.get("broker_transport_options") or {}).get("broadcast", True):
            # a broker without multicast for the dialect's addresses: remote control and events
            # say they are not available instead of sharing one queue between subscribers
            self.capabilities = self.capabilities - {BROADCAST}  # type: ignore[misc]
        self._reactor: Reactor | None = None
        self._lock = threading.Lock()
        self._declared: dict[str, Queue] = {}
        #: (exchange, routing key, queue) -> targets, while the declared queues do not change
        self._routes: dict[tuple[str, str, int], tuple[Queue | None, list[Target]]] = {}
        self._consumers: set[QpidConsumer] = set()
        self._closed = False
        self._pid = os.getpid()
        _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<QpidBroker {self.safe_url} dialect={self.dialect.name}>"

    # -- connection ---------------------------------------------------------------------------

    @property
    def reactor(self) -> Reactor:
        """The connection's reactor, started (and connected) on first use."""
        reactor = self._reactor
        if reactor is not None and self._pid == os.getpid() and not reactor._closed.is_set():
            return reactor
        with self._lock:
            if self._closed:
                raise BrokerConnectionError(f"The broker {self.safe_url} was closed.")
            if self._pid != os.getpid():  # forked child: the parent's thread is not here
                self._pid = os.getpid()
                self._reactor = None
                self._consumers = set()
            if self._reactor is None or self._reactor._closed.is_set():
                self._reactor = Reactor(self.endpoints, self.dialect, self.options, self.safe_url)
            return self._reactor

    def connect(self) -> None:
        """Connect now. Raises ``BrokerConnectionError`` (one line, password masked) when the
        broker cannot be reached, with ``transient = False`` when it refuses the login."""
        reactor = self.reactor
        try:
            reactor.wait_open(self.options.connect_timeout)
        except BrokerConnectionError:
            # A connection that consumers use keeps reconnecting on its own: closing it here (a
            # liveness probe calls connect() during an outage) would leave them on a dead one.
            if not reactor._attachments and not reactor._ever_opened:
                with self._lock:
                    if self._reactor is reactor:
                        self._reactor = None
                reactor.close(0)
            raise

    # -- routing ------------------------------------------------------------------------------

    @staticmethod
    def _emulated(queue: Queue) -> bool:
        """A transient queue bound to an exchange of another name (remote-control replies): it
        exists only while consumed, as the dialect's subscription to that exchange."""
        name = queue.exchange.name if queue.exchange is not None else ""
        return bool(name) and name != queue.name and not queue.durable and bool(queue.auto_delete)

    def _queue_target(self, queue: Queue) -> Target:
        if self._emulated(queue):
            assert queue.exchange is not None
            address, subject = self.dialect.exchange(queue.exchange.name, queue.binding_key)
            return Target(address, subject=subject, ttl=self._broadcast_ttl(queue.exchange.name))
        return Target(self._queue_address(queue), durable=bool(queue.durable))

    def _queue_address(self, queue: Queue) -> str:
        """A priority queue must exist already (AMQP 1.0 cannot give it ``x-max-priority``;
        see the README): it is addressed as an existing queue, whatever its arguments."""
        if queue.max_priority:
            return self.dialect.existing_queue(queue.name)
        return self.dialect.queue(queue.name)

    def _source(self, queue: Queue) -> Source:
        if self._emulated(queue):
            assert queue.exchange is not None
            address, pattern, caps = self.dialect.subscription(queue.exchange.name, queue.binding_key)
            return Source(queue.name, address, False, caps, pattern)
        return Source(queue.name, self._queue_address(queue), bool(queue.durable))

    def _targets(self, exchange: str, routing_key: str, queue: Queue | None) -> list[Target]:
        if queue is not None and queue.name:
            bound = queue.exchange.name if queue.exchange is not None else ""
            if ((not exchange and routing_key == queue.name)
                    or (exchange and bound == exchange and self._binds(queue, routing_key))):
                self._remember(queue)
                return [self._queue_target(queue)]
        if not exchange:
            known = self._declared.get(routing_key)
            if known is not None:
                return [self._queue_target(known)]
            return [Target(self.dialect.existing_queue(routing_key))]
        on_exchange = [q for q in list(self._declared.values())
                       if q.exchange is not None and q.exchange.name == exchange]
        if on_exchange and not all(self._emulated(q) for q in on_exchange):
            # an exchange known here: its bound queues (none matching: unroutable, dropped)
            targets = {self._queue_target(q): None for q in on_exchange if self._binds(q, routing_key)}
            return list(targets)
        address, subject = self.dialect.exchange(exchange, routing_key)
        return [Target(address, subject=subject, ttl=self._broadcast_ttl(exchange))]

    @staticmethod
    def _binds(queue: Queue, routing_key: str) -> bool:
        kind = queue.exchange.type if queue.exchange is not None else "direct"
        if kind == "fanout":
            return True
        if kind == "topic":
            return topic_matches(queue.binding_key, routing_key)
        return queue.binding_key == routing_key

    def _remember(self, queue: Queue) -> None:
        if self._declared.get(queue.name) != queue:
            self._declared[queue.name] = queue
            self._routes = {}

    def _route(self, exchange: str, routing_key: str, queue: Queue | None) -> list[Target]:
        """:meth:`_targets`, cached (per queue object: a ``Queue`` is not hashable) until a
        queue is declared."""
        key = (exchange, routing_key, id(queue))
        entry = self._routes.get(key)
        if entry is not None and entry[0] is queue:
            return entry[1]
        targets = self._targets(exchange, routing_key, queue)
        routes = self._routes
        if len(routes) >= 1000:  # routing keys of reply queues come and go
            routes = self._routes = {}
        routes[key] = (queue, targets)
        return targets

    # -- SPI ----------------------------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        """Create ``queue`` on the broker (a sender link to its address; durable as declared)
        and remember its binding for routing. A queue with ``max_priority`` must exist already
        (created with ``x-max-priority``: AMQP 1.0 cannot); it is checked. Cached. Raises
        ``BrokerConnectionError`` when the broker refuses the address or the priority queue
        does not exist."""
        if self._declared.get(queue.name) == queue:
            return
        previous = self._declared.get(queue.name)
        self._remember(queue)
        if self._emulated(queue):
            return
        try:
            if queue.max_priority:
                self._check_priority_queue(queue)
            self.reactor.publish_attach(self._queue_target(queue), f"declare queue {queue.name!r}")
        except BaseException:
            if previous is None:
                self._declared.pop(queue.name, None)
            else:
                self._declared[queue.name] = previous
            self._routes = {}
            raise

    def _check_priority_queue(self, queue: Queue) -> None:
        # A sender to /amq/queue/NAME attaches whether the queue exists or not (and RabbitMQ
        # drops what is sent to a missing one): a receiver without credit checks it exists.
        try:
            QpidConsumer(self.reactor, [self._source(queue)], 0, False, self.options.attach_timeout,
                         probe=True).close()
        except BrokerConnectionError as exc:
            reason = str(exc).split(f"{self.safe_url}: ", 1)[-1]
            raise BrokerConnectionError(
                f"Cannot use priority queue {queue.name!r} on {self.safe_url}: {reason}. AMQP 1.0 cannot "
                "create a queue with x-max-priority: create it beforehand (for instance rabbitmqadmin "
                f"declare queue name={queue.name} durable=true arguments='{{\"x-max-priority\": "
                f"{queue.max_priority}}}'), or give the queue no max_priority.") from None

    def publish(self, message: Message, exchange: str, routing_key: str, *,
                queue: Queue | None = None, not_before: float | None = None) -> None:
        """Publish ``message``; returns once it fits the confirmation window (the broker has
        settled all but ``confirm_window`` messages). ``not_before`` is ignored (no ``delay``
        capability: the worker holds the message). Thread-safe. Raises
        ``BrokerConnectionError`` when the broker refuses the address or stays unreachable for
        ``publish_retry_timeout`` seconds."""
        targets = self._route(exchange, routing_key, queue)
        if not targets:
            return
        reactor = self.reactor
        what = f"publish to {exchange or routing_key!r}"
        for target in targets:
            reactor.publish(target, codec.encode(message, target.subject, target.ttl), what)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker settled every message the calling thread published (up to
        ``timeout`` s, default ``publish_retry_timeout``). Raises ``BrokerConnectionError`` when
        the broker rejected or could not take one of them, or did not confirm them in time.
        Thread-safe."""
        reactor = self._reactor
        if reactor is None or self._pid != os.getpid():
            return
        reactor.flush_thread(self.options.publish_timeout if timeout is None else timeout)

    def consumer(self, queues: Sequence[Queue], prefetch: int, *, no_ack: bool = False) -> Consumer:
        """Consume ``queues`` with at most ``prefetch`` unsettled deliveries (0 = no limit),
        through a session of its own. Raises ``BrokerConnectionError`` when the broker refuses
        a queue or cannot be reached."""
        for queue in queues:
            self._remember(queue)
        sources = [self._source(q) for q in queues]
        consumer = QpidConsumer(self.reactor, sources, prefetch, no_ack, self.options.attach_timeout)
        with self._lock:
            self._consumers.add(consumer)
        return consumer

    def purge(self, queue: str) -> int:
        """Remove the ready messages of ``queue`` by consuming them until the queue stays empty
        for a moment; return how many. AMQP 1.0 has no purge operation."""
        known = self._declared.get(queue)
        if known is not None and self._emulated(known):
            return 0
        source = Source(queue, self._queue_address(known) if known else self.dialect.existing_queue(queue),
                        bool(known.durable) if known else False)
        try:
            consumer = QpidConsumer(self.reactor, [source], 0, False, self.options.attach_timeout)
        except BrokerConnectionError:
            if known is None:
                return 0
            raise
        count = 0
        try:
            idle_until = time.monotonic() + 0.3
            while time.monotonic() < idle_until:
                got = consumer.fetch(500, 0.1)
                for delivery in got:
                    consumer.ack(delivery)
                if got:
                    count += len(got)
                    idle_until = time.monotonic() + 0.3
        finally:
            self.reactor.call(lambda: None)  # the acks are applied before the session ends
            consumer.close()
        return count

    def delete_queue(self, queue: str) -> None:
        """AMQP 1.0 cannot delete a node: purge ``queue`` (it stays declared on the broker; an
        ``expires`` policy or ``rabbitmqctl delete_queue`` removes it)."""
        self.purge(queue)

    def broadcast(self, exchange: str, message: Message, routing_key: str = "") -> None:
        """Send ``message`` to every current subscriber of ``exchange`` (fire-and-forget,
        pre-settled). Thread-safe. Raises ``NotImplementedError`` when the transport option
        ``broadcast`` is off."""
        if BROADCAST not in self.capabilities:
            super().broadcast(exchange, message, routing_key)
        address, subject, capabilities = self.dialect.broadcast(exchange, routing_key)
        target = Target(address, capabilities=capabilities, presettled=True, subject=subject)
        self.reactor.publish(target, codec.encode(message, subject, self._broadcast_ttl(exchange)),
                             f"broadcast to {exchange!r}")

    def _broadcast_ttl(self, exchange: str) -> float:
        """Seconds a broadcast (or a message to an emulated exchange, such as a remote-control
        reply) may wait in a subscriber's queue: Celery's ``event_queue_ttl`` (5) for events,
        ``control_queue_ttl`` (300) otherwise. RabbitMQ 3.x keeps the queue of a ``/topic/``
        subscription after it ends, so this bounds what piles up there."""
        conf = self.conf
        if exchange == (conf.get("event_exchange") or "celeryev"):
            return float(conf.get("event_queue_ttl") or 5.0)
        return float(conf.get("control_queue_ttl") or 300.0)

    def subscribe(self, exchange: str, pattern: str = "#") -> Subscription:
        """Receive broadcasts of ``exchange`` matching ``pattern`` from now on. Raises
        ``NotImplementedError`` when the transport option ``broadcast`` is off."""
        if BROADCAST not in self.capabilities:
            return super().subscribe(exchange, pattern)
        return QpidSubscription(self.reactor, exchange, pattern, self.options.attach_timeout)

    def close(self) -> None:
        """Wait (up to 10 s) for unsettled publishes, close consumers and the connection.
        Idempotent."""
        with self._lock:
            self._closed = True
            reactor, self._reactor = self._reactor, None
            consumers = list(self._consumers)
            self._consumers.clear()
        if reactor is None or self._pid != os.getpid():
            return
        for consumer in consumers:
            consumer.close()
        reactor.close(10.0)
