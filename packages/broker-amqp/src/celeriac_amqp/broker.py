"""``amqp://`` / ``amqps://`` / ``pyamqp://``: RabbitMQ through pika, with Celery's topology.

Publishing uses one connection per publishing thread (pika is not thread-safe), with publisher
confirms unless ``broker_transport_options={"confirm_publish": False}``. Confirms are read as
they arrive with a window (transport option ``confirm_window``, default 1000 unconfirmed
messages per thread; 1 waits for each): ``publish`` waits only when the window is full, or for
a message to an exchange this connection has not declared (so a missing exchange is reported to
its caller). :meth:`AMQPBroker.flush` waits for every confirm of the calling thread; the worker
calls it after each task (and before acking an ``acks_late`` one), ``close`` and the
interpreter's exit call it too. A message whose confirm was lost with its connection or
channel is published again on the next one (at least once). A lost connection is reopened and the
publish retried with backoff for up to ``publish_retry_timeout`` seconds (transport option,
default 30), so a client rides out a RabbitMQ restart. Consumers run in their own I/O thread
(:mod:`celeriac_amqp.consumer`); delayed delivery is broker-side (:mod:`celeriac_amqp.delay`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import pika
import pika.exceptions as pex
from celeriac.broker.base import (
    BATCH,
    BROADCAST,
    DELAY,
    PRIORITY,
    QUEUE_SIZE,
    REPLY_QUEUES,
    Broker,
    BrokerConnectionError,
    Consumer,
    Subscription,
)
from celeriac.protocol import Message, to_timestamp
from celeriac.routing import Queue

from celeriac_amqp import delay, fastcodec, fastread, fastwrite, fieldtable
from celeriac_amqp.confirms import Unconfirmed
from celeriac_amqp.consumer import (
    AMQPConsumer,
    AMQPSubscription,
    task_setup,
    to_message,
)
from celeriac_amqp.link import (
    NOT_FOUND,
    RESOURCE_LOCKED,
    TRANSIENT_ERRORS,
    FatalConnectionError,
    Link,
    RetryPolicy,
    describe,
    exchange_kind,
    open_connection,
)
from celeriac_amqp.url import parse_url

__all__ = ["AMQPBroker", "build_properties"]

logger = logging.getLogger("celeriac.amqp")

T = TypeVar("T")

_RETRYABLE: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, BrokerConnectionError)

fieldtable.install()
fastcodec.install()
fastread.install()
fastwrite.install()

# pika logs every lost connection with a traceback at ERROR level; this plugin reports
# connection problems itself, in one line. Set the "pika" logger's level to see pika's own.
if logging.getLogger("pika").level == logging.NOTSET:
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def build_properties(message: Message, *, drop_expiration: bool = False,
                     extra_headers: Mapping[str, Any] | None = None) -> pika.BasicProperties:
    """AMQP basic properties for ``message`` (headers may hold nulls and floats)."""
    props = message.properties
    headers = dict(message.headers or {})
    if extra_headers:
        headers.update(extra_headers)
    delivery_mode = props.get("delivery_mode")
    priority = props.get("priority")
    expiration = None if drop_expiration else props.get("expiration")
    correlation_id = props.get("correlation_id")
    reply_to = props.get("reply_to")
    return pika.BasicProperties(
        content_type=message.content_type or None,
        content_encoding=message.content_encoding or None,
        headers=headers,
        delivery_mode=int(delivery_mode) if delivery_mode is not None else None,
        priority=int(priority) if priority is not None else None,
        correlation_id=str(correlation_id) if correlation_id is not None else None,
        reply_to=str(reply_to) if reply_to is not None else None,
        expiration=str(int(float(expiration))) if expiration is not None else None,
        message_id=props.get("message_id"),
        timestamp=props.get("timestamp"),
        type=props.get("type"),
        app_id=props.get("app_id"),
    )


def _delay_target(exchange: str, routing_key: str, queue: Queue | None) -> str | None:
    """The queue a delayed message must end up in, or None when it cannot be delayed by the
    broker (a named topic/fanout exchange may fan out to several queues)."""
    if not exchange:
        return routing_key
    if (queue is not None and queue.exchange is not None and queue.exchange.name == exchange
            and queue.exchange.type == "direct" and queue.binding_key == routing_key):
        return queue.name
    return None


class _GreenLinks:
    """The broker's link state when gevent or eventlet patched the process: there
    ``threading.local`` is per greenlet, which would open a connection per task and let the
    dead-thread pruning close links still in use. Instead each call borrows one of at most
    ``size`` links (:meth:`lease`), so the publisher confirms of several greenlets overlap.
    ``link`` is the link the current greenlet holds."""

    def __init__(self, size: int = 8) -> None:
        self.idle: list[Link] = []
        self.slots = threading.BoundedSemaphore(size)
        self.current = threading.local()  # per greenlet
        self.broker: AMQPBroker | None = None

    @property
    def link(self) -> Link | None:
        """The link the current greenlet holds (None outside :meth:`lease`)."""
        return getattr(self.current, "link", None)

    @link.setter
    def link(self, value: Link | None) -> None:
        self.current.link = value

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold an idle link (or none: the broker opens one) for one call; it goes back to
        the idle list after a success, and is closed after an error."""
        with self.slots:
            self.link = self.idle.pop() if self.idle else None
            ok = False
            try:
                yield
                ok = True
            finally:
                link, self.link = self.link, None
                if link is not None:
                    if ok and link.is_open:
                        self.idle.append(link)
                    else:
                        if self.broker is not None:
                            with self.broker._lock:
                                self.broker._links.pop(id(link), None)
                        with contextlib.suppress(Exception):
                            link.close()


def _thread_state(broker: AMQPBroker) -> Any:
    """A ``threading.local`` normally; a :class:`_GreenLinks` in a green process."""
    if socket.socket.__module__.partition(".")[0] in ("gevent", "eventlet"):
        links = _GreenLinks()
        links.broker = broker
        return links
    return threading.local()


def _flush_at_exit(broker: AMQPBroker) -> None:
    """At interpreter exit, wait for the confirms of the main thread's messages (a client that
    calls ``delay()`` and exits without closing the app loses nothing)."""
    ref = weakref.ref(broker)

    def flush() -> None:
        live = ref()
        if live is not None and not live._closed and threading.current_thread() is threading.main_thread():
            live._flush_quietly()

    atexit.register(flush)


def _forget_after_fork(broker: AMQPBroker) -> None:
    """In a forked child (prefork pools), drop the parent's connections without touching them:
    their sockets belong to the parent. The child opens its own at first use."""
    ref = weakref.ref(broker)

    def reset() -> None:
        child = ref()
        if child is not None:
            child._local = _thread_state(child)
            child._links = {}
            child._lock = threading.Lock()
            child._consumers = set()

    os.register_at_fork(after_in_child=reset)


class AMQPBroker(Broker):
    """RabbitMQ broker. Every public method is thread-safe."""

    capabilities = frozenset({DELAY, PRIORITY, QUEUE_SIZE, BROADCAST, REPLY_QUEUES, BATCH})
    description = "RabbitMQ (AMQP 0-9-1 via pika)"

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        self.addresses = parse_url(url)
        opts = conf.get("broker_transport_options") or {}
        self.confirm_publish = bool(opts.get("confirm_publish", True))
        self.confirm_window = max(1, int(opts.get("confirm_window", 1000)))
        self.publish_retry_timeout = float(opts.get("publish_retry_timeout", 30.0))
        self.retry_policy = RetryPolicy.from_conf(conf)
        heartbeat = conf.get("broker_heartbeat")
        self.heartbeat = 120.0 if heartbeat is None else float(heartbeat)
        self._local = _thread_state(self)
        self._links: dict[int, Link] = {}
        self._lock = threading.Lock()
        self._consumers: set[AMQPConsumer] = set()
        self._closed = False
        _forget_after_fork(self)
        _flush_at_exit(self)

    # -- connections --------------------------------------------------------------------------

    def _open_link(self, confirm: bool) -> Link:
        connection = open_connection(self.addresses, self.conf, self.safe_url)
        try:
            # Greenlets share links (a lease per call), so there every publish waits.
            window = 1 if isinstance(self._local, _GreenLinks) else self.confirm_window
            return Link(connection, self.conf, confirm, window)
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()
            raise

    def _thread_link(self) -> Link:
        link: Link | None = getattr(self._local, "link", None)
        if link is not None and link.is_open:
            try:
                link.check_alive(self.heartbeat)
                return link
            except _RETRYABLE:
                # idle longer than the heartbeat allows (a long task): RabbitMQ closed it
                logger.debug("Idle connection to %s was closed; reopening.", self.safe_url)
        if link is not None:
            self._drop_thread_link()
        if self._closed:
            raise BrokerConnectionError(f"The broker {self.safe_url} was closed.")
        link = self._open_link(self.confirm_publish)
        link.orphans = getattr(self._local, "orphans", None) or []
        self._local.orphans = []
        self._local.link = link
        with self._lock:
            if isinstance(self._local, _GreenLinks):
                self._links[id(link)] = link
            else:
                self._links[threading.get_ident()] = link
                self._prune_dead_threads()
        return link

    def _prune_dead_threads(self) -> None:
        alive = {t.ident for t in threading.enumerate()}
        for ident in [i for i in self._links if i not in alive]:
            self._links.pop(ident).close()

    def _drop_thread_link(self) -> None:
        link: Link | None = getattr(self._local, "link", None)
        self._local.link = None
        with self._lock:
            self._links.pop(id(link) if isinstance(self._local, _GreenLinks) else threading.get_ident(), None)
        if link is not None:
            # What the lost link never confirmed goes out again on the next one.
            lost = link.orphans + link.take_unconfirmed()
            if lost:
                self._local.orphans = (getattr(self._local, "orphans", None) or []) + lost
            link.close()

    def _call(self, what: str, op: Callable[[Link], T], retry_for: float | None = None) -> T:
        """Run ``op`` on this thread's link, reconnecting and retrying transient failures for
        up to ``retry_for`` seconds (default ``publish_retry_timeout``)."""
        deadline = time.monotonic() + (self.publish_retry_timeout if retry_for is None else retry_for)
        intervals = self.retry_policy.intervals()
        warned = False
        lease = getattr(self._local, "lease", None)
        while True:
            try:
                with lease() if lease is not None else contextlib.nullcontext():
                    return op(self._thread_link())
            except FatalConnectionError:
                raise
            except pex.ChannelClosedByBroker as exc:
                self._drop_thread_link()
                raise BrokerConnectionError(
                    f"RabbitMQ refused to {what} ({self.safe_url}): {describe(exc)}") from None
            except pex.NackError:
                raise BrokerConnectionError(
                    f"RabbitMQ did not accept the message ({what}, negative confirm).") from None
            except _RETRYABLE as exc:
                self._drop_thread_link()
                if self._closed or time.monotonic() >= deadline:
                    raise BrokerConnectionError(
                        f"Cannot {what} ({self.safe_url}): {describe(exc)}") from None
                wait = min(next(intervals), max(0.0, deadline - time.monotonic()))
                if not warned:
                    logger.warning("Connection to %s failed (%s); retrying to %s.",
                                   self.safe_url, describe(exc), what)
                    warned = True
                time.sleep(wait)

    def connect(self) -> None:
        """Open this thread's connection now (one attempt per address; the caller decides
        whether to retry).

        Raises ``BrokerConnectionError`` (one line, password masked) when RabbitMQ cannot be
        reached, and its subclass ``FatalConnectionError`` (``transient = False``) when it
        refuses the login or the vhost.
        """
        self._call("connect", lambda link: None, retry_for=0.0)

    # -- SPI ----------------------------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        """Declare ``queue``, its exchange and binding (cached per connection). Thread-safe."""
        self._call(f"declare queue {queue.name!r}", lambda link: link.declare_queue(queue))

    def publish(self, message: Message, exchange: str, routing_key: str, *,
                queue: Queue | None = None, not_before: float | None = None) -> None:
        """Publish ``message``; returns once RabbitMQ confirmed it (unless confirms are off).

        ``queue`` is declared first (cached). With ``not_before`` in the future the message
        takes the delayed-delivery path to its queue (see :mod:`celeriac_amqp.delay`); a message
        for a named topic/fanout exchange is published at once instead (the worker then holds
        it until its ETA). Thread-safe. Raises ``BrokerConnectionError``.
        """
        body = message.body

        def op(link: Link) -> None:
            link.republish()
            if queue is not None:
                link.declare_queue(queue)
            if not_before is not None:
                delay_ms = math.ceil((not_before - time.time()) * 1000)
                target = _delay_target(exchange, routing_key, queue) if delay_ms > 0 else None
                if target is not None:
                    link.ensure_delay_topology()
                    if link.bind_delay_target(target):
                        props = build_properties(message, drop_expiration=True,
                                                 extra_headers={delay.TARGET_HEADER: target})
                        link.publish(Unconfirmed(delay.entry_exchange(delay_ms),
                                                 delay.routing_key(delay_ms), body, props))
                        return
            # An exchange this connection never declared may not exist: wait for the outcome.
            link.publish(Unconfirmed(exchange, routing_key, body, build_properties(message)),
                         wait=bool(exchange) and exchange not in link.exchanges)

        self._call(f"publish to {exchange or routing_key!r}", op)

    def publish_reply(self, message: Message, queue: str) -> None:
        """Publish an ``rpc://`` reply to ``queue`` (default exchange). A transient reply goes out
        without a publisher confirm, on the connection's plain channel, like Celery's replies:
        RabbitMQ keeps a transient message in an auto-deleted reply queue only while it runs,
        and a confirm would cost the round trip about a tenth (its frame and its wait). A
        persistent reply (``result_persistent``) is published and confirmed like a task.
        Replies of one thread stay in order. Thread-safe. Raises ``BrokerConnectionError``."""
        if message.properties.get("delivery_mode") == 2 or not self.confirm_publish:
            super().publish_reply(message, queue)
            return
        body = message.body

        def op(link: Link) -> None:
            fastwrite.basic_publish(link.plain_channel(), "", queue, body, build_properties(message))
            link.last_used = time.monotonic()

        self._call(f"publish to {queue!r}", op)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until RabbitMQ confirmed every message this thread published (republishing
        those whose connection was lost). No-op without confirms or when this thread published
        nothing. Raises ``BrokerConnectionError`` when RabbitMQ refused any (negative confirm)
        or could not be reached within ``timeout`` seconds (default ``publish_retry_timeout``)."""
        link: Link | None = getattr(self._local, "link", None)
        if link is None and not getattr(self._local, "orphans", None):
            return
        if link is not None and link.confirms is None:
            return
        wait = self.publish_retry_timeout if timeout is None else timeout

        def op(link: Link) -> list[Unconfirmed]:
            link.republish()
            return link.wait_for_confirms(wait)

        refused = self._call("wait for publisher confirms", op, retry_for=wait)
        if refused:
            raise BrokerConnectionError(
                f"RabbitMQ refused {len(refused)} published message(s) (negative confirm), "
                f"the first to exchange {refused[0].exchange!r} with routing key "
                f"{refused[0].routing_key!r}; check the broker's log (a queue length limit with "
                "overflow=reject-publish refuses messages this way).")

    def consumer(self, queues: Sequence[Queue], prefetch: int, *, no_ack: bool = False) -> Consumer:
        """Consume ``queues`` (declared first) with at most ``prefetch`` unacked deliveries
        (0 = unlimited) from a dedicated connection and I/O thread. Raises
        ``BrokerConnectionError`` at once for refused credentials or vhost."""
        setup, redeclare = task_setup(self, queues)
        name = ",".join(q.name for q in queues)[:40]
        consumer = AMQPConsumer(self, setup, prefetch, no_ack, name=name, redeclare=redeclare)
        with self._lock:
            self._consumers.add(consumer)
        return consumer

    def _flush_quietly(self, timeout: float = 10.0) -> None:
        try:
            self.flush(timeout)
        except BrokerConnectionError as exc:
            logger.error("Some published messages may not have reached RabbitMQ: %s", exc)

    def _forget_consumer(self, consumer: AMQPConsumer) -> None:
        with self._lock:
            self._consumers.discard(consumer)

    def _passive(self, queue: str, action: Callable[[Link], int]) -> Callable[[Link], int]:
        def op(link: Link) -> int:
            if link.confirms is not None:  # this thread's messages are in the count
                link.confirms.wait(0)
            try:
                return action(link)
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code != NOT_FOUND:
                    raise
                link.reopen_channel()
                return 0
        return op

    def purge(self, queue: str) -> int:
        """Delete the ready messages of ``queue`` and those waiting for it in the delay levels;
        return how many (0 if it does not exist)."""
        ready = self._call(f"purge {queue!r}", self._passive(
            queue, lambda link: int(link.channel.queue_purge(queue).method.message_count)))
        return ready + len(self._browse([queue], remove=True))

    def scheduled(self, queues: Sequence[str], limit: int = 1000) -> list[tuple[float, Message]]:
        """Messages for ``queues`` waiting in the delay levels, soonest ETA first, as
        ``(unix time due, message)`` pairs (at most ``limit``). Browsing takes every delayed
        message for a moment and returns it to its place (see :func:`celeriac_amqp.delay.browse`);
        one process browses at a time. Raises ``BrokerConnectionError``."""
        out: list[tuple[float, Message]] = []
        for properties, body in self._browse(queues):
            message, _target = to_message(properties, body)
            when = to_timestamp((message.headers or {}).get("eta"))
            if when is not None:
                out.append((when, message))
        out.sort(key=lambda pair: pair[0])
        return out[:limit]

    def _browse(self, queues: Sequence[str], *, remove: bool = False,
                lock_timeout: float = 10.0) -> list[tuple[pika.BasicProperties, bytes]]:
        """Run :func:`delay.browse` on a channel of its own while holding the browse lock."""
        if not queues:
            return []

        def op(link: Link) -> list[tuple[pika.BasicProperties, bytes]]:
            deadline = time.monotonic() + lock_timeout
            while True:
                channel = link.connection.channel()
                try:
                    channel.queue_declare(delay.BROWSE_LOCK, exclusive=True, auto_delete=True)
                    break
                except pex.ChannelClosedByBroker as exc:
                    if exc.reply_code != RESOURCE_LOCKED or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
            try:
                return delay.browse(channel, queues, remove=remove)
            finally:
                try:
                    channel.queue_delete(delay.BROWSE_LOCK)
                except (pex.AMQPError, OSError):  # the channel died: free the lock on a fresh one
                    with contextlib.suppress(Exception):
                        link.connection.channel().queue_delete(delay.BROWSE_LOCK)
                with contextlib.suppress(Exception):
                    channel.close()

        what = "purge delayed messages" if remove else "list delayed messages"
        return self._call(f"{what} of {', '.join(queues)!r}", op)

    def queue_size(self, queue: str) -> int | None:
        """Number of ready messages in ``queue`` (0 if it does not exist)."""
        return self._call(f"count {queue!r}", self._passive(
            queue, lambda link: int(link.channel.queue_declare(queue, passive=True).method.message_count)))

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` and its messages; forget it in every connection's cache."""
        def action(link: Link) -> int:
            link.channel.queue_delete(queue)
            return 0

        with self._lock:
            for link in self._links.values():
                link.declared.pop(queue, None)
                link.delay_targets.discard(queue)
        self._call(f"delete {queue!r}", self._passive(queue, action))

    def broadcast(self, exchange: str, message: Message, routing_key: str = "") -> None:
        """Publish ``message`` to every queue bound to ``exchange`` (fire-and-forget: no
        confirm). The exchange is declared with Celery's type for its name. Thread-safe."""
        kind, durable = exchange_kind(exchange, self.conf)

        def op(link: Link) -> None:
            link.declare_exchange(exchange, kind, durable)
            link.plain_channel().basic_publish(exchange, routing_key, message.body,
                                               build_properties(message))

        self._call(f"broadcast to {exchange!r}", op)

    def subscribe(self, exchange: str, pattern: str = "#") -> Subscription:
        """Receive broadcasts of ``exchange`` matching ``pattern`` through an exclusive,
        auto-deleted queue on a dedicated connection."""
        return AMQPSubscription(self, exchange, pattern)

    def close(self) -> None:
        """Wait for this thread's publisher confirms (up to 10 s; an error is logged), then
        close consumers and every publishing connection. Idempotent."""
        if not self._closed:
            self._flush_quietly()
        self._closed = True
        with self._lock:
            consumers = list(self._consumers)
            links = list(self._links.values())
            self._links.clear()
        for consumer in consumers:
            consumer.close()
        for link in links:
            link.close()
        self._local = _thread_state(self)
