"""The kombu bridge: any kombu transport as a Celeriac broker.

kombu is used as a library, through its public objects only: :class:`kombu.Connection`,
:class:`kombu.Producer`, :class:`kombu.Consumer`, :class:`kombu.Queue` / :class:`kombu.Exchange`
and ``Connection.drain_events``. A Celeriac :class:`~celeriac.protocol.Message` is handed to
``Producer.publish`` as it is (body bytes with their content type, the headers table, the
properties), so what lands in the transport is exactly what Celery's client would have put there,
and a Celery worker on the same transport reads it (and the other way round).

Connections: one for publishing (shared by every thread of the process, behind a lock), one
per consumer and one per broadcast subscription, each used only by the thread that fetches from
it. kombu connections are not thread-safe, so acks and rejects made on other threads are queued
and applied by the fetching thread (or right away when it is not inside kombu).

Delivery guarantees are kombu's: on transports with a visibility timeout (SQS, Azure, Redis) an
unacked message comes back after the timeout even when its consumer was killed; on the other
virtual transports (filesystem, SQLAlchemy, Zookeeper, etcd, MongoDB) kombu holds the unacked
messages in the consumer's memory and puts them back when the consumer closes or its connection
drops, so a consumer killed with SIGKILL loses its prefetched messages (as a Celery worker does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from kombu.connection import Connection
from kombu.entity import Exchange as KombuExchange
from kombu.entity import Queue as KombuQueue
from kombu.messaging import Consumer as KombuMessagingConsumer
from kombu.messaging import Producer
from kombu.transport import virtual

from celeriac.broker.base import (
    BROADCAST,
    QUEUE_SIZE,
    REPLY_QUEUES,
    Broker,
    Consumer,
    Delivery,
    Subscription,
    mask_url,
)
from celeriac.exceptions import BrokerConnectionError
from celeriac.protocol import Message
from celeriac.routing import Queue
from celeriac_kombu.transports import kombu_url, resolve, transport_alias

__all__ = ["KombuBroker", "KombuConsumer", "KombuSubscription", "capabilities_of", "topic_matches"]

logger = logging.getLogger("celeriac.kombu")

#: Properties kombu's virtual transports add on the wire; not part of the message itself.
TRANSPORT_PROPERTIES = frozenset({"delivery_info", "delivery_tag", "body_encoding"})

#: How long one ``drain_events`` call may block while fetching; acks from other threads wait
#: at most this long for the fetching thread to release the connection.
DRAIN_SLICE = 0.1

#: kombu's virtual transports sleep ``polling_interval`` (1 s by default) after an empty poll;
#: Celeriac uses this unless ``broker_transport_options`` sets ``polling_interval``.
DEFAULT_POLLING_INTERVAL = 0.1

#: Celery's ``task_publish_retry_policy`` defaults.
DEFAULT_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching of ``key`` against ``pattern`` (``*`` one word, ``#`` zero or more).

    Used to filter broadcasts for a subscription; pure function, thread-safe.
    """
    if pattern in ("#", key):
        return True
    want, have = pattern.split("."), key.split(".") if key else []

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(have)
        if want[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(have) + 1))
        if j < len(have) and want[i] in ("*", have[j]):
            return match(i + 1, j + 1)
        return False

    return match(0, 0)


def capabilities_of(transport: type[Any]) -> frozenset[str]:
    """The Celeriac capabilities of a kombu transport class, from what kombu reports.

    ``broadcast`` when the transport implements fanout exchanges across processes (a virtual
    transport must also say ``supports_fanout``); ``queue_size`` when it counts ready messages
    (a virtual transport overrides ``_size``, or it is a real AMQP client); ``reply_queues``
    always (any kombu queue can be declared, published to through ``''`` and read without
    acks). No ``delay`` (kombu has no per-message delay in its API), no ``priority`` (each
    transport orders priorities its own way; the ``priority`` property is still passed on),
    no ``batch``. Thread-safe.
    """
    caps = {REPLY_QUEUES}
    exchange_types: frozenset[str] = getattr(getattr(transport, "implements", None), "exchange_type", frozenset())
    is_virtual = isinstance(transport, type) and issubclass(transport, virtual.Transport)
    channel_cls = getattr(transport, "Channel", None)
    if "fanout" in exchange_types and (not is_virtual or getattr(channel_cls, "supports_fanout", False)):
        caps.add(BROADCAST)
    if not is_virtual or (channel_cls is not None and getattr(channel_cls, "_size", None)
                          is not virtual.Channel._size):
        caps.add(QUEUE_SIZE)
    return frozenset(caps)


class _Quirks:
    """Per-transport adjustments, kept in one place."""

    def __init__(self, alias: str) -> None:
        # filesystem names message files "<milliseconds>_<uuid>.<queue>.msg" and reads them in
        # name order: two messages published in the same millisecond come out in random order.
        # Spacing one process's publishes a millisecond apart keeps them FIFO.
        self.one_publish_per_ms = alias == "filesystem"


class _Staging:
    """Atomic message files for kombu's filesystem transport.

    kombu writes a message file in place, and a reader listing the folder at that moment can
    take the file half-written: the read fails and the message is lost. Each of our connections
    therefore writes into a staging folder of its own (beside the data folder, so on the same
    filesystem), and the files are renamed into the data folder, an atomic step, right after
    every kombu call that may write (publish, broadcast, reject with requeue, close). Used under
    the lock of the connection it belongs to.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.folder = self.out.parent / ".celeriac-staging" / uuid.uuid4().hex
        self.folder.mkdir(parents=True, exist_ok=True)

    def flush(self) -> None:
        """Move every staged message file into the data folder, oldest name first."""
        try:
            names = sorted(os.listdir(self.folder))
        except FileNotFoundError:
            return
        for name in names:
            os.replace(self.folder / name, self.out / name)

    def remove(self) -> None:
        """Flush, then remove the staging folder."""
        with contextlib.suppress(OSError):
            self.flush()
            self.folder.rmdir()


def _filesystem_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``kombu+filesystem:///some/dir``: fill kombu's folder options under that folder (unless
    set) and create every folder the options name, since kombu expects them to exist."""
    path = unquote(urlsplit(url).path)
    if path and path != "/":
        root = Path(path)
        options.setdefault("data_folder_in", str(root / "data"))
        options.setdefault("data_folder_out", str(root / "data"))
        options.setdefault("control_folder", str(root / "control"))
        if options.get("store_processed"):
            options.setdefault("processed_folder", str(root / "processed"))
    for key in ("data_folder_in", "data_folder_out", "control_folder", "processed_folder"):
        if options.get(key):
            os.makedirs(options[key], exist_ok=True)
    return options


class KombuBroker(Broker):
    """A Celeriac broker on any kombu transport: ``kombu+<transport>://...``.

    ``url`` is ``kombu+`` followed by a kombu URL (``kombu+sqs://``,
    ``kombu+sqla+postgresql://user@host/db``, ``kombu+filesystem:///var/spool/celeriac``), or a
    plain kombu URL of a transport no other Celeriac plugin provides. ``conf`` is the app's
    settings: ``broker_transport_options`` go to kombu unchanged (``kombu+filesystem:///dir``
    fills the folder options under ``dir``), ``broker_connection_timeout``, ``broker_use_ssl``,
    ``broker_connection_max_retries`` and ``task_publish_retry_policy`` are honoured.

    Raises ``ImproperlyConfigured`` (a subclass naming the package to install) when kombu has no
    such transport or its client library is missing. Does not connect.

    Thread-safety: ``publish``, ``broadcast``, ``declare``, ``purge``, ``queue_size`` and
    ``delete_queue`` may be called from any thread (they share one connection behind a lock);
    each consumer and subscription is fetched from by one thread.
    """

    description = "kombu transport"

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        self.kombu_url = kombu_url(url)
        self.transport_cls = resolve(self.kombu_url)
        self.alias = transport_alias(self.kombu_url).lower()
        self.capabilities = capabilities_of(self.transport_cls)  # type: ignore[misc]
        self.description = f"kombu {self.alias} transport"  # type: ignore[misc]
        options = dict(conf.get("broker_transport_options") or {})
        if self.alias == "filesystem":
            options = _filesystem_options(self.kombu_url, options)
            self.kombu_url = "filesystem://"
        self.transport_options = options
        self.quirks = _Quirks(self.alias)
        policy = conf.get("task_publish_retry_policy") or DEFAULT_RETRY_POLICY
        self.retry_policy = dict(policy)
        retries = conf.get("broker_connection_max_retries")
        self.max_retries = 100 if retries is None else int(retries)
        self._lock = threading.RLock()
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._staging: _Staging | None = None
        self._declared: set[str] = set()
        self._last_publish_ms = 0
        self._children: weakref.WeakSet[KombuConsumer | KombuSubscription] = weakref.WeakSet()
        self._closed = False

    # -- connections -------------------------------------------------------------------------

    def new_connection(self) -> tuple[Connection, _Staging | None]:
        """A new, not yet connected ``kombu.Connection`` for this broker's URL and options, with
        its staging folder on the filesystem transport (None elsewhere). ``polling_interval`` is
        set on the transport (kombu's SQLAlchemy transport would pass it to ``create_engine``).
        Thread-safe."""
        conf = self.conf
        options = dict(self.transport_options)
        staging = None
        if self.alias == "filesystem":
            staging = _Staging(options.get("data_folder_out", "data_out"))
            options["data_folder_out"] = str(staging.folder)
        interval = options.get("polling_interval")
        if self.alias in ("sqla", "sqlalchemy"):  # kombu hands every option to create_engine()
            options.pop("polling_interval", None)
        kwargs: dict[str, Any] = {"transport_options": options}
        if conf.get("broker_connection_timeout") is not None:
            kwargs["connect_timeout"] = conf["broker_connection_timeout"]
        if conf.get("broker_use_ssl"):
            kwargs["ssl"] = conf["broker_use_ssl"]
        if conf.get("broker_login_method"):
            kwargs["login_method"] = conf["broker_login_method"]
        if self.alias == "filesystem":  # kombu's reader can take a file half-written
            from celeriac_kombu.filesystem import Transport as FilesystemTransport

            kwargs["transport"] = FilesystemTransport
        connection = Connection(self.kombu_url, **kwargs)
        transport = connection.transport
        if isinstance(transport, virtual.Transport):
            transport.polling_interval = DEFAULT_POLLING_INTERVAL if interval is None else float(interval)
        return connection, staging

    def error(self, exc: BaseException, doing: str) -> BrokerConnectionError:
        """A ``BrokerConnectionError`` for ``exc`` raised while ``doing`` something, URL masked."""
        if isinstance(exc, ImportError):  # e.g. SQLAlchemy's database driver: retrying cannot help
            missing = (exc.name or "the missing module").split(".")[0]
            error = BrokerConnectionError(
                f"kombu {self.alias} transport at {mask_url(self.url)}: {doing} failed: {exc}. "
                f"Install it with: pip install {missing}")
            error.transient = False
            return error
        return BrokerConnectionError(
            f"kombu {self.alias} transport at {mask_url(self.url)}: {doing} failed: "
            f"{type(exc).__name__}: {exc}")

    def _ensure(self) -> Connection:
        if self._closed:
            raise BrokerConnectionError(f"The broker {self.safe_url} is closed.")
        if self._connection is None:
            connection, self._staging = self.new_connection()
            try:
                connection.ensure_connection(max_retries=self.retry_policy.get("max_retries", 3),
                                             interval_start=0, interval_step=0.2, interval_max=1)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    connection.release()
                raise self.error(exc, "connecting") from exc
            self._connection = connection
            self._producer = Producer(connection.default_channel, auto_declare=False)
        return self._connection

    def _drop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
        if self._staging is not None:
            self._staging.remove()
        self._connection = None
        self._producer = None
        self._staging = None
        self._declared.clear()

    def connect(self) -> None:
        """Open the publishing connection now. Raises ``BrokerConnectionError``. Thread-safe."""
        with self._lock:
            self._ensure()

    # -- declarations --------------------------------------------------------------------------

    @staticmethod
    def kombu_queue(queue: Queue) -> KombuQueue:
        """The ``KombuQueue`` (with its exchange and binding) for a Celeriac queue declaration."""
        exchange = None
        if queue.exchange is not None:
            exchange = KombuExchange(queue.exchange.name, queue.exchange.type,
                                      durable=queue.exchange.durable,
                                      auto_delete=queue.exchange.auto_delete)
        return KombuQueue(queue.name, exchange, queue.routing_key if queue.routing_key is not None
                           else queue.name, durable=queue.durable, exclusive=queue.exclusive,
                           auto_delete=queue.auto_delete, max_priority=queue.max_priority,
                           message_ttl=queue.message_ttl, expires=queue.expires,
                           queue_arguments=dict(queue.queue_arguments) or None)

    def _declare_locked(self, queue: Queue) -> None:
        if queue.name in self._declared:
            return
        connection = self._ensure()
        self.kombu_queue(queue).bind(connection.default_channel).declare()
        self._declared.add(queue.name)

    def declare(self, queue: Queue) -> None:
        """Declare ``queue``, its exchange and binding (cached per connection). Thread-safe.

        Raises ``BrokerConnectionError`` when the transport fails.
        """
        with self._lock:
            try:
                self._declare_locked(queue)
            except BrokerConnectionError:
                raise
            except Exception as exc:
                self._drop()
                raise self.error(exc, f"declaring queue {queue.name!r}") from exc

    # -- publishing ----------------------------------------------------------------------------

    def _space_publishes(self) -> None:
        if not self.quirks.one_publish_per_ms:
            return
        while round(time.monotonic() * 1000) <= self._last_publish_ms:
            time.sleep(0.0002)

    def publish(self, message: Message, exchange: str, routing_key: str, *,
                queue: Queue | None = None, not_before: float | None = None) -> None:
        """Publish ``message`` through kombu's ``Producer.publish``, unchanged on the wire.

        ``queue`` is declared first (once per connection). ``not_before`` is ignored: no kombu
        transport declares ``delay``, the worker holds the message until its ETA. kombu retries
        connection errors with ``task_publish_retry_policy``. Thread-safe. Raises
        ``BrokerConnectionError`` when the message could not be handed to the transport.
        """
        properties = dict(message.properties)
        priority = properties.pop("priority", None)
        delivery_mode = properties.pop("delivery_mode", None)
        expiration = properties.pop("expiration", None)
        for key in TRANSPORT_PROPERTIES:
            properties.pop(key, None)
        extra: dict[str, Any] = {}
        if expiration is not None:
            with contextlib.suppress(TypeError, ValueError):
                extra["expiration"] = float(expiration) / 1000.0  # kombu writes it back in ms
        with self._lock:
            try:
                self._ensure()
                if queue is not None:
                    self._declare_locked(queue)
                self._space_publishes()
                assert self._producer is not None
                self._producer.publish(
                    message.body, routing_key=routing_key, exchange=exchange,
                    headers=dict(message.headers), content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    priority=priority if priority is not None else 0,
                    delivery_mode=delivery_mode, retry=True, retry_policy=self.retry_policy,
                    **extra, **properties)
                self._last_publish_ms = round(time.monotonic() * 1000)
                if self._staging is not None:
                    self._staging.flush()
            except BrokerConnectionError:
                raise
            except Exception as exc:
                self._drop()
                raise self.error(exc, f"publishing to {exchange or routing_key!r}") from exc

    # -- consuming ------------------------------------------------------------------------------

    def consumer(self, queues: Sequence[Queue], prefetch: int, *, no_ack: bool = False) -> KombuConsumer:
        """A consumer of ``queues`` on its own kombu connection (see :class:`KombuConsumer`)."""
        consumer = KombuConsumer(self, list(queues), prefetch, no_ack)
        self._children.add(consumer)
        return consumer

    # -- queue management ------------------------------------------------------------------------

    def _with_channel(self, doing: str, fn: Callable[[Any], Any]) -> Any:
        with self._lock:
            try:
                return fn(self._ensure().default_channel)
            except BrokerConnectionError:
                raise
            except Exception as exc:
                self._drop()
                raise self.error(exc, doing) from exc

    def purge(self, queue: str) -> int:
        """Delete the ready messages of ``queue``; return kombu's count. Thread-safe."""
        count = self._with_channel(f"purging {queue!r}", lambda ch: KombuQueue(queue, channel=ch).purge())
        return int(count or 0)

    def queue_size(self, queue: str) -> int | None:
        """Ready messages in ``queue`` (capability ``queue_size``), else None. Thread-safe."""
        if QUEUE_SIZE not in self.capabilities:
            return None

        def size(channel: Any) -> int:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)

        try:
            return int(self._with_channel(f"counting {queue!r}", size))
        except BrokerConnectionError:
            return None

    def delete_queue(self, queue: str) -> None:
        """Purge ``queue`` and delete it with its bindings where the transport can. Thread-safe."""
        def delete(channel: Any) -> None:
            KombuQueue(queue, channel=channel).purge()
            with contextlib.suppress(Exception):
                channel.queue_delete(queue=queue)

        self._with_channel(f"deleting {queue!r}", delete)
        with self._lock:
            self._declared.discard(queue)

    # -- broadcast ---------------------------------------------------------------------------------

    def _require_broadcast(self) -> None:
        if BROADCAST not in self.capabilities:
            raise NotImplementedError(
                f"The kombu {self.alias} transport has no fanout exchanges, so remote control and "
                "events are not available on it.")

    def broadcast(self, exchange: str, message: Message, routing_key: str = "") -> None:
        """Publish ``message`` to every subscriber of fanout exchange ``exchange``; subscribers
        filter on ``routing_key`` themselves. Thread-safe. Raises ``NotImplementedError`` when the
        transport has no fanout, ``BrokerConnectionError`` on failure."""
        self._require_broadcast()
        with self._lock:
            key = f"fanout:{exchange}"
            if key not in self._declared:
                self._with_channel(f"declaring exchange {exchange!r}",
                                   lambda ch: KombuExchange(exchange, "fanout", durable=False,
                                                             channel=ch).declare())
                self._declared.add(key)
        self.publish(message, exchange, routing_key)

    def subscribe(self, exchange: str, pattern: str = "#") -> KombuSubscription:
        """Subscribe to broadcasts on ``exchange`` whose routing key matches ``pattern``, through
        a queue of its own bound to the fanout exchange (deleted on ``close``)."""
        self._require_broadcast()
        subscription = KombuSubscription(self, exchange, pattern)
        self._children.add(subscription)
        return subscription

    def close(self) -> None:
        """Close every consumer and subscription of this broker, then the publishing connection
        (unacked deliveries go back to their queues). Idempotent, thread-safe."""
        for child in list(self._children):
            with contextlib.suppress(Exception):
                child.close()
        with self._lock:
            self._drop()
            self._closed = True


class _Fetcher:
    """A kombu connection owned by one fetching thread, with kombu consumers on it."""

    def __init__(self, broker: KombuBroker, prefetch: int, no_ack: bool) -> None:
        self.broker = broker
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.lock = threading.Lock()
        self.buffer: deque[Any] = deque()
        self.connection: Connection | None = None
        self.staging: _Staging | None = None
        self.failures = 0
        self.closed = False

    def queues(self) -> list[tuple[str, KombuQueue]]:
        """(name, kombu queue) pairs to consume; subclasses define them."""
        raise NotImplementedError

    def on_message(self, queue: str, message: Any) -> None:
        self.buffer.append((queue, message))

    def open(self) -> None:
        """(Re)connect, declare and start consuming. Called with ``lock`` held."""
        connection, staging = self.broker.new_connection()
        try:
            connection.ensure_connection(max_retries=1)
            channel = connection.channel()
            for name, queue in self.queues():
                bound = queue.bind(channel)
                bound.declare()
                consumer = KombuMessagingConsumer(channel, [bound], no_ack=self.no_ack, auto_declare=False,
                                          on_message=partial(self.on_message, name))
                if self.prefetch and not self.no_ack:
                    consumer.qos(prefetch_count=self.prefetch)
                consumer.consume()
        except Exception:
            with contextlib.suppress(Exception):
                connection.release()
            if staging is not None:
                staging.remove()
            raise
        self.connection = connection
        self.staging = staging

    def drain(self, timeout: float) -> None:
        """One ``drain_events`` of at most ``timeout`` seconds. Called with ``lock`` held."""
        try:
            if self.connection is None:
                self.open()
            assert self.connection is not None
            self.connection.drain_events(timeout=timeout)
            self.failures = 0
        except TimeoutError:
            self.failures = 0
        except Exception as exc:
            self.failures += 1
            if self.failures == 1:
                logger.warning("kombu %s transport: connection lost (%s: %s); reconnecting",
                               self.broker.alias, type(exc).__name__, exc)
            self.drop()
            if self.failures > self.broker.max_retries:
                raise self.broker.error(exc, "consuming") from exc
            time.sleep(min(0.1 * self.failures, 2.0, max(timeout, 0.05)))

    def drop(self) -> None:
        """Close the connection (kombu puts unacked deliveries back). Called with ``lock`` held.

        Acks and rejects other threads queued are applied first: a delivery already settled
        must not go back to its queue and run again."""
        self.before_drain()
        self.buffer.clear()
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.release()
        if self.staging is not None:
            self.staging.remove()
        self.connection = None
        self.staging = None

    def wait(self, want: int, timeout: float) -> None:
        """Fill ``buffer`` with up to ``want`` messages, waiting up to ``timeout`` for the first."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while len(self.buffer) < want and not self.closed:
            left = deadline - time.monotonic()
            with self.lock:
                self.before_drain()
                if self.buffer:  # got some: take what is ready now, without waiting
                    before = len(self.buffer)
                    self.drain(0)
                    if len(self.buffer) == before:
                        return
                    continue
                self.drain(max(min(DRAIN_SLICE, left), 0))
            if not self.buffer and left <= 0:
                return

    def before_drain(self) -> None:
        """Hook run with ``lock`` held before each drain (applies queued acks)."""


class KombuConsumer(_Fetcher, Consumer):
    """Deliveries from several queues on one kombu connection (one ``kombu.Consumer`` per queue,
    so each delivery knows its queue), with kombu's prefetch limit.

    ``fetch``, ``flush`` and ``close`` belong to the fetching thread; ``ack`` and ``reject`` are
    thread-safe: they are queued and applied by the fetching thread, or at once when that thread
    is not inside kombu.
    """

    def __init__(self, broker: KombuBroker, queues: list[Queue], prefetch: int, no_ack: bool) -> None:
        super().__init__(broker, prefetch, no_ack)
        self._queues = queues
        self._pending: deque[tuple[Any, bool, bool]] = deque()
        with self.lock:
            try:
                self.open()
            except Exception as exc:
                raise broker.error(exc, "starting a consumer") from exc

    def queues(self) -> list[tuple[str, KombuQueue]]:
        """The consumed queues as kombu declarations."""
        return [(q.name, KombuBroker.kombu_queue(q)) for q in self._queues]

    def _apply(self) -> None:
        wrote = False
        while self._pending:
            message, ack, requeue = self._pending.popleft()
            wrote = wrote or requeue
            if self.no_ack or message.acknowledged:
                continue
            try:
                if ack:
                    message.ack()
                else:
                    message.reject(requeue=requeue)
            except Exception as exc:  # the connection is gone: kombu put it back already
                logger.warning("kombu %s transport: %s failed: %s", self.broker.alias,
                               "ack" if ack else "reject", exc)
        if wrote and self.staging is not None:  # a requeued message was written
            self.staging.flush()

    def before_drain(self) -> None:
        """Apply the acks and rejects queued by other threads."""
        self._apply()

    def _settle(self, delivery: Delivery, ack: bool, requeue: bool) -> None:
        if self.no_ack:
            return
        self._pending.append((delivery.tag, ack, requeue))
        if self.lock.acquire(blocking=False):
            try:
                self._apply()
            finally:
                self.lock.release()

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Up to ``max_count`` deliveries, waiting up to ``timeout`` s for the first. Fetching
        thread only. Raises ``BrokerConnectionError`` after ``broker_connection_max_retries``
        failed reconnections."""
        if max_count <= 0:
            return []
        self.wait(max_count, timeout)
        out: list[Delivery] = []
        while self.buffer and len(out) < max_count:
            queue, message = self.buffer.popleft()
            properties = {k: v for k, v in (message.properties or {}).items()
                          if k not in TRANSPORT_PROPERTIES}
            info = message.delivery_info or {}
            body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
            out.append(Delivery(
                Message(dict(message.headers or {}), properties, body,
                        message.content_type or "application/octet-stream",
                        message.content_encoding or "binary"),
                queue, message, exchange=str(info.get("exchange") or ""),
                routing_key=str(info.get("routing_key") or ""),
                redelivered=bool(info.get("redelivered"))))
        return out

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery``. Thread-safe."""
        self._settle(delivery, True, False)

    def reject(self, delivery: Delivery, requeue: bool = False) -> None:
        """Reject ``delivery``, back to its queue with ``requeue``. Thread-safe."""
        self._settle(delivery, False, requeue)

    def flush(self) -> None:
        """Apply queued acks and rejects now (waits for the fetching thread to leave kombu)."""
        with self.lock:
            self._apply()

    def close(self) -> None:
        """Apply queued acks, then close the connection: kombu returns unacked deliveries to
        their queues. Idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._apply()
            self.drop()


class KombuSubscription(_Fetcher, Subscription):
    """Broadcasts of one fanout exchange, through a queue of its own, filtered by topic pattern.

    Owned by one thread; ``close`` deletes the queue and its binding.
    """

    def __init__(self, broker: KombuBroker, exchange: str, pattern: str) -> None:
        super().__init__(broker, 0, True)
        self.exchange = exchange
        self.pattern = pattern
        self.queue_name = f"{exchange}.celeriac-{uuid.uuid4().hex[:12]}"
        with self.lock:
            try:
                self.open()
            except Exception as exc:
                raise broker.error(exc, f"subscribing to {exchange!r}") from exc

    def queues(self) -> list[tuple[str, KombuQueue]]:
        """The subscription's own queue bound to the fanout exchange."""
        exchange = KombuExchange(self.exchange, "fanout", durable=False)
        return [(self.queue_name, KombuQueue(self.queue_name, exchange, self.pattern, durable=False,
                                              auto_delete=True))]

    def fetch(self, timeout: float) -> list[Message]:
        """The broadcasts received so far whose routing key matches, waiting up to ``timeout``."""
        self.wait(1000, timeout)
        out: list[Message] = []
        while self.buffer:
            _queue, message = self.buffer.popleft()
            key = str((message.delivery_info or {}).get("routing_key") or "")
            if not topic_matches(self.pattern, key):
                continue
            properties = {k: v for k, v in (message.properties or {}).items()
                          if k not in TRANSPORT_PROPERTIES}
            body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
            out.append(Message(dict(message.headers or {}), properties, body,
                               message.content_type or "application/octet-stream",
                               message.content_encoding or "binary"))
        return out

    def close(self) -> None:
        """Stop receiving and delete the subscription's queue. Idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self.connection is not None:
                with contextlib.suppress(Exception):
                    channel = self.connection.default_channel
                    bound = self.queues()[0][1].bind(channel)
                    bound.purge()
                    bound.delete()
            self.drop()
