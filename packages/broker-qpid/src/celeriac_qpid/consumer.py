"""Consumers and broadcast subscriptions: receiver links on the broker's reactor.

A consumer has its own AMQP session with one receiver link per queue. Credit is the prefetch
window: each link starts with its share of ``prefetch`` and gets one credit back per settled
delivery, so no more than ``prefetch`` deliveries are ever unacknowledged (``prefetch=0``, and
``no_ack`` consumers, keep a large window topped up). ``ack`` settles with *accepted*,
``reject`` with *rejected* (RabbitMQ drops or dead-letters it) or, to requeue, *released*
(RabbitMQ puts it back in its queue; *modified* is not used: RabbitMQ 3.x leaves such a delivery
unacknowledged). Acks and rejects from any thread are queued and applied in batches on the
reactor thread.

Closing releases every unsettled delivery and ends the session, which also returns anything
still in flight; when the connection drops, RabbitMQ returns the unsettled deliveries itself.
After a reconnection the links are attached again; deliveries of the lost connection are
skipped by :meth:`QpidConsumer.fetch` and acks for them ignored. Deliveries reach ``fetch`` in
one batch per reactor iteration (all that one read from the socket carried).
"""

from __future__ import annotations

import itertools
import logging
import queue as queue_mod
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac.broker.base import BrokerConnectionError, Consumer, Delivery, Subscription
from celeriac.exceptions import DecodeError
from celeriac.protocol import Message
from cproton import (
    PN_ACCEPTED,
    PN_REJECTED,
    PN_RELEASED,
    pn_decref,
    pn_delivery_settle,
    pn_delivery_settled,
    pn_delivery_update,
    pn_incref,
    pn_link_credit,
    pn_link_flow,
)
from proton.reactor import AtMostOnce, LinkOption

from celeriac_qpid import codec
from celeriac_qpid.address import topic_matches
from celeriac_qpid.reactor import TerminusOption

if TYPE_CHECKING:
    from celeriac_qpid.reactor import Reactor

__all__ = ["QpidConsumer", "QpidSubscription", "Source"]

logger = logging.getLogger("celeriac.qpid")

#: Credit kept on a link when the consumer has no prefetch limit.
WIDE_WINDOW = 1000


@dataclass(frozen=True, slots=True)
class Source:
    """One node a consumer reads: the queue name reported in deliveries, the address, whether
    the node is durable, source capabilities, and a subject pattern the consumer still has to
    match (plain-dialect broadcasts)."""

    queue: str
    address: str
    durable: bool = False
    capabilities: tuple[str, ...] = ()
    pattern: str | None = None


class QpidConsumer(Consumer):
    """Receives from one or more nodes through its own session on the broker's connection.

    ``fetch`` is meant for one thread; ``ack``, ``reject``, ``flush`` and ``close`` are
    thread-safe. Raises ``BrokerConnectionError`` at creation when the broker refuses a source
    or is unreachable.
    """

    def __init__(self, reactor: Reactor, sources: list[Source], prefetch: int, no_ack: bool,
                 attach_timeout: float, *, probe: bool = False) -> None:
        self.reactor = reactor
        self.sources = sources
        self.prefetch = max(0, int(prefetch))
        self.no_ack = no_ack
        #: attach without credit: only to see that the sources exist (then close)
        self.probe = probe
        self._out: queue_mod.SimpleQueue[list[Delivery] | None] = queue_mod.SimpleQueue()
        self._held: deque[Delivery] = deque()
        self._batch: list[Delivery] = []
        self._ops: deque[tuple[int, int, Any]] = deque()
        self._ops_lock = threading.Lock()
        self._ops_pending = False
        self._gen = 0
        self._ids = itertools.count(1)
        self._unsettled: dict[int, tuple[Any, Any]] = {}
        self._links: dict[str, tuple[Source, Any]] = {}
        #: receiver link C pointer -> its source (the links of ``_links``, for the short way)
        self._by_impl: dict[Any, Source] = {}
        self._session: Any = None
        self._attached = threading.Event()
        self._session_done = threading.Event()
        self.error: str | None = None
        self._closed = False
        reactor.add_attachment(self)
        deadline = time.monotonic() + attach_timeout + reactor.options.connect_timeout
        while not self._attached.wait(0.1):
            if reactor.error is not None and not reactor.error.transient:
                self.close()
                raise reactor.error
            if self.error is not None or time.monotonic() > deadline:
                reason = self.error or (
                    f"the broker did not attach {', '.join(s.address for s in sources)!r} within "
                    f"{attach_timeout:.0f} s (does the queue exist? A priority queue must be created "
                    "beforehand, with x-max-priority)" if reactor.is_connected else
                    (reactor.last_reason or "not connected"))
                self.close()
                raise BrokerConnectionError(f"Cannot consume from {reactor.safe_url}: {reason}")
        if self.error is not None:
            reason = self.error
            self.close()
            raise BrokerConnectionError(f"Cannot consume from {reactor.safe_url}: {reason}")

    # -- worker-facing API --------------------------------------------------------------------

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Return up to ``max_count`` deliveries, waiting up to ``timeout`` s for the first.

        Raises ``BrokerConnectionError`` once the connection was given up.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        out: list[Delivery] = []
        if max_count <= 0:
            time.sleep(max(0.0, timeout))
            return out
        held = self._held
        while True:
            while held and len(out) < max_count:
                item = held.popleft()
                if self.no_ack or item.tag[0] == self._gen:
                    out.append(item)  # (deliveries of a lost connection are skipped: they come back)
            if len(out) >= max_count:
                break
            try:
                left = deadline - time.monotonic()
                batch = self._out.get_nowait() if out or left <= 0 else self._out.get(timeout=min(left, 0.5))
            except queue_mod.Empty:
                if out or time.monotonic() >= deadline or self._closed:
                    break
                self._raise_if_dead()
                continue
            if batch is None:
                if self._closed:
                    break
                continue
            held.extend(batch)
        if not out:
            self._raise_if_dead()
        return out

    def _raise_if_dead(self) -> None:
        error = self.reactor.error
        if error is not None and self.reactor._closed.is_set() and not self._closed:
            raise BrokerConnectionError(str(error))

    def ack(self, delivery: Delivery) -> None:
        """Settle ``delivery`` as accepted (applied on the reactor thread). Thread-safe."""
        if not self.no_ack:
            self._op(delivery, PN_ACCEPTED)

    def reject(self, delivery: Delivery, requeue: bool = False) -> None:
        """Settle ``delivery`` as released (``requeue``: back to its queue) or rejected
        (dropped or dead-lettered). Thread-safe."""
        if not self.no_ack:
            self._op(delivery, PN_RELEASED if requeue else PN_REJECTED)

    def _op(self, delivery: Delivery, outcome: Any) -> None:
        gen, ident = delivery.tag
        self._ops.append((gen, ident, outcome))
        with self._ops_lock:
            if self._ops_pending:
                return
            self._ops_pending = True
        self.reactor.submit(self._apply)

    def flush(self) -> None:
        """Acks and rejects are sent as soon as the reactor thread runs; nothing to do."""

    def close(self) -> None:
        """Release unsettled deliveries (they go back to their queues), end the session and
        stop consuming. Idempotent, thread-safe."""
        if self._closed:
            return
        self._closed = True
        try:
            self.reactor.call(self._shutdown, timeout=5.0)
            self._session_done.wait(3.0)
        except BrokerConnectionError:
            pass
        self._out.put(None)

    # -- reactor thread -----------------------------------------------------------------------

    def attach(self, reactor: Reactor) -> None:
        """Open the session and one receiver per source (after every (re)connect)."""
        if self._closed:
            return
        self._gen += 1
        self._drop_unsettled()
        session = reactor.connection.session()
        session.open()
        self._session = session
        reactor.session_owners[session] = self
        self._session_done.clear()
        share = max(1, self.prefetch // max(1, len(self.sources))) if self.prefetch else WIDE_WINDOW
        for source in self.sources:
            options: list[LinkOption] = [TerminusOption(source.durable, source.capabilities, source=True)]
            if self.no_ack:
                options.append(AtMostOnce())
            name = reactor.new_link_name("in")
            reactor.receivers[name] = self
            link = reactor.container.create_receiver(session, source.address, name=name, options=options)
            self._add_link(name, source, link)
            if not self.probe:
                link.flow(share)

    def link_opened(self, link: Any) -> None:
        """A receiver was attached by the broker."""
        if link.remote_source is not None and link.remote_source.address is None and not link.remote_source.dynamic:
            return  # refused: the detach with the reason follows
        if all(lk.state & lk.REMOTE_ACTIVE for _, lk in self._links.values()):
            self._attached.set()

    def link_lost(self, link: Any, reason: str) -> None:
        """The broker detached one of our receivers (queue deleted, address refused)."""
        entry = self._forget_link(link.name)
        if entry is None or self._closed:
            return
        if not self._attached.is_set():
            self.error = f"the broker refused {entry[0].address!r}: {reason}"
            return
        logger.warning("The broker detached the consumer of %r (%s); attaching again in 1 s.",
                       entry[0].queue, reason)
        self.reactor.schedule(1.0, lambda: self._reattach(entry[0]))

    def _reattach(self, source: Source) -> None:
        if self._closed or self._session is None or self.reactor.connection is None:
            return
        name = self.reactor.new_link_name("in")
        self.reactor.receivers[name] = self
        options: list[LinkOption] = [TerminusOption(source.durable, source.capabilities, source=True)]
        if self.no_ack:
            options.append(AtMostOnce())
        link = self.reactor.container.create_receiver(self._session, source.address, name=name, options=options)
        self._add_link(name, source, link)
        link.flow(max(1, self.prefetch) if self.prefetch else WIDE_WINDOW)

    def _add_link(self, name: str, source: Source, link: Any) -> None:
        self._links[name] = (source, link)
        self._by_impl[link._impl] = source
        self.reactor.fast_receivers[link._impl] = self

    def _forget_link(self, name: str) -> tuple[Source, Any] | None:
        entry = self._links.pop(name, None)
        self.reactor.receivers.pop(name, None)
        if entry is not None:
            self._by_impl.pop(entry[1]._impl, None)
            self.reactor.fast_receivers.pop(entry[1]._impl, None)
        return entry

    def _forget_links(self) -> None:
        for name in list(self._links):
            self._forget_link(name)

    def _drop_unsettled(self) -> None:
        """The deliveries held are stale (connection or session gone): forget them."""
        for delivery, _link in self._unsettled.values():
            pn_decref(delivery)
        self._unsettled.clear()

    def session_closed(self, session: Any) -> None:
        """The broker ended a session (ours after close)."""
        if self._session is not None and session == self._session:
            self._session_done.set()

    def session_failed(self, session: Any, reason: str) -> None:
        """The broker ended our session with an error (it refused one of our sources)."""
        if self._session is None or session != self._session:
            return
        self._forget_links()
        self._session = None
        self._session_done.set()
        self._gen += 1
        self._drop_unsettled()
        if not self._attached.is_set():
            self.error = f"the broker refused to attach: {reason}"
            return
        logger.warning("The broker ended the session of the consumer of %s (%s); attaching again in 1 s.",
                       ", ".join(s.queue for s in self.sources), reason)
        self.reactor.schedule(1.0, lambda: self.attach(self.reactor) if self.reactor.connection is not None
                              and not self._closed else None)

    def detached(self) -> None:
        """The connection is gone: every delivery so far is stale (the broker redelivers)."""
        self._gen += 1
        self._drop_unsettled()
        self._forget_links()
        self._session = None
        self._session_done.set()

    def on_raw(self, delivery: Any, link: Any, data: bytes) -> None:
        """One message arrived on one of our links (``delivery`` and ``link`` are proton's C
        pointers, ``data`` the encoded message)."""
        source = self._by_impl.get(link)
        if source is None:
            self._settle(delivery, PN_RELEASED)
            return
        raw: Any = None
        try:
            raw = codec.parse(data)
            message = codec.decode(raw)
        except DecodeError as exc:
            logger.error("Rejected message %s from %s: Celeriac cannot decode it: %s",
                         "<unreadable>" if raw is None else codec.message_id(raw), source.queue, exc)
            self._settle(delivery, PN_REJECTED)
            self._top_up(link, 1)
            return
        if source.pattern is not None and not topic_matches(source.pattern, str(raw.subject or "")):
            pn_delivery_settle(delivery)
            self._top_up(link, 1)
            return
        redelivered = not raw.first_acquirer or bool(raw.delivery_count)
        if self.no_ack:
            pn_delivery_settle(delivery)
            self._top_up(link, 1)
            self._hand_over(Delivery(message, source.queue, None, "", source.queue, redelivered))
            return
        ident = next(self._ids)
        pn_incref(delivery)  # kept alive until we settle it, whatever happens to the link
        self._unsettled[ident] = (delivery, link)
        if not self.prefetch:
            self._top_up(link, 1)
        self._hand_over(Delivery(message, source.queue, (self._gen, ident), "", source.queue, redelivered))

    @staticmethod
    def _settle(delivery: Any, outcome: int) -> None:
        if not pn_delivery_settled(delivery):
            pn_delivery_update(delivery, outcome)
        pn_delivery_settle(delivery)

    def _hand_over(self, delivery: Delivery) -> None:
        # Deliveries are handed to fetch() in one batch per reactor iteration (see publish()).
        if not self._batch:
            self.reactor.dirty.append(self)
        self._batch.append(delivery)

    def publish(self) -> None:
        """Reactor thread, once per iteration: hand the deliveries received to ``fetch``."""
        batch, self._batch = self._batch, []
        if batch:
            self._out.put(batch)

    def _top_up(self, link: Any, settled: int) -> None:
        """Give ``settled`` credits back to ``link`` (a C pointer), or refill a wide window."""
        if self.prefetch and not self.no_ack:
            pn_link_flow(link, settled)
        else:
            credit = pn_link_credit(link)
            if credit < WIDE_WINDOW // 2:
                pn_link_flow(link, WIDE_WINDOW - credit)

    def _apply(self) -> None:
        with self._ops_lock:
            self._ops_pending = False
        credits: dict[Any, int] = {}
        ops = self._ops
        unsettled = self._unsettled
        while ops:
            gen, ident, outcome = ops.popleft()
            if gen != self._gen:
                continue
            entry = unsettled.pop(ident, None)
            if entry is None:
                continue
            delivery, link = entry
            pn_delivery_update(delivery, outcome)
            pn_delivery_settle(delivery)
            pn_decref(delivery)
            if self.prefetch:
                credits[link] = credits.get(link, 0) + 1
        for link, count in credits.items():
            if link in self._by_impl:
                pn_link_flow(link, count)

    def _shutdown(self) -> None:
        self.reactor.remove_attachment(self)
        self._apply()
        for delivery, _link in self._unsettled.values():
            pn_delivery_update(delivery, PN_RELEASED)
            pn_delivery_settle(delivery)
            pn_decref(delivery)
        self._unsettled.clear()
        links = [link for _source, link in self._links.values()]
        self._forget_links()
        for link in links:
            link.close()
        if self._session is not None:
            self._session.close()
        else:
            self._session_done.set()
        self._gen += 1


class QpidSubscription(Subscription):
    """Broadcasts of one exchange: a no-ack consumer of the dialect's subscription address."""

    def __init__(self, reactor: Reactor, exchange: str, pattern: str, attach_timeout: float) -> None:
        address, client_pattern, capabilities = reactor.dialect.subscription(exchange, pattern)
        self.exchange = exchange
        self._consumer = QpidConsumer(reactor, [Source(exchange, address, False, capabilities, client_pattern)],
                                      0, True, attach_timeout)

    def fetch(self, timeout: float) -> list[Message]:
        """Return the broadcasts received so far, waiting up to ``timeout`` s for the first."""
        return [d.message for d in self._consumer.fetch(10_000, timeout)]

    def close(self) -> None:
        """Stop receiving (RabbitMQ deletes the subscription queue). Idempotent."""
        self._consumer.close()
