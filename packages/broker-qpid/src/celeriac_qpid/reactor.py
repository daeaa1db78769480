"""The proton Container that owns one AMQP 1.0 connection, in its own thread.

Every proton object is touched by the reactor thread only. Other threads hand it work through
:meth:`Reactor.submit` (a queue plus one :class:`proton.reactor.EventInjector` wake-up when the
reactor is idle), so a publish from a task thread, an ack from a pool thread and a consumer
closing from the worker's thread all end up as calls on the reactor thread. During a burst of
publishes the reactor polls the publish queue every ``POLL_INTERVAL`` instead of being woken
per message.

Publishing: :meth:`Reactor.publish` queues an encoded message for the sender link of its
target and returns; it blocks only while ``confirm_window`` messages are still unsettled by the
broker (publisher confirmation with a window rather than one round trip per message), and the
first time it uses a target, until the broker attached the link (so a refused address is an
error in the caller). :meth:`Reactor.flush_thread` waits until the broker settled what the
calling thread published, :meth:`Reactor.flush` until it settled everything. Unsettled
messages are kept, and sent again after a reconnection (at least once).

Deliveries (a message received, a settlement of one sent: one event per message) are handled
by :class:`_FastCollector` on proton's C objects, without proton's Python event layer.

Connection loss: the reactor reconnects with backoff (``interval_start`` doubling up to
``interval_max``; ``broker_connection_max_retries``), then asks each registered
:class:`Attachment` (consumers, subscriptions) to attach its links again. A refused login is
permanent: reconnection stops and the error has ``transient = False``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from celeriac.exceptions import BrokerConnectionError

# proton's C binding (cffi, python-qpid-proton >= 0.39): the per-message paths call it directly
# instead of building proton's Python wrappers (an Event, a Delivery, a Link ... per message).
from cproton import (
    PN_ACCEPTED,
    PN_DELIVERY,
    PN_MODIFIED,
    PN_REJECTED,
    PN_RELEASED,
    pn_collector_peek,
    pn_collector_pop,
    pn_delivery,
    pn_delivery_aborted,
    pn_delivery_link,
    pn_delivery_partial,
    pn_delivery_pending,
    pn_delivery_readable,
    pn_delivery_remote_state,
    pn_delivery_settle,
    pn_delivery_settled,
    pn_delivery_tag,
    pn_event_delivery,
    pn_event_type,
    pn_link_advance,
    pn_link_credit,
    pn_link_is_sender,
    pn_link_recv,
    pn_link_send,
)
from proton import (
    Collector,
    Condition,
    Data,
    Delivery,
    Endpoint,
    Event,
    Handler,
    Link,
    SSLDomain,
    Terminus,
    symbol,
)
from proton.reactor import (
    ApplicationEvent,
    AtMostOnce,
    Container,
    EventInjector,
    LinkOption,
)

from celeriac_qpid.address import Dialect, Target
from celeriac_qpid.address import Endpoint as BrokerEndpoint

__all__ = ["Attachment", "FatalConnectionError", "Options", "Reactor", "TerminusOption", "describe"]

logger = logging.getLogger("celeriac.qpid")

_WAKE = ApplicationEvent("celeriac_wake")
_AUTH_CONDITIONS = {"amqp:unauthorized-access"}


class FatalConnectionError(BrokerConnectionError):
    """The broker refused us for a reason retrying cannot fix (credentials, virtual host)."""

    transient = False


def describe(condition: Condition | None) -> str:
    """One line for an AMQP error condition."""
    if condition is None:
        return "connection closed"
    text = condition.description or ""
    return f"{condition.name}: {text}".strip().rstrip(":") if text else str(condition.name)


@dataclass(frozen=True, slots=True)
class Options:
    """Connection settings read from the app's configuration."""

    confirm: bool = True
    confirm_window: int = 1000
    publish_timeout: float = 30.0
    connect_timeout: float = 8.0
    attach_timeout: float = 5.0
    heartbeat: float = 60.0
    max_retries: int | None = 100
    interval_start: float = 0.2
    interval_max: float = 2.0
    ssl: Any = None

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> Options:
        """Read ``broker_transport_options`` (``confirm_publish``, ``confirm_window``,
        ``publish_retry_timeout``, ``attach_timeout``, ``interval_start``, ``interval_max``),
        ``broker_connection_timeout``, ``broker_heartbeat``, ``broker_connection_max_retries``,
        ``broker_connection_retry`` and ``broker_use_ssl``."""
        opts = conf.get("broker_transport_options") or {}
        retries = conf.get("broker_connection_max_retries", 100)
        if conf.get("broker_connection_retry") is False:
            retries = 1
        timeout = conf.get("broker_connection_timeout")
        heartbeat = conf.get("broker_heartbeat")
        return cls(
            confirm=bool(opts.get("confirm_publish", True)),
            confirm_window=max(1, int(opts.get("confirm_window", 1000))),
            publish_timeout=float(opts.get("publish_retry_timeout", 30.0)),
            connect_timeout=2 * float(4.0 if timeout is None else timeout),
            attach_timeout=float(opts.get("attach_timeout", 5.0)),
            heartbeat=60.0 if heartbeat is None else float(heartbeat),
            max_retries=int(retries) if retries else None,
            interval_start=float(opts.get("interval_start", 0.2)),
            interval_max=float(opts.get("interval_max", 2.0)),
            ssl=conf.get("broker_use_ssl"),
        )

    def intervals(self) -> Iterator[float]:
        """Successive waits before each reconnection attempt."""
        wait = self.interval_start
        while True:
            yield wait
            wait = min(self.interval_max, max(wait * 2, 0.05))


class Attachment(Protocol):
    """Something holding links on the connection (a consumer, a subscription).

    Both methods run on the reactor thread.
    """

    def attach(self, reactor: Reactor) -> None:
        """Open sessions and links on ``reactor.connection`` (called after every (re)connect)."""

    def detached(self) -> None:
        """The connection was lost: forget every link and unsettled delivery."""


@dataclass(slots=True)
class _Out:
    """One message on its way to the broker; ``done`` once the broker settled it (or it was
    given up, ``error`` saying why), set on the reactor thread."""

    target: Target
    data: bytes
    seq: int
    tries: int = 0
    done: bool = False
    error: str | None = None


#: How often a message is sent again after the broker detached a sender link that used to work.
MAX_LINK_RETRIES = 3


@dataclass(slots=True)
class _Sender:
    target: Target
    link: Any
    since: float
    pending: deque[_Out] = field(default_factory=deque)
    attached: bool = False
    error: str | None = None
    waiters: list[threading.Event] = field(default_factory=list)


class TerminusOption(LinkOption):  # type: ignore[misc]
    """Sets the durability and capabilities of a link's source (receivers) or target (senders).

    RabbitMQ declares the queue of a ``/queue/NAME`` address durable when the terminus is.
    """

    def __init__(self, durable: bool, capabilities: tuple[str, ...] = (), source: bool = False) -> None:
        self.durable = durable
        self.capabilities = capabilities
        self.source = source

    def apply(self, link: Link) -> None:
        """Apply to ``link`` before it is opened."""
        terminus = link.source if self.source else link.target
        if self.durable:
            terminus.durability = Terminus.DELIVERIES
        if self.capabilities:
            data = terminus.capabilities
            data.put_array(False, Data.SYMBOL)
            data.enter()
            for cap in self.capabilities:
                data.put_symbol(symbol(cap))
            data.exit()


class _Timer:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def on_timer_task(self, _event: Any) -> None:
        """Proton timer callback: run the function."""
        self.fn()


class _FastCollector(Collector):  # type: ignore[misc]
    """The container's event collector with a short way for delivery events (one per message
    sent or received): :attr:`fast` handles them on the raw C objects and they are never
    wrapped into Python ``Event``, ``Delivery``, ``Link``, ``Session`` and ``Connection``
    objects nor dispatched through the handler chain, which is most of proton's cost per
    message. Every other event (and a delivery :attr:`fast` declines) goes the usual way."""

    fast: Callable[[Any], bool] | None = None

    def peek(self) -> Any:
        """The next event to dispatch, after handling the delivery events before it."""
        impl = self._impl
        fast = self.fast
        while True:
            event = pn_collector_peek(impl)
            if not event:
                return None
            if fast is not None and pn_event_type(event) == PN_DELIVERY:
                try:
                    handled = fast(pn_event_delivery(event))
                except Exception:
                    logger.exception("Error handling an AMQP 1.0 delivery")
                    handled = True
                if handled:
                    pn_collector_pop(impl)
                    continue
            return Event.wrap(event)


#: During a burst of publishes, the reactor looks at the publish queue this often (seconds)
#: instead of being woken (a pipe write, a thread switch and a GIL hand-over) for every message.
POLL_INTERVAL = 0.005


class Reactor(Handler):  # type: ignore[misc]
    """One connection and its proton Container thread. Public methods are thread-safe unless
    they say they run on the reactor thread."""

    def __init__(self, endpoints: list[BrokerEndpoint], dialect: Dialect, options: Options,
                 safe_url: str, name: str = "broker") -> None:
        self.endpoints = endpoints
        self.dialect = dialect
        self.options = options
        self.safe_url = safe_url
        self.container = Container(self)
        self.container.container_id = f"celeriac-{uuid.uuid4().hex[:12]}"
        self._injector = EventInjector()
        self.container.selectable(self._injector)
        collector = getattr(self.container, "_collector", None)
        if type(collector) is Collector:  # a proton whose container we know: deliveries the short way
            collector.__class__ = _FastCollector
            collector.fast = self._fast_delivery  # type: ignore[attr-defined]
        #: receiver link (C pointer) -> its consumer, for the short way of deliveries
        self.fast_receivers: dict[Any, Any] = {}
        self._polling = False
        self._inbox: deque[Callable[[], None]] = deque()
        self._outbox: deque[_Out] = deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self.connection: Any = None
        self.generation = 0
        self.opened = threading.Event()
        #: set when the connection failed before it was ever open (``connect()`` gives up then)
        self.first_failed = threading.Event()
        self._ever_opened = False
        self.error: BrokerConnectionError | None = None
        self.last_reason = ""
        self._closing = False
        self._closed = threading.Event()
        self._attempt = 0
        self._failures = 0
        self._intervals = options.intervals()
        self._outage_logged = False
        self._names = itertools.count(1)
        self._attachments: list[Attachment] = []
        self.receivers: dict[str, Any] = {}
        self.session_owners: dict[Any, Any] = {}
        #: consumers holding deliveries of this iteration (handed over when the reactor quiesces)
        self.dirty: list[Any] = []
        # publishing state: reactor thread only, except the counters under _cond
        self._senders: dict[Target, _Sender] = {}
        self._pub_session: Any = None
        self._unsettled: dict[int, _Out] = {}
        self._by_tag: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._cond = threading.Condition()
        self._count_lock = threading.Lock()
        self._local = threading.local()
        self._published = 0  # tracked (unsettled) publishes so far; under _count_lock
        self._done = 0  # of those, settled by the broker or given up; reactor thread only
        self._waiting = 0
        self._attached_targets: set[Target] = set()
        self._refused: dict[Target, str] = {}
        self._worked: set[Target] = set()
        self._pending_waiters: list[tuple[Target, threading.Event]] = []
        self._connect_started = time.monotonic()
        self._finished = False
        self.thread = threading.Thread(target=self._run, name=f"celeriac-qpid-{name}", daemon=True)
        self.thread.start()

    # -- thread plumbing ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.container.run()
        except Exception:  # pragma: no cover - proton bug or a handler bug
            logger.exception("The AMQP 1.0 reactor of %s stopped", self.safe_url)
            self.error = BrokerConnectionError(f"The AMQP 1.0 connection thread of {self.safe_url} died.")
        finally:
            self._closed.set()
            self.opened.set()
            with self._cond:
                self._cond.notify_all()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the reactor thread soon. Thread-safe; never blocks."""
        self._inbox.append(fn)
        self._wake()

    def _wake(self) -> None:
        """Make sure the reactor thread looks at the inbox and the publish queue soon: at once
        when it is idle; not at all when it is awake or polling (it sent something less than
        ``POLL_INTERVAL`` ago and looks again then)."""
        if self._wake_pending:
            return
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(OSError):
            self._injector.trigger(_WAKE)

    @property
    def _inflight(self) -> int:
        """Messages published and not yet settled by the broker (nor given up). Read without
        a lock: ``_done`` first, so that a concurrent update can only make it larger."""
        done = self._done
        return self._published - done

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the reactor thread and return its result (re-raising its error)."""
        if threading.current_thread() is self.thread:
            return fn()
        done = threading.Event()
        box: list[Any] = [None, None]

        def run() -> None:
            try:
                box[0] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                box[1] = exc
            finally:
                done.set()

        self.submit(run)
        if not done.wait(timeout) and not self._closed.is_set():
            raise BrokerConnectionError(f"The AMQP 1.0 connection to {self.safe_url} did not answer "
                                        f"within {timeout:.0f} s.")
        if box[1] is not None:
            raise box[1]
        return box[0]

    def on_celeriac_wake(self, _event: Any) -> None:
        """Reactor thread: run the work other threads submitted, send what they published."""
        if self._polling:
            return  # the poll timer runs the work
        self._run_work()

    def _run_work(self) -> None:
        # Cleared before the queues are read: whatever is queued after this wakes us again.
        self._wake_pending = False
        inbox = self._inbox
        while inbox:
            fn = inbox.popleft()
            try:
                fn()
            except Exception:
                logger.exception("Error on the AMQP 1.0 connection thread of %s", self.safe_url)
        try:
            sent = self._drain_outbox() if self._outbox else 0
        except Exception:
            logger.exception("Error on the AMQP 1.0 connection thread of %s", self.safe_url)
            sent = 0
        if sent > 1:
            # a burst (more than one message queued since the wake-up was asked for): look again
            # in a moment instead of being woken for every message; a lone message (a round
            # trip) is never held back
            self._wake_pending = True
            self._polling = True
            self.schedule(POLL_INTERVAL, self._poll)

    def _poll(self) -> None:
        self._polling = False
        self._run_work()

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        """Reactor thread: run ``fn`` after ``delay`` seconds."""
        self.container.schedule(delay, _Timer(fn))  # type: ignore[arg-type]

    # -- connecting ---------------------------------------------------------------------------

    def on_start(self, _event: Any) -> None:
        """Reactor thread: the container started; connect."""
        self._connect()
        self.schedule(0.5, self._housekeeping)

    def _connect(self) -> None:
        if self._closing:
            return
        endpoint = self.endpoints[self._attempt % len(self.endpoints)]
        self._attempt += 1
        kwargs: dict[str, Any] = {"reconnect": False, "heartbeat": self.options.heartbeat or None,
                                  "sasl_enabled": True, "allow_insecure_mechs": True}
        if endpoint.user is not None:
            kwargs["user"] = endpoint.user
            kwargs["password"] = endpoint.password or ""
            kwargs["allowed_mechs"] = "PLAIN"
        else:
            kwargs["allowed_mechs"] = "ANONYMOUS"
        vhost = self.dialect.virtual_host(endpoint)
        if vhost:
            kwargs["virtual_host"] = vhost
        if endpoint.tls:
            kwargs["ssl_domain"] = self._ssl_domain()
            kwargs["sni"] = endpoint.host
        self.last_reason = ""
        self.connection = self.container.connect(url=endpoint.url, **kwargs)
        self._connect_started = time.monotonic()
        self._pub_session = None

    def _ssl_domain(self) -> SSLDomain:
        domain = SSLDomain(SSLDomain.MODE_CLIENT)
        opts = self.options.ssl if isinstance(self.options.ssl, Mapping) else {}
        if opts.get("ca_certs"):
            domain.set_trusted_ca_db(str(opts["ca_certs"]))
        if opts.get("certfile"):
            domain.set_credentials(str(opts["certfile"]), str(opts.get("keyfile") or opts["certfile"]), None)
        import ssl

        if opts.get("cert_reqs") == ssl.CERT_NONE:
            domain.set_peer_authentication(SSLDomain.ANONYMOUS_PEER)
        else:
            domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME, opts.get("ca_certs"))
        return domain

    def on_connection_opened(self, event: Any) -> None:
        """Reactor thread: the broker opened the connection; attach consumers, resend unsettled publishes."""
        if event.connection != self.connection:
            return
        if self._failures:
            logger.info("Reconnected to %s.", self.safe_url)
        self._failures = 0
        self._ever_opened = True
        self._outage_logged = False
        self._intervals = self.options.intervals()
        self.error = None
        for attachment in list(self._attachments):
            try:
                attachment.attach(self)
            except Exception:
                logger.exception("Could not attach a consumer to %s", self.safe_url)
        for out in self._unsettled.values():  # sent again: at least once
            self._sender(out.target).pending.append(out)
        waiters, self._pending_waiters = self._pending_waiters, []
        for target, waiter in waiters:
            self._sender(target).waiters.append(waiter)
        for sender in list(self._senders.values()):
            self._pump(sender)
        self.opened.set()

    def on_transport_error(self, event: Any) -> None:
        """Reactor thread: remember the socket or SASL error (a refused login is permanent)."""
        condition = event.transport.condition
        if condition is None:
            return
        self.last_reason = describe(condition)
        text = f"{condition.name} {condition.description or ''}".lower()
        if condition.name in _AUTH_CONDITIONS or "authentication" in text or "sasl" in condition.name:
            user = next((e.user for e in self.endpoints if e.user), None)
            self.error = FatalConnectionError(
                f"Cannot connect to {self.safe_url}: the broker refused the login of user {user!r} "
                f"(wrong user name or password?): {self.last_reason}")

    def on_connection_error(self, event: Any) -> None:
        """Reactor thread: the broker closed the connection with an error."""
        condition = event.connection.remote_condition
        self.last_reason = describe(condition)
        if condition is not None and (condition.name == "amqp:unauthorized-access" or (
                condition.name == "amqp:not-found" and "vhost" in (condition.description or "").lower())):
            self.error = FatalConnectionError(
                f"Cannot connect to {self.safe_url}: {self.last_reason} (does the virtual host "
                "exist and may this user use it?)")
        event.connection.close()

    def on_session_error(self, event: Any) -> None:
        """Reactor thread: the broker ended a session with an error (a refused link)."""
        session = event.session
        reason = describe(session.remote_condition)
        session.close()
        owner = self.session_owners.pop(session, None)
        if owner is not None:
            owner.session_failed(session, reason)
            return
        if self._pub_session is None or session != self._pub_session:
            logger.warning("The broker closed a session on %s: %s", self.safe_url, reason)
            return
        # RabbitMQ ends the whole session when it refuses one link (a queue declared with
        # other settings): fail that address, send everything else again on a new session.
        self._pub_session = None
        senders = list(self._senders.values())
        self._senders.clear()
        self._attached_targets.clear()
        self._by_tag.clear()
        for sender in senders:
            if not sender.attached:
                sender.error = f"the broker refused address {sender.target.address!r}: {reason}"
                self._fail_sender(sender)
        if self.connection is not None and self.opened.is_set():
            for out in self._unsettled.values():
                self._sender(out.target).pending.append(out)

    def on_disconnected(self, event: Any) -> None:
        """Reactor thread: the socket is gone; reconnect with backoff."""
        if event.connection != self.connection:
            return
        transport = event.transport
        if not self.last_reason and transport is not None and transport.condition is not None:
            self.last_reason = describe(transport.condition)
        self._lost(self.last_reason or "connection lost")

    def _lost(self, reason: str) -> None:
        was_open = self.opened.is_set()
        old = self.connection
        self.connection = None
        self._pub_session = None
        self.generation += 1
        self.opened.clear()
        senders, self._senders = self._senders, {}
        self.receivers.clear()
        self.session_owners.clear()
        self._attached_targets.clear()
        self._by_tag.clear()
        for sender in senders.values():
            for waiter in sender.waiters:
                waiter.set()
        for attachment in list(self._attachments):
            with contextlib.suppress(Exception):
                attachment.detached()
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
                if old.transport:
                    old.transport.close_tail()
                    old.transport.close_head()
        if self._closing:
            self._finish_close()
            return
        self._failures += 1
        limit = self.options.max_retries
        if self.error is not None and not self.error.transient:
            logger.error("%s", self.error)
            self._give_up()
            return
        if limit is not None and self._failures > limit:
            self.error = BrokerConnectionError(
                f"Cannot connect to {self.safe_url}: {reason} (gave up after {self._failures - 1} "
                "retries; is the broker running and speaking AMQP 1.0 on that port?)")
            logger.error("%s", self.error)
            self._give_up()
            return
        self.error = BrokerConnectionError(
            f"Cannot connect to {self.safe_url}: {reason} (is the broker running and speaking "
            "AMQP 1.0 on that port?)")
        if not self._ever_opened and self._failures >= len(self.endpoints):
            self.first_failed.set()
        wait = next(self._intervals)
        if not self._outage_logged and (was_open or self._failures > 1):
            logger.warning("Connection to %s lost (%s); reconnecting in %.1f s.", self.safe_url, reason, wait)
            self._outage_logged = True
        with self._cond:
            self._cond.notify_all()
        self.schedule(wait, self._connect)

    def _give_up(self) -> None:
        self.opened.set()
        with self._cond:
            self._cond.notify_all()
        self._closing = True
        self._finish_close()

    def _housekeeping(self) -> None:
        if self._closed.is_set() or (self._closing and self.connection is None):
            return
        now = time.monotonic()
        conn = self.connection
        if conn is not None and not self.opened.is_set() and now - self._connect_started > self.options.connect_timeout:
            self.last_reason = self.last_reason or "timed out"
            conn.close()
            if conn.transport:
                conn.transport.close_tail()
                conn.transport.close_head()
        for sender in list(self._senders.values()):
            if not sender.attached and sender.error is None and now - sender.since > self.options.attach_timeout:
                # RabbitMQ 3.x leaves a refused attach unanswered (and the session unusable):
                # fail the publishes waiting for it and start over on a new connection.
                sender.error = (f"the broker did not attach address {sender.target.address!r} within "
                                f"{self.options.attach_timeout:.0f} s (does the exchange or queue exist? A "
                                "priority queue must be created beforehand, with x-max-priority)")
                self._fail_sender(sender)
                if conn is not None:
                    self.last_reason = "address attach timed out"
                    conn.close()
                break
        self.schedule(0.5, self._housekeeping)

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, target: Target, data: bytes, what: str) -> None:
        """Queue ``data`` for ``target``; return once it fits the confirmation window.

        Blocks up to ``publish_retry_timeout`` while the connection is down and the window is
        full. Raises ``BrokerConnectionError`` when the broker refuses the address or cannot be
        reached in time. Thread-safe.
        """
        if self._closing:
            raise BrokerConnectionError(f"The broker {self.safe_url} was closed.")
        out = _Out(target, data, next(self._seq))
        if not target.presettled:
            if self._inflight >= self.options.confirm_window:
                self._wait_window(what)
            with self._count_lock:
                self._published += 1
            mine = self._mine()
            while mine and mine[0].done and mine[0].error is None:  # confirmed: forget
                mine.popleft()
            mine.append(out)
        if target in self._attached_targets:
            self._outbox.append(out)  # sent by the reactor in batches (see _run_work)
            if not self._wake_pending:
                self._wake()
            return
        self._wait_attached(target, out, what, time.monotonic() + self.options.publish_timeout)

    def _wait_window(self, what: str) -> None:
        """Wait until fewer than ``confirm_window`` messages are unsettled."""
        deadline = time.monotonic() + self.options.publish_timeout
        with self._cond:
            self._waiting += 1
            try:
                while self._inflight >= self.options.confirm_window:
                    self._check_usable(what)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BrokerConnectionError(
                            f"Cannot {what} ({self.safe_url}): {self.options.confirm_window} messages "
                            f"still unconfirmed after {self.options.publish_timeout:.0f} s "
                            f"({self.last_reason or 'broker not answering'}).")
                    self._cond.wait(min(left, 1.0))
            finally:
                self._waiting -= 1

    def publish_attach(self, target: Target, what: str) -> None:
        """Attach a sender to ``target`` (RabbitMQ creates the queue) and wait until the broker
        answered. Raises ``BrokerConnectionError`` when it refuses. Thread-safe."""
        if target in self._attached_targets:
            return
        self._wait_attached(target, None, what, time.monotonic() + self.options.publish_timeout)

    def _wait_attached(self, target: Target, out: _Out | None, what: str, deadline: float) -> None:
        attached = threading.Event()
        self.submit(lambda: self._enqueue(out, attached, target))
        while not attached.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                break
            self._check_usable(what)
        error = self._refused.get(target)
        if error is not None or not attached.is_set():
            reason = error or self.last_reason or "timed out"
            raise BrokerConnectionError(f"Cannot {what} ({self.safe_url}): {reason}")

    def _drain_outbox(self) -> int:
        """Reactor thread: hand the published messages to their senders; return how many."""
        outbox = self._outbox
        touched: dict[Target, _Sender] = {}
        connected = self.connection is not None and self.opened.is_set()
        count = 0
        while outbox:
            out = outbox.popleft()
            count += 1
            if not out.target.presettled:
                self._unsettled[out.seq] = out
            if connected:
                sender = self._sender(out.target)
                sender.pending.append(out)
                touched[out.target] = sender
        for sender in touched.values():
            self._pump(sender)
        return count

    def _check_usable(self, what: str) -> None:
        if self.error is not None and (not self.error.transient or self._closing):
            raise self.error
        if self._closed.is_set():
            raise BrokerConnectionError(f"Cannot {what}: the broker {self.safe_url} was closed.")

    def _enqueue(self, out: _Out | None, attached: threading.Event | None = None,
                 target: Target | None = None) -> None:
        if out is not None:
            target = out.target
            if not target.presettled:
                self._unsettled[out.seq] = out
        assert target is not None
        if self.connection is None or not self.opened.is_set():
            if attached is not None:  # wait for the reconnection; sent by on_connection_opened
                self._pending_waiters.append((target, attached))
            return
        sender = self._sender(target)
        if out is not None:
            sender.pending.append(out)
        if attached is not None:
            if sender.attached or sender.error:
                attached.set()
            else:
                sender.waiters.append(attached)
        self._pump(sender)

    def _sender(self, target: Target) -> _Sender:
        sender = self._senders.get(target)
        if sender is None:
            if self._pub_session is None:
                self._pub_session = self.connection.session()
                self._pub_session.open()
            options: list[LinkOption] = [TerminusOption(target.durable, target.capabilities)]
            if target.presettled or not self.options.confirm:
                options.append(AtMostOnce())
            link = self.container.create_sender(self._pub_session, target.address,
                                                name=self.new_link_name("out"), options=options)
            sender = _Sender(target, link, time.monotonic())
            self._senders[target] = sender
        return sender

    def new_link_name(self, kind: str) -> str:
        """Reactor thread: a link name unique in this process."""
        return f"{self.container.container_id}-{kind}-{next(self._names)}"

    # -- raw proton events (a lean handler: proton's MessagingHandler costs several Python
    #    dispatches per event, which is most of the reactor thread's time at high rates) -------

    def on_reactor_init(self, event: Any) -> None:
        """Proton event: the container starts."""
        self.on_start(event)

    def on_connection_remote_open(self, event: Any) -> None:
        """Proton event: the broker's Open arrived."""
        self.on_connection_opened(event)

    def on_connection_remote_close(self, event: Any) -> None:
        """Proton event: the broker's Close arrived."""
        connection = event.connection
        if connection != self.connection:
            return
        if self._closing:
            self._finish_close()
        elif connection.remote_condition is not None:
            self.on_connection_error(event)
        else:
            self.last_reason = self.last_reason or "the broker closed the connection"
            connection.close()

    def on_session_remote_close(self, event: Any) -> None:
        """Proton event: the broker's End arrived."""
        session = event.session
        if session.remote_condition is not None and not session.state & Endpoint.LOCAL_CLOSED:
            self.on_session_error(event)
            return
        if not session.state & Endpoint.LOCAL_CLOSED:
            session.close()
        self.on_session_closed(event)

    def on_link_remote_open(self, event: Any) -> None:
        """Proton event: the broker's Attach arrived."""
        self.on_link_opened(event)

    def on_link_remote_close(self, event: Any) -> None:
        """Proton event: the broker's Detach arrived."""
        link = event.link
        if link.state & Endpoint.LOCAL_CLOSED:
            return
        if link.remote_condition is not None:
            self.on_link_error(event)
        else:
            self.on_link_closing(event)

    def on_transport_closed(self, event: Any) -> None:
        """Proton event: the transport (socket) closed."""
        self.on_disconnected(event)

    def on_link_flow(self, event: Any) -> None:
        """Proton event: credit changed; send what waits on a sender."""
        link = event.link
        if link.is_sender and link.credit:
            self.on_sendable(event)

    def _fast_delivery(self, delivery: Any) -> bool:
        """Reactor thread, for every delivery event (``delivery`` is the C pointer): a message
        arrived on a consumer's receiver, or the broker settled one we sent. Returns False for
        a delivery of a link nobody here knows (the wrapper path releases it)."""
        link = pn_delivery_link(delivery)
        if pn_link_is_sender(link):
            state = pn_delivery_remote_state(delivery)
            if state == PN_ACCEPTED:
                self._settled(delivery, "accepted")
            elif state == PN_REJECTED:
                self._settled(delivery, "rejected")
            elif state == PN_RELEASED or state == PN_MODIFIED:
                self._settled(delivery, "released")
            if pn_delivery_settled(delivery):
                pn_delivery_settle(delivery)
            return True
        owner = self.fast_receivers.get(link)
        if owner is None:
            return False
        if pn_delivery_aborted(delivery):
            pn_delivery_settle(delivery)
        elif pn_delivery_readable(delivery) and not pn_delivery_partial(delivery):
            size, data = pn_link_recv(link, pn_delivery_pending(delivery))
            pn_link_advance(link)
            owner.on_raw(delivery, link, bytes(data) if size > 0 else b"")
        return True

    def on_delivery(self, event: Any) -> None:
        """Proton event: a delivery the collector did not take the short way (a receiver link
        that is closing or unknown here, which is released; or every delivery, should this
        proton's container not have the collector :class:`_FastCollector` expects)."""
        delivery = event.delivery
        if self._fast_delivery(delivery._impl):
            return
        if delivery.readable and not delivery.partial:
            delivery.link.recv(delivery.pending)
            delivery.link.advance()
            if not delivery.settled:
                delivery.update(Delivery.RELEASED)
            delivery.settle()
        elif delivery.aborted:
            delivery.settle()

    def on_reactor_quiesced(self, _event: Any) -> None:
        """Proton event, once per loop iteration (before the container waits for I/O): send
        what was published meanwhile, wake publishers waiting for the window, hand received
        deliveries to the consumers."""
        if self._outbox:
            self._drain_outbox()
        if self._waiting:
            with self._cond:
                self._cond.notify_all()
        dirty, self.dirty = self.dirty, []
        for consumer in dirty:
            consumer.publish()

    def on_session_closed(self, event: Any) -> None:
        """Reactor thread: a session we ended is closed on both sides."""
        owner = self.session_owners.pop(event.session, None)
        if owner is not None:
            owner.session_closed(event.session)

    def on_link_opened(self, event: Any) -> None:
        """Reactor thread: the broker attached a link (a refused one has no terminus)."""
        link = event.link
        if not link.is_sender:
            owner = self.receivers.get(link.name)
            if owner is not None:
                owner.link_opened(link)
            return
        for sender in self._senders.values():
            if sender.link.name == link.name:
                if link.remote_target is None or (link.remote_target.address is None
                                                  and link.remote_target.type == Terminus.UNSPECIFIED):
                    return  # refused: a detach with an error follows
                sender.attached = True
                self._attached_targets.add(sender.target)
                self._worked.add(sender.target)
                self._refused.pop(sender.target, None)
                for waiter in sender.waiters:
                    waiter.set()
                sender.waiters.clear()
                self._pump(sender)
                return

    def on_link_error(self, event: Any) -> None:
        """Reactor thread: the broker detached a link with an error."""
        link = event.link
        reason = describe(link.remote_condition)
        if link.is_sender:
            for sender in list(self._senders.values()):
                if sender.link.name == link.name:
                    sender.error = f"the broker refused address {sender.target.address!r}: {reason}"
                    self._fail_sender(sender)
                    break
        link.close()
        self._notify_link_lost(link, reason)

    def on_link_closing(self, event: Any) -> None:
        """Reactor thread: the broker detached a link without an error."""
        link = event.link
        link.close()
        if link.is_sender:
            for sender in list(self._senders.values()):
                if sender.link.name == link.name:
                    sender.error = f"the broker detached address {sender.target.address!r}"
                    self._fail_sender(sender)
                    self._refused.pop(sender.target, None)
                    break
        self._notify_link_lost(link, "detached by the broker")

    def _notify_link_lost(self, link: Any, reason: str) -> None:
        owner = self.receivers.get(link.name)
        if owner is not None:
            owner.link_lost(link, reason)

    def _fail_sender(self, sender: _Sender) -> None:
        """Drop a failed sender. For a target that never worked (refused), its messages fail
        (logged) and waiting callers get the error; for one that did (the broker is shutting
        down, a queue was deleted), its messages are sent again on a new link, a few times."""
        self._senders.pop(sender.target, None)
        self._attached_targets.discard(sender.target)
        known = sender.target in self._worked
        if not known:
            self._refused[sender.target] = sender.error or "refused"
        outs = {out.seq: out for out in sender.pending}
        outs.update((seq, out) for seq, out in self._unsettled.items() if out.target == sender.target)
        sender.pending.clear()
        dropped = 0
        retry: list[_Out] = []
        for seq, out in sorted(outs.items()):
            if self._unsettled.get(seq) is not out:
                continue
            if known and out.tries < MAX_LINK_RETRIES:
                out.tries += 1
                retry.append(out)
            else:
                del self._unsettled[seq]
                out.done, out.error = True, sender.error or "not delivered"
                dropped += 1
        if dropped:
            self._release(dropped)
            logger.error("%d message(s) to %s were not delivered: %s", dropped, self.safe_url, sender.error)
        if retry:
            logger.warning("%s; sending %d message(s) again.", sender.error, len(retry))
            self.schedule(1.0, lambda: self._requeue(retry))
        for waiter in sender.waiters:
            waiter.set()
        sender.waiters.clear()
        with contextlib.suppress(Exception):
            sender.link.close()

    def _requeue(self, outs: list[_Out]) -> None:
        """Reactor thread: send ``outs`` again (unless a reconnection did already)."""
        if self.connection is None or not self.opened.is_set():
            return  # on_connection_opened sends every unsettled message
        touched: dict[Target, _Sender] = {}
        for out in outs:
            if self._unsettled.get(out.seq) is out:
                sender = self._sender(out.target)
                if out not in sender.pending:
                    sender.pending.append(out)
                touched[out.target] = sender
        for sender in touched.values():
            self._pump(sender)

    def on_sendable(self, event: Any) -> None:
        """Reactor thread: a sender has credit."""
        target = self._target_of(event.link)
        sender = self._senders.get(target) if target is not None else None
        if sender is not None:
            self._pump(sender)

    def _target_of(self, link: Any) -> Target | None:
        name = link.name
        for target, sender in self._senders.items():
            if sender.link.name == name:
                return target
        return None

    def _pump(self, sender: _Sender) -> None:
        link = sender.link
        if not sender.attached:
            return
        presettled = link.snd_settle_mode == Link.SND_SETTLED
        released = 0
        impl = link._impl
        pending = sender.pending
        unsettled = self._unsettled
        by_tag = self._by_tag
        while pending and pn_link_credit(impl) > 0:
            out = pending.popleft()
            if not presettled and out.seq not in unsettled:
                continue
            tag = str(out.seq)
            delivery = pn_delivery(impl, tag)
            pn_link_send(impl, out.data)
            pn_link_advance(impl)
            if presettled:
                pn_delivery_settle(delivery)
                if unsettled.pop(out.seq, None) is not None:
                    out.done = True
                    released += 1
            else:
                by_tag[tag] = out.seq
        if released:
            self._release(released)

    def _settled(self, delivery: Any, outcome: str) -> None:
        """Reactor thread: the broker settled the delivery (C pointer) of a message we sent."""
        seq = self._by_tag.pop(pn_delivery_tag(delivery), None)
        if seq is None:
            return
        out = self._unsettled.get(seq)
        if out is None:
            return
        if outcome == "released":  # the broker could not take it now: send it again
            sender = self._senders.get(out.target)
            if sender is not None:
                sender.pending.append(out)
                self.schedule(0.2, lambda: self._pump(sender))
            return
        del self._unsettled[seq]
        if outcome == "rejected":
            condition = getattr(Delivery.wrap(delivery).remote, "condition", None)
            out.error = f"the broker rejected a message for {out.target.address!r} ({describe(condition)})"
            logger.error("The broker rejected a message for %s (%s).", out.target.address, describe(condition))
        out.done = True
        self._done += 1  # waiting publishers are woken once per reactor iteration

    def _release(self, count: int) -> None:
        """Reactor thread: ``count`` tracked messages are settled or given up."""
        self._done += count

    def _mine(self) -> deque[_Out]:
        """The calling thread's tracked messages not known to be confirmed (see flush_thread)."""
        mine: deque[_Out] | None = getattr(self._local, "outs", None)
        if mine is None:
            mine = self._local.outs = deque()
        return mine

    def flush_thread(self, timeout: float) -> None:
        """Wait until the broker settled every message the calling thread published.

        Raises ``BrokerConnectionError`` when the broker rejected one of them, when one was
        given up (its address refused), when the connection was given up, or when some are
        still unconfirmed after ``timeout`` seconds. Thread-safe (each thread waits for its own).
        """
        mine = self._mine()
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    while mine and mine[0].done and mine[0].error is None:
                        mine.popleft()
                    pending = sum(1 for out in mine if not out.done)
                    if not pending:
                        break
                    self._check_usable("wait for confirmations")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BrokerConnectionError(
                            f"{pending} message(s) published to {self.safe_url} were not confirmed within "
                            f"{timeout:.0f} s ({self.last_reason or 'broker not answering'}).")
                    self._cond.wait(min(left, 0.5))
            finally:
                self._waiting -= 1
        errors = [out.error for out in mine if out.error]
        mine.clear()
        if errors:
            raise BrokerConnectionError(f"{len(errors)} message(s) were not taken by {self.safe_url}: {errors[0]}")

    def flush(self, timeout: float) -> bool:
        """Wait until the broker settled every message published so far (or ``timeout``).

        Returns True when nothing is left unsettled. Thread-safe.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed.is_set():
                    return False
                self._waiting += 1
                try:
                    self._cond.wait(min(left, 0.5))
                finally:
                    self._waiting -= 1
        return True

    # -- attachments --------------------------------------------------------------------------

    def add_attachment(self, attachment: Attachment) -> None:
        """Register ``attachment`` and attach it now if connected (thread-safe)."""

        def run() -> None:
            self._attachments.append(attachment)
            if self.connection is not None and self.opened.is_set():
                attachment.attach(self)

        self.submit(run)

    def remove_attachment(self, attachment: Attachment) -> None:
        """Reactor thread: stop re-attaching ``attachment`` after reconnections."""
        with contextlib.suppress(ValueError):
            self._attachments.remove(attachment)

    @property
    def is_connected(self) -> bool:
        """True while the connection is open."""
        return self.opened.is_set() and self.connection is not None

    def wait_open(self, timeout: float) -> None:
        """Wait until the connection is open, or every address failed once; raise the
        connection error then."""
        deadline = time.monotonic() + timeout
        while not self.opened.wait(0.05):
            if self.first_failed.is_set() or time.monotonic() >= deadline:
                break
        if self.opened.is_set() and self.connection is not None and self.error is None:
            return
        if self.error is not None:
            raise self.error
        raise BrokerConnectionError(
            f"Cannot connect to {self.safe_url}: {self.last_reason or 'timed out'} (is the broker "
            "running and speaking AMQP 1.0 on that port?)")

    # -- closing ------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) for unsettled publishes, then close the connection and stop
        the thread. Idempotent, thread-safe."""
        if self._closed.is_set():
            return
        # also through an outage: the reconnection sends them
        if self._inflight and not self.flush(max(timeout, self.options.publish_timeout)):
            logger.error("%d message(s) were not confirmed by %s before the connection closed; "
                         "they may be lost.", self._inflight, self.safe_url)

        def run() -> None:
            self._closing = True
            if self.connection is not None:
                self.connection.close()
                self.schedule(2.0, self._finish_close)
            else:
                self._finish_close()

        self.submit(run)
        if threading.current_thread() is not self.thread:
            self._closed.wait(5.0)

    def _finish_close(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._closing = True
        conn, self.connection = self.connection, None
        if conn is not None and conn.transport:
            with contextlib.suppress(Exception):
                conn.transport.close_tail()
                conn.transport.close_head()
        self._injector.close()
        self.container.stop()
