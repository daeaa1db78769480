"""Consumers and broadcast subscriptions: one connection each, driven by whoever waits on it.

pika connections are not thread-safe, so each consumer owns one connection that one thread at a
time drives (reads frames, runs callbacks, writes acks) while holding the consumer's drive lock.
The thread waiting in :meth:`AMQPConsumer.fetch` drives it itself, so a delivery reaches the
thread that uses it without a hand-off between threads (a round trip's latency). The consumer's
own I/O thread drives it whenever no fetcher has for :data:`TAKEOVER_AFTER` seconds (the
fetcher runs a task, waits for pool capacity, or a client does not wait for results), so
heartbeats are answered and acks applied however long the fetching thread is away; it buffers
deliveries for the next :meth:`~AMQPConsumer.fetch`, and it alone connects and reconnects.

Acks and rejects are queued from any thread (the driver is woken through
``add_callback_threadsafe``) and applied batched with ``multiple=True`` when they form a
contiguous run. When the connection drops the I/O thread reconnects with backoff and consumes
again; deliveries of the lost connection are dropped locally (RabbitMQ redelivers them) and acks
for them are ignored.
"""

from __future__ import annotations

import contextlib
import logging
import queue as queue_mod
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions as pex
from celeriac.broker.base import BrokerConnectionError, Consumer, Delivery, Subscription
from celeriac.protocol import Message
from celeriac.routing import Queue

from celeriac_amqp import delay, fastwrite
from celeriac_amqp.link import (
    TRANSIENT_ERRORS,
    FatalConnectionError,
    Link,
    describe,
    exchange_kind,
)

if TYPE_CHECKING:
    from celeriac_amqp.broker import AMQPBroker

__all__ = ["AMQPConsumer", "AMQPSubscription", "to_message"]

logger = logging.getLogger("celeriac.amqp")

_PROPERTY_NAMES = ("correlation_id", "reply_to", "delivery_mode", "priority", "expiration",
                   "message_id", "timestamp", "type", "app_id", "user_id")


def to_message(properties: pika.BasicProperties, body: bytes) -> tuple[Message, str | None]:
    """Turn a received AMQP message into a :class:`Message`; also return the delay target
    when the message came through the delayed-delivery path (its routing headers removed)."""
    headers = dict(properties.headers or {})
    target = None
    if delay.TARGET_HEADER in headers or delay.LEGACY_TARGET_HEADER in headers:
        target = headers.get(delay.TARGET_HEADER, headers.get(delay.LEGACY_TARGET_HEADER))
        for name in delay.ROUTING_HEADERS:
            headers.pop(name, None)
    props: dict[str, Any] = {}
    for name in _PROPERTY_NAMES:
        value = getattr(properties, name, None)
        if value is not None:
            props[name] = value
    message = Message(headers, props, body or b"",
                      properties.content_type or "application/data",
                      properties.content_encoding or "binary")
    return message, target if isinstance(target, str) else None


def _channel_close_reason(link: Link) -> str:
    reason = getattr(link.channel, "_closing_reason", None)
    text = f"RabbitMQ closed the channel: {describe(reason)}" if reason else "channel closed"
    if "acknowledgement" in text and "timed out" in text:
        text += (" (a task ran longer than RabbitMQ's consumer_timeout without being acked; "
                 "raise consumer_timeout above your longest acks_late task)")
    return text


class _ChannelLost(Exception):
    """RabbitMQ closed our channel; the connection is rebuilt."""


Setup = Callable[[Link], list[str]]

#: How long an ack may wait in the consumer before the driving thread applies it, seconds.
ACK_DELAY = 0.005

#: How long a fetching thread may leave the connection undriven before the I/O thread drives
#: it again, seconds (it checks this often, so the gap is at most twice this).
TAKEOVER_AFTER = 0.02

_EXPECTED: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, _ChannelLost, BrokerConnectionError)


class AMQPConsumer(Consumer):
    """Consumes queues of an :class:`AMQPBroker`, driven by the fetching thread or its I/O thread.

    ``setup(link)`` declares what to consume and returns the queue names; it runs again after
    every reconnection. ``fetch`` is meant for one thread; ``ack``, ``reject``, ``flush`` and
    ``close`` are thread-safe.
    """

    def __init__(self, broker: AMQPBroker, setup: Setup, prefetch: int, no_ack: bool,
                 name: str = "consumer", redeclare: Callable[[Link, str], str] | None = None) -> None:
        self.broker = broker
        self.prefetch = max(0, int(prefetch))
        self.no_ack = no_ack
        self._setup = setup
        self._redeclare = redeclare
        # The I/O thread hands deliveries over in batches (one per read of the socket), not
        # one queue operation and thread wake-up per message; None is the wake-up sentinel.
        self._out: queue_mod.SimpleQueue[list[Delivery] | None] = queue_mod.SimpleQueue()
        self._batch: list[Delivery] = []
        self._leftover: deque[Delivery] = deque()
        self._ops: deque[tuple[int, int, str, bool]] = deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._gen = 0
        self._link: Link | None = None
        self._outstanding: dict[int, None] = {}
        self._tag_queue: dict[str, str] = {}
        self._cancelled: list[str] = []
        self._closing = threading.Event()
        self._started = threading.Event()
        self._closed = False
        # Whoever runs pika holds _drive. _fetchers counts fetching threads driving or about to;
        # _driven_at is when one last stopped; _fault is an error a fetcher hit while driving,
        # for the I/O thread to handle (it reconnects). _park is the I/O thread's wait.
        self._drive = threading.Lock()
        self._park = threading.Condition(threading.Lock())
        self._fetchers = 0
        self._driven_at = 0.0
        self._driver = 0  # thread ident of the last fetcher that drove
        self._handoff = False  # that fetcher stops fetching for a while: the I/O thread drives
        self._fault: BaseException | None = None
        self._failures = 0
        self._lost_at = 0.0
        self._intervals = broker.retry_policy.intervals()
        self._rx_bytes, self._rx_at = -1, time.monotonic()
        self._active_at = 0.0  # last delivery or applied ack (monotonic)
        self._waiting_long = False
        self.error: BaseException | None = None
        self.queues: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"celeriac-amqp-{name}", daemon=True)
        self._thread.start()
        wait = float(broker.conf.get("broker_connection_timeout") or 4.0) * 2 + 1
        self._started.wait(wait)
        if isinstance(self.error, FatalConnectionError):
            self.close()
            raise self.error

    # -- worker-facing API --------------------------------------------------------------------

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Return up to ``max_count`` deliveries, waiting up to ``timeout`` s for the first.

        The calling thread drives the connection while it waits (one thread at a time: others
        wait for the deliveries it buffers). Deliveries of a connection that was lost meanwhile
        are skipped (they are redelivered). Raises ``BrokerConnectionError`` once reconnecting
        has been given up.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        if max_count <= 0:
            self._closing.wait(max(0.0, timeout))
            return []
        out: list[Delivery] = []
        self._take_buffered(out, max_count)
        while len(out) < max_count:
            left = deadline - time.monotonic()
            if out or self._closed:
                break
            if self._link is not None and self._fault is None:
                self._drive_turn(out, max_count, left)
                if out or left <= 0:
                    break
                continue
            # (Re)connecting: the I/O thread hands deliveries over once it has a connection.
            try:
                batch = self._out.get(timeout=min(left, 0.05)) if left > 0 else self._out.get_nowait()
            except queue_mod.Empty:
                if left <= 0:
                    break
                continue
            if batch is None:  # wake-up sentinel (closing or fatal error)
                if self.error is not None:
                    raise BrokerConnectionError(str(self.error))
                continue
            self._keep(batch, out, max_count)
        if not out and self.error is not None and not self._closed:
            raise BrokerConnectionError(str(self.error))
        return out

    def _keep(self, batch: list[Delivery], out: list[Delivery], max_count: int) -> None:
        gen = self._gen
        for item in batch:
            if item.tag[0] != gen:
                continue
            if len(out) < max_count:
                out.append(item)
            else:
                self._leftover.append(item)

    def _take_buffered(self, out: list[Delivery], max_count: int) -> None:
        """Move what is already buffered (left over, handed over by the I/O thread) to ``out``."""
        leftover = self._leftover
        while leftover and len(out) < max_count:
            item = leftover.popleft()
            if item.tag[0] == self._gen:
                out.append(item)
        while len(out) < max_count:
            try:
                batch = self._out.get_nowait()
            except queue_mod.Empty:
                return
            if batch is None:
                if self.error is not None and not out:
                    raise BrokerConnectionError(str(self.error))
                continue
            self._keep(batch, out, max_count)

    def _drive_turn(self, out: list[Delivery], max_count: int, left: float) -> None:
        """Drive the connection from the fetching thread for one turn of at most ``left`` s."""
        with self._park:
            self._fetchers += 1
            self._handoff = False
        self._driver = threading.get_ident()
        try:
            if not self._drive.acquire(blocking=False):
                self._interrupt()  # the I/O thread drives: end its turn, it then parks
                if not self._drive.acquire(timeout=max(left, 0.001)):
                    return
            try:
                self._take_buffered(out, max_count)  # what the I/O thread buffered comes first
                link = self._link
                if out or link is None or self._fault is not None or self._closed:
                    return
                try:
                    self._turn(link, left)
                except Exception as exc:  # noqa: BLE001 - the I/O thread handles it
                    self._fault = exc
                    with self._park:
                        self._park.notify()
                batch, self._batch = self._batch, []
                self._keep(batch, out, max_count)
            finally:
                self._driven_at = time.monotonic()
                self._drive.release()
        finally:
            with self._park:
                self._fetchers -= 1

    def _interrupt(self) -> None:
        link = self._link
        if link is not None:
            with contextlib.suppress(Exception):
                link.connection.add_callback_threadsafe(_nothing)

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery`` (applied by the I/O thread). Thread-safe; a delivery of a
        lost connection is ignored."""
        if not self.no_ack:
            gen, tag = delivery.tag
            self._ops.append((gen, tag, "ack", False))
            # While messages flow the I/O loop turns every ACK_DELAY seconds and applies queued
            # acks itself; wake it only when it waits long (idle), when the prefetch window is
            # used up or when acks pile up, sparing a wake-up per message.
            if (self._waiting_long or not self.prefetch or len(self._ops) >= self.prefetch // 2 + 1
                    or len(self._outstanding) >= self.prefetch):
                self._wake()

    def reject(self, delivery: Delivery, requeue: bool = False) -> None:
        """Reject ``delivery``; with ``requeue`` RabbitMQ delivers it again. Thread-safe."""
        if not self.no_ack:
            gen, tag = delivery.tag
            self._ops.append((gen, tag, "reject", requeue))
            self._wake()

    def on_idle(self) -> None:
        """The worker runs nothing any more: apply queued acks now rather than with the next
        delivery (they would delay it). Thread-safe: when no thread drives the connection,
        the calling thread applies them itself (sparing the driver a wake-up), else it wakes
        the driver."""
        if not self._ops:
            return
        if self._link is None or self._fault is not None or not self._drive.acquire(blocking=False):
            self._wake()
            return
        try:
            self._apply_ops()
        except Exception as exc:  # noqa: BLE001 - the I/O thread handles it (reconnects)
            self._fault = exc
            with self._park:
                self._park.notify()
        finally:
            self._drive.release()

    def flush(self) -> None:
        """Have queued acks applied now. Called by the fetching thread (before it waits for
        something else than deliveries: pool capacity), it also leaves the connection to the
        I/O thread at once instead of after TAKEOVER_AFTER."""
        self._wake()
        if threading.get_ident() == self._driver:
            with self._park:
                self._handoff = True
                self._park.notify()

    def close(self) -> None:
        """Apply queued acks, stop consuming and close the connection; unacked deliveries go
        back to their queues. Idempotent, thread-safe."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake(force=True)
        with self._park:
            self._park.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
        self._out.put(None)
        self.broker._forget_consumer(self)

    # -- driving (fetcher or I/O thread) ---------------------------------------------------------

    def _turn(self, link: Link, limit: float) -> None:
        """Process frames for up to ``limit`` s (less while messages flow, so queued acks go out
        without a wake-up; ack() wakes a long wait), then apply queued acks. The caller holds
        the drive lock; pika and channel errors propagate."""
        self._waiting_long = True
        flowing = bool(self._ops) or (bool(self._outstanding) and not self.no_ack
                                      and time.monotonic() - self._active_at < 1.0)
        if flowing:
            self._waiting_long = False
            limit = min(limit, ACK_DELAY)
        link.connection.process_data_events(time_limit=max(0.0, limit))
        self._waiting_long = False
        self._check_peer(link)
        if not link.channel.is_open:
            raise _ChannelLost(_channel_close_reason(link))
        self._apply_ops()
        if self._cancelled:
            self._recover_cancelled(link)

    # -- I/O thread ---------------------------------------------------------------------------

    def _wake(self, force: bool = False) -> None:
        with self._wake_lock:
            if self._wake_pending and not force:
                return
            self._wake_pending = True
        link = self._link
        if link is None:
            return
        try:
            link.connection.add_callback_threadsafe(self._apply_ops)
        except Exception:  # noqa: BLE001 - connection gone: the ops are stale anyway
            with self._wake_lock:
                self._wake_pending = False

    def _connect(self) -> Link:
        link = self.broker._open_link(confirm=False)
        try:
            names = self._setup(link)
            channel = link.channel
            if self.prefetch and not self.no_ack:
                channel.basic_qos(prefetch_count=self.prefetch, global_qos=self._global_qos(link))
            channel.add_on_cancel_callback(self._on_cancel)
            self._gen += 1
            self._outstanding.clear()
            self._tag_queue.clear()
            for name in names:
                self._consume(link, name)
            self.queues = names
        except BaseException:
            link.close()
            raise
        return link

    def _global_qos(self, link: Link) -> bool:
        # Celery's choice: one prefetch window for the whole channel (RabbitMQ's global
        # flag), except with quorum queues, which only support per-consumer limits.
        quorum = any((q.queue_arguments or {}).get("x-queue-type") == "quorum"
                     or link.conf.get("task_default_queue_type") == "quorum"
                     for q in link.declared.values())
        return not quorum

    def _consume(self, link: Link, name: str) -> None:
        tag = link.channel.basic_consume(name, self._on_message, auto_ack=self.no_ack)
        self._tag_queue[tag] = name

    def _on_message(self, _channel: Any, method: Any, properties: pika.BasicProperties,
                    body: bytes) -> None:
        queue = self._tag_queue.get(method.consumer_tag, "")
        message, target = to_message(properties, body)
        exchange, routing_key = method.exchange, method.routing_key
        if target is not None:
            exchange, routing_key = "", target
        tag = method.delivery_tag
        if not self.no_ack:
            self._outstanding[tag] = None
            self._active_at = time.monotonic()
        self._batch.append(Delivery(message, queue, (self._gen, tag), exchange, routing_key,
                                    bool(method.redelivered)))

    def _hand_over(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._out.put(batch)
            # Let the woken fetcher take the GIL now rather than when this thread next blocks
            # (after its ack and timer work): less latency per delivery.
            time.sleep(0)

    def _on_cancel(self, method_frame: Any) -> None:
        tag = method_frame.method.consumer_tag
        name = self._tag_queue.pop(tag, None)
        if name is not None:
            logger.warning("RabbitMQ cancelled the consumer of queue %r (was it deleted?); "
                           "declaring it again and resuming.", name)
            self._cancelled.append(name)

    def _recover_cancelled(self, link: Link) -> None:
        while self._cancelled:
            name = self._cancelled.pop()
            link.declared.pop(name, None)
            if self._redeclare is not None:
                name = self._redeclare(link, name)
                self._consume(link, name)
            else:
                raise _ChannelLost(f"consumer of {name!r} cancelled")

    def _apply_ops(self) -> None:
        with self._wake_lock:
            self._wake_pending = False
        link = self._link
        if link is None:
            self._ops.clear()
            return
        acks: set[int] = set()
        rejects: list[tuple[int, bool]] = []
        if self._ops:
            self._active_at = time.monotonic()
        while self._ops:
            gen, tag, op, requeue = self._ops.popleft()
            if gen != self._gen or tag not in self._outstanding:
                continue  # a delivery of a lost connection, or acked twice: ignore
            if op == "ack":
                acks.add(tag)
            else:
                rejects.append((tag, requeue))
        if not acks and not rejects:
            return
        channel = link.channel
        with fastwrite.corked(link.connection):  # one write for all, flushed below
            if acks:
                last = None
                run = 0
                for tag in self._outstanding:
                    if tag not in acks:
                        break
                    last = tag
                    run += 1
                if last is not None and run > 1:
                    fastwrite.basic_ack(channel, last, multiple=True)
                    for tag in list(self._outstanding)[:run]:
                        del self._outstanding[tag]
                        acks.discard(tag)
                for tag in sorted(acks):
                    fastwrite.basic_ack(channel, tag)
                    del self._outstanding[tag]
            for tag, requeue in rejects:
                if tag in self._outstanding:
                    fastwrite.basic_reject(channel, tag, requeue)
                    del self._outstanding[tag]
        channel._flush_output()  # raises as basic_ack did when the broker closed the channel

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        self._gen += 1  # everything delivered so far is stale now
        self._batch = []
        self._outstanding.clear()
        self._cancelled.clear()
        with self._wake_lock:
            self._wake_pending = False
        if link is not None:
            link.close()

    def _check_peer(self, link: Link) -> None:
        """Raise when RabbitMQ sent nothing (not even a heartbeat, which it sends every half
        interval) for 1.5 heartbeat intervals: a half-open connection. pika's own checker
        would take up to two whole intervals more."""
        heartbeat = self.broker.heartbeat
        if not heartbeat:
            return
        received = link.connection._impl.bytes_received
        now = time.monotonic()
        if received != self._rx_bytes:
            self._rx_bytes, self._rx_at = received, now
        elif now - self._rx_at > heartbeat * 1.5:
            error = pex.StreamLostError(
                f"no data from RabbitMQ for {now - self._rx_at:.1f} s (heartbeat {heartbeat:g} s): "
                "the connection is half-open")
            link.abort(error)
            raise error

    def _wait_for_turn(self) -> None:
        """Park the I/O thread while a fetcher drives (or did within TAKEOVER_AFTER s); return
        at once when there is no connection, a fetcher's fault to handle, or closing."""
        with self._park:
            while not self._closing.is_set() and self._link is not None and self._fault is None:
                if not self._fetchers and (self._handoff or
                                           time.monotonic() - self._driven_at >= TAKEOVER_AFTER):
                    return
                self._park.wait(TAKEOVER_AFTER)

    def _io_turn(self) -> float | None:
        """One turn of the I/O thread: (re)connect when needed, drive, hand deliveries over.
        Returns how long to wait before reconnecting after a failure, -1.0 to stop, or None."""
        try:
            fault, self._fault = self._fault, None
            if fault is not None:
                raise fault
            if self._link is None:
                self._link = self._connect()
                self._rx_bytes, self._rx_at = -1, time.monotonic()
                if self._failures:
                    logger.warning("Reconnected to %s after %.1f s (%d attempt(s)); consuming "
                                   "%s again.", self.broker.safe_url, time.monotonic() - self._lost_at,
                                   self._failures, ", ".join(self.queues))
                self._failures = 0
                self._intervals = self.broker.retry_policy.intervals()
                self._started.set()
            try:
                self._turn(self._link, 1.0)
            finally:
                self._hand_over()
            return None
        except FatalConnectionError as exc:
            self.error = exc
            logger.error("%s", exc)
            return -1.0
        except Exception as exc:  # any failure: reconnect, never die
            if self._closing.is_set():
                return -1.0
            if not isinstance(exc, _EXPECTED):
                logger.exception("Unexpected error in the AMQP consumer of %s; reconnecting.",
                                 self.broker.safe_url)
            self._drop_link()
            self._failures += 1
            failures = self._failures
            max_retries = self.broker.retry_policy.max_retries
            if max_retries is not None and failures > max_retries:
                self.error = BrokerConnectionError(
                    f"Gave up reconnecting to {self.broker.safe_url} after "
                    f"{failures - 1} retries: {describe(exc)}")
                logger.error("%s", self.error)
                return -1.0
            wait = next(self._intervals)
            # One line when the outage starts and one when it ends (above); the
            # attempts in between only at debug level.
            log = logger.warning if failures == 1 else logger.debug
            if failures == 1:
                self._lost_at = time.monotonic()
            if isinstance(exc, _ChannelLost):
                log("%s (%s); reopening in %.1f s.", exc, self.broker.safe_url, wait)
            elif failures == 1:
                log("Connection to %s lost (%s); reconnecting (retrying every %.1f s and "
                    "more, quietly).", self.broker.safe_url, describe(exc), wait)
            else:
                log("Reconnecting to %s failed (%s, attempt %d); next in %.1f s.",
                    self.broker.safe_url, describe(exc), failures, wait)
            return wait

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                self._wait_for_turn()
                if self._closing.is_set():
                    break
                with self._drive:
                    wait = self._io_turn()
                if wait is None:
                    continue
                if wait < 0:
                    break
                self._started.set()
                self._closing.wait(wait)
        except BaseException as exc:
            self.error = exc
            logger.exception("AMQP consumer thread failed")
        finally:
            self._started.set()
            held = self._drive.acquire(timeout=5.0)
            try:
                if self._link is not None:
                    with contextlib.suppress(Exception):
                        self._apply_ops()
                self._drop_link()
            finally:
                if held:
                    self._drive.release()
            self._out.put(None)


def _nothing() -> None:
    """A callback that only ends the current ``process_data_events`` wait."""


def task_setup(broker: AMQPBroker, queues: Sequence[Queue]) -> tuple[Setup, Callable[[Link, str], str]]:
    """Setup callables for consuming declared task or reply queues."""
    by_name = {q.name: q for q in queues}

    def setup(link: Link) -> list[str]:
        return [link.declare_queue(q) for q in by_name.values()]

    def redeclare(link: Link, name: str) -> str:
        return link.declare_queue(by_name[name])

    return setup, redeclare


class AMQPSubscription(Subscription):
    """Receives broadcasts of one exchange through an exclusive, auto-deleted queue."""

    def __init__(self, broker: AMQPBroker, exchange: str, pattern: str) -> None:
        kind, durable = exchange_kind(exchange, broker.conf)
        key = pattern if kind != "fanout" else ""

        def setup(link: Link) -> list[str]:
            link.declare_exchange(exchange, kind, durable)
            result = link.channel.queue_declare("", exclusive=True, auto_delete=True)
            name = result.method.queue
            link.channel.queue_bind(name, exchange, routing_key=key)
            return [name]

        self.exchange = exchange
        self._consumer = AMQPConsumer(broker, setup, 0, True, name=f"sub-{exchange}")

    def fetch(self, timeout: float) -> list[Message]:
        """Return the broadcasts received so far, waiting up to ``timeout`` s for the first."""
        return [d.message for d in self._consumer.fetch(10_000, timeout)]

    def close(self) -> None:
        """Stop receiving (the queue is deleted by RabbitMQ). Idempotent."""
        self._consumer.close()


