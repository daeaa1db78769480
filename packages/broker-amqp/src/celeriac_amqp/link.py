"""One pika connection with its channels, the declaration cache, and connection errors.

A :class:`Link` is used by one thread at a time (pika is not thread-safe): the broker keeps one
per publishing thread and each consumer owns one in its I/O thread. Declarations are cached per
link (a new connection declares again). A declaration that RabbitMQ refuses with
``PRECONDITION_FAILED`` because the entity exists with other settings is logged and the
existing entity is used as it is, so a mismatch never stops a worker or a client.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as pex
from celeriac.broker.base import BrokerConnectionError
from celeriac.routing import Queue
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from celeriac_amqp import delay, fastwrite
from celeriac_amqp.confirms import ConfirmWindow, Unconfirmed
from celeriac_amqp.url import AMQPAddress, connection_parameters, tls_failure

__all__ = [
    "TRANSIENT_ERRORS",
    "FatalConnectionError",
    "Link",
    "RetryPolicy",
    "describe",
    "exchange_kind",
    "open_connection",
    "queue_arguments",
]

logger = logging.getLogger("celeriac.amqp")

#: Errors after which reconnecting may help.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    pex.AMQPConnectionError,
    pex.ConnectionClosed,
    pex.StreamLostError,
    pex.ChannelWrongStateError,
    pex.ConnectionWrongStateError,
    pex.ChannelClosed,
    # pika's connection workflow (e.g. a handshake that times out on a partitioned network)
    AMQPConnectorException,
    OSError,
    EOFError,
)

PRECONDITION_FAILED = 406
NOT_FOUND = 404
RESOURCE_LOCKED = 405


class FatalConnectionError(BrokerConnectionError):
    """The broker refused us for a reason retrying cannot fix (credentials, vhost).

    ``transient`` is False so callers that retry connection errors can tell it apart.
    """

    transient = False


def describe(exc: BaseException) -> str:
    """A one-line, human reason for a pika or socket error."""
    if isinstance(exc, pex.ChannelClosedByBroker | pex.ConnectionClosedByBroker):
        return f"({exc.reply_code}) {exc.reply_text}"
    if isinstance(exc, BrokerConnectionError):
        text = str(exc)
        return text.split(": ", 1)[1] if text.startswith("Cannot connect to ") else text
    seen = 0
    current: Any = exc
    while seen < 5 and current is not None:
        seen += 1
        if isinstance(current, OSError) and (current.strerror or current.args):
            return str(current)
        inner = getattr(current, "exception", None)
        if isinstance(inner, BaseException):
            current = inner
            continue
        args = getattr(current, "args", ())
        if args and isinstance(args[0], BaseException):
            current = args[0]
            continue
        break
    text = str(current) or type(current).__name__
    return text.replace("\n", " ")


def open_connection(addresses: list[AMQPAddress], conf: Mapping[str, Any],
                    safe_url: str) -> pika.BlockingConnection:
    """Connect to the first reachable address.

    Raises :class:`FatalConnectionError` for refused credentials or an unknown/forbidden vhost
    and ``BrokerConnectionError`` (transient) when no address could be reached.
    """
    last: BaseException | None = None
    for address in addresses:
        try:
            return pika.BlockingConnection(connection_parameters(address, conf))
        except (pex.ProbableAuthenticationError, pex.AuthenticationError) as exc:
            raise FatalConnectionError(
                f"Cannot connect to {safe_url}: RabbitMQ refused the login of user "
                f"{address.user!r} (wrong user name or password?): {_inner_text(exc)}"
            ) from None
        except pex.ProbableAccessDeniedError as exc:
            raise FatalConnectionError(
                f"Cannot connect to {safe_url}: no access to virtual host {address.vhost!r} "
                f"for user {address.user!r} (does it exist?): {_inner_text(exc)}"
            ) from None
        except (pex.AMQPError, AMQPConnectorException, OSError) as exc:
            refused = tls_failure(exc)
            if refused is not None:  # retrying cannot fix a refused certificate
                raise FatalConnectionError(f"Cannot connect to {safe_url}: {refused}") from None
            last = exc
    reason = describe(last) if last is not None else "no address to connect to"
    raise BrokerConnectionError(f"Cannot connect to {safe_url}: {reason}")


def _inner_text(exc: BaseException) -> str:
    """``ACCESS_REFUSED - Login was refused ... (403)`` from pika's nested error text."""
    text = str(exc.args[0]) if exc.args else str(exc)
    found = re.search(r"\((\d+)\) ['\"]?(.*?)['\"]?$", text)
    if found is None:
        return text
    reason = found.group(2).split(". For details", 1)[0].rstrip(".")
    return f"{reason} ({found.group(1)})"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Reconnection backoff: waits start at ``interval_start`` and double up to ``interval_max``.

    ``max_retries`` None retries forever.
    """

    max_retries: int | None = 100
    interval_start: float = 0.2
    interval_max: float = 2.0

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> RetryPolicy:
        """Read ``broker_connection_max_retries`` (0/None = forever) and the transport options
        ``interval_start`` and ``interval_max``."""
        opts = conf.get("broker_transport_options") or {}
        retries = conf.get("broker_connection_max_retries", 100)
        if conf.get("broker_connection_retry") is False:
            retries = 1
        return cls(
            max_retries=int(retries) if retries else None,
            interval_start=float(opts.get("interval_start", 0.2)),
            interval_max=float(opts.get("interval_max", 2.0)),
        )

    def intervals(self) -> Iterator[float]:
        """Successive waits before each retry."""
        wait = self.interval_start
        while True:
            yield wait
            wait = min(self.interval_max, max(wait * 2, 0.05))


def queue_arguments(queue: Queue, conf: Mapping[str, Any]) -> dict[str, Any]:
    """The ``x-`` arguments RabbitMQ gets for ``queue``, as kombu computes them.

    ``message_ttl`` and ``expires`` (seconds) become ``x-message-ttl``/``x-expires`` (ms),
    ``max_priority`` (or ``task_queue_max_priority``) ``x-max-priority``; then the queue's own
    ``queue_arguments``. ``task_default_queue_type='quorum'`` makes the default queue a quorum
    queue and ``task_create_missing_queue_type='quorum'`` the other durable queues.
    """
    args: dict[str, Any] = {}
    if queue.message_ttl is not None:
        args["x-message-ttl"] = int(queue.message_ttl * 1000)
    if queue.expires is not None:
        args["x-expires"] = int(queue.expires * 1000)
    max_priority = queue.max_priority
    if max_priority is None and queue.durable:
        max_priority = conf.get("task_queue_max_priority")
    if max_priority is not None:
        args["x-max-priority"] = int(max_priority)
    args.update(queue.queue_arguments or {})
    if "x-queue-type" not in args and queue.durable and not queue.exclusive and not queue.auto_delete:
        if queue.name == (conf.get("task_default_queue") or "celery"):
            kind = conf.get("task_default_queue_type")
        else:
            kind = conf.get("task_create_missing_queue_type")
        if kind == "quorum":
            args["x-queue-type"] = "quorum"
            args.pop("x-max-priority", None)
    return args


def exchange_kind(name: str, conf: Mapping[str, Any]) -> tuple[str, bool]:
    """Type and durability Celery uses for a broadcast exchange ``name``.

    ``<control_exchange>.pidbox`` is fanout and transient, ``reply.<ns>.pidbox`` direct and
    transient, ``celeryev`` (``event_exchange``) topic and durable; anything else topic, durable.
    """
    if name.startswith("reply.") and name.endswith(".pidbox"):
        return "direct", False
    if name.endswith(".pidbox"):
        return "fanout", False
    return "topic", True


def _describe_item(item: Unconfirmed) -> str:
    headers = item.properties.headers or {}
    task_id = headers.get("id") or item.properties.correlation_id
    return f"{headers.get('task')}[{task_id}]" if headers.get("task") else str(task_id or "(no id)")


class Link:
    """A connection, a (confirming) channel for publishing and declarations, a plain channel
    for fire-and-forget broadcasts, and this connection's declaration cache. Not thread-safe.

    With ``confirm``, publishing keeps up to ``window`` messages unconfirmed
    (:class:`~celeriac_amqp.confirms.ConfirmWindow`); ``window=1`` waits for every confirm."""

    def __init__(self, connection: pika.BlockingConnection, conf: Mapping[str, Any],
                 confirm: bool, window: int = 1) -> None:
        self.connection = connection
        self.conf = conf
        self.confirm = confirm
        self.window = window
        self.confirms: ConfirmWindow | None = None
        #: Messages published on a channel that was lost before confirming them, to publish
        #: again (:meth:`republish`).
        self.orphans: list[Unconfirmed] = []
        self.channel: BlockingChannel = self._new_channel(confirm)
        self._plain: BlockingChannel | None = None
        self.declared: dict[str, Queue] = {}
        self.exchanges: dict[str, tuple[str, bool, bool]] = {}
        self.delay_ready = False
        self.delay_targets: set[str] = set()
        self.last_used = time.monotonic()

    # -- channels -----------------------------------------------------------------------------

    def _new_channel(self, confirm: bool) -> BlockingChannel:
        channel = self.connection.channel()
        if confirm:
            self.confirms = ConfirmWindow(self.connection, channel, self.window)
        return channel

    def reopen_channel(self) -> None:
        """Replace the main channel (after RabbitMQ closed it); the messages published on the
        old one and never confirmed become :attr:`orphans`."""
        self.orphans += self.take_unconfirmed()
        with contextlib.suppress(Exception):
            if self.channel.is_open:
                self.channel.close()
        self.channel = self._new_channel(self.confirm)

    def republish(self, max_attempts: int = 3) -> None:
        """Publish the :attr:`orphans` again (windowed); one published ``max_attempts`` times
        already is given up with an error naming it. Raises pika's errors (the ones not yet
        republished stay orphans)."""
        while self.orphans:
            item = self.orphans[0]
            if item.attempts >= max_attempts:
                self.orphans.pop(0)
                logger.error("Giving up message %s to exchange %r (routing key %r): its channel "
                             "was lost %d times before RabbitMQ confirmed it.", _describe_item(item),
                             item.exchange, item.routing_key, item.attempts)
                continue
            item.attempts += 1
            self.publish(item)
            self.orphans.pop(0)

    def publish(self, item: Unconfirmed, *, wait: bool = False) -> None:
        """Publish on the main channel: with confirms, return once fewer than ``window``
        messages are unconfirmed (``wait``: once all are confirmed). Raises pika's errors."""
        if self.confirms is None:
            fastwrite.basic_publish(self.channel, item.exchange, item.routing_key, item.body,
                                    item.properties)
        else:
            self.confirms.publish(item, wait=wait)
        self.last_used = time.monotonic()

    def wait_for_confirms(self, timeout: float = 30.0) -> list[Unconfirmed]:
        """Wait until every message published on this link is confirmed; return (and forget)
        the ones RabbitMQ refused (``basic.nack``). Raises pika's errors."""
        if self.confirms is None:
            return []
        self.confirms.wait(0, timeout)
        refused, self.confirms.nacked = self.confirms.nacked, []
        return refused

    def take_unconfirmed(self) -> list[Unconfirmed]:
        """Forget and return the messages published and not confirmed yet (the link is being
        dropped; the confirms of the ones the socket still holds are read first)."""
        if self.confirms is None:
            return []
        with contextlib.suppress(Exception):
            if self.connection.is_open and self.confirms.pending:
                self.connection.process_data_events(0)
        refused, self.confirms.nacked = self.confirms.nacked, []
        return refused + self.confirms.take_unconfirmed()

    def plain_channel(self) -> BlockingChannel:
        """A channel without publisher confirms, for broadcasts."""
        if not self.confirm:
            return self.channel
        if self._plain is None or not self._plain.is_open:
            self._plain = self._new_channel(False)
        return self._plain

    @property
    def is_open(self) -> bool:
        """True while the connection is usable."""
        return bool(self.connection.is_open and self.channel.is_open)

    def check_alive(self, heartbeat: float) -> None:
        """After a long idle period, read pending frames so a connection RabbitMQ dropped is
        noticed before we write to it (raises a pika error when it is gone)."""
        now = time.monotonic()
        if heartbeat and now - self.last_used > heartbeat / 2:
            self.connection.process_data_events(0)
        self.last_used = now

    def abort(self, error: Exception) -> None:
        """Drop the connection at once, without the closing handshake a dead peer would never
        answer (what pika's own heartbeat checker does). Idempotent."""
        with contextlib.suppress(Exception):
            if self.connection.is_open:
                self.connection._impl._terminate_stream(error)

    def close(self) -> None:
        """Close the connection quietly. Idempotent."""
        with contextlib.suppress(Exception):
            if self.connection.is_open:
                self.connection.close()

    # -- declarations -------------------------------------------------------------------------

    def _fallback(self, exc: pex.ChannelClosedByBroker, what: str) -> None:
        if exc.reply_code != PRECONDITION_FAILED:
            raise exc
        logger.warning("%s already exists with different settings (%s); using it as it is.",
                       what, exc.reply_text)
        self.reopen_channel()

    def declare_exchange(self, name: str, kind: str, durable: bool = True,
                         auto_delete: bool = False) -> None:
        """Declare exchange ``name`` (cached); a mismatch with an existing one is tolerated."""
        if not name or self.exchanges.get(name) == (kind, durable, auto_delete):
            return
        try:
            self.channel.exchange_declare(name, kind, durable=durable, auto_delete=auto_delete)
        except pex.ChannelClosedByBroker as exc:
            self._fallback(exc, f"Exchange {name!r}")
            self.channel.exchange_declare(name, passive=True)
        self.exchanges[name] = (kind, durable, auto_delete)

    def declare_queue(self, queue: Queue) -> str:
        """Declare ``queue``, its exchange and binding (cached); returns the queue's name."""
        known = self.declared.get(queue.name)
        if known is queue or known == queue:
            return queue.name
        exchange = queue.exchange
        if exchange is not None and exchange.name:
            self.declare_exchange(exchange.name, exchange.type, exchange.durable, exchange.auto_delete)
        args = queue_arguments(queue, self.conf)
        try:
            self.channel.queue_declare(queue.name, durable=queue.durable, exclusive=queue.exclusive,
                                       auto_delete=queue.auto_delete, arguments=args or None)
        except pex.ChannelClosedByBroker as exc:
            self._fallback(exc, f"Queue {queue.name!r}")
            self.channel.queue_declare(queue.name, passive=True)
        if exchange is not None and exchange.name:
            self.channel.queue_bind(queue.name, exchange.name, routing_key=queue.binding_key)
        self.declared[queue.name] = queue
        return queue.name

    def ensure_delay_topology(self) -> None:
        """Declare the delayed-delivery exchanges and queues once per connection."""
        if not self.delay_ready:
            delay.declare_topology(self.channel)
            self.delay_ready = True

    def bind_delay_target(self, target: str) -> bool:
        """Bind queue ``target`` to the delay exit exchange; False when it does not exist."""
        if target in self.delay_targets:
            return True
        try:
            delay.bind_target(self.channel, target)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != NOT_FOUND:
                raise
            self.reopen_channel()
            return False
        self.delay_targets.add(target)
        return True
