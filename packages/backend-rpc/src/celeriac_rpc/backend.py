"""``rpc://``: results sent as messages to the caller's reply queue, in Celery's RPC format.

Worker side, :meth:`RPCBackend.store` publishes the meta (``task_id``, ``status``, ``result``,
``traceback``, ``children`` ...) through the default exchange to the task message's
``reply_to`` queue with ``correlation_id`` = the task id, ``delivery_mode`` 1 (2 with
``result_persistent``) and the ``result_serializer``'s content type; every state change is one
message. A Celery client using ``rpc://`` reads these, and this backend reads what a Celery
worker sends.

Client side, :meth:`RPCBackend.on_task_call` declares the reply queue (named by the app's
per-thread id, as Celery's ``thread_oid``: non-durable, auto-delete, ``x-expires`` =
``result_expires``) before the task is sent; :meth:`RPCBackend.wait` consumes it (no acks) and
keeps the latest state of every task seen, so results of other tasks are kept for later.
A result is read once by the process that sent the task: it is not queryable by id elsewhere
(not ``persistent``). Results stored without a reply queue stay in this process's memory.

Works over any broker declaring ``reply_queues``; chords also need ``queue_size``
(see :mod:`celeriac_rpc.chord`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from celeriac import states
from celeriac.backends.base import CHORDS, PUSH, ChordEntry, ResultBackend
from celeriac.broker.base import REPLY_QUEUES, Broker, Consumer, Delivery
from celeriac.exceptions import ImproperlyConfigured, TimeoutError
from celeriac.plugins import create_broker
from celeriac.protocol import Message
from celeriac.routing import Exchange, Queue

from celeriac_rpc.chord import ChordJoin

__all__ = ["RPCBackend"]

logger = logging.getLogger("celeriac.rpc")

#: How many task states the client keeps in memory (oldest dropped first).
MAX_KEPT = 100_000
DEFAULT_EXPIRES = 86400.0


class RPCBackend(ResultBackend):
    """Results as reply-queue messages. Thread-safe."""

    capabilities = frozenset({PUSH, CHORDS})
    description = "RPC (results sent to the caller's reply queue)"

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        if self.expires is None:
            self.expires = DEFAULT_EXPIRES
        self.persistent = bool(conf.get("result_persistent"))
        self._broker: Broker | None = None
        self._broker_lock = threading.Lock()
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._cond = threading.Condition()
        self._queues: dict[str, Queue] = {}
        self._task_queue: OrderedDict[str, str] = OrderedDict()
        self._consumers: dict[str, Consumer] = {}
        self._drive = threading.Lock()
        self._chords: ChordJoin | None = None
        self._closed = False
        ref = weakref.ref(self)

        def after_fork() -> None:  # a forked child has none of the parent's consumer threads
            backend = ref()
            if backend is not None:
                backend._consumers = {}
                backend._drive = threading.Lock()
                backend._cond = threading.Condition()

        os.register_at_fork(after_in_child=after_fork)

    # -- broker -------------------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker connection (created at first use from ``broker_url``)."""
        if self._broker is None:
            with self._broker_lock:
                if self._broker is None:
                    url = self.conf.get("broker_url")
                    if not url:
                        raise ImproperlyConfigured(
                            "The rpc:// result backend sends results through the broker, but "
                            "broker_url is not set.")
                    broker = create_broker(str(url), self.conf)
                    if not broker.has(REPLY_QUEUES):
                        broker.close()
                        raise ImproperlyConfigured(
                            f"The rpc:// result backend needs a broker with reply queues; "
                            f"{type(broker).__name__} ({broker.safe_url}) has none. Use another "
                            "result backend (redis://, sqlite://).")
                    self._broker = broker
        return self._broker

    def reply_queue(self, name: str) -> Queue:
        """The declaration of reply queue ``name``, exactly as Celery 5.6 declares it."""
        return Queue(name, Exchange(""), name, durable=False, auto_delete=True,
                     expires=self.expires)

    # -- worker side --------------------------------------------------------------------------

    def store(self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None,
              correlation_id: str | None = None) -> None:
        """Send ``meta`` to the ``reply_to`` queue (or keep it in this process without one).

        Raises ``BrokerConnectionError`` when the broker cannot take the message.
        """
        if not reply_to:
            self._record(task_id, meta)
            return
        if correlation_id is None or meta.get("task_id", task_id) != correlation_id:
            correlation_id = task_id
        body = self.encode(meta)
        message = Message({}, {"correlation_id": correlation_id,
                               "delivery_mode": 2 if self.persistent else 1},
                          body, self.serializer.content_type, self.serializer.content_encoding)
        self.broker.publish_reply(message, reply_to)

    # -- client side --------------------------------------------------------------------------

    def on_task_call(self, task_id: str, reply_to: str | None) -> None:
        """Declare the reply queue ``reply_to`` before the task is sent (once per queue).

        The queue is consumed only when this process waits for a result: a worker forwarding
        a chain step with the client's ``reply_to`` must not read the client's results.
        """
        if not reply_to:
            return
        if reply_to not in self._queues:
            queue = self.reply_queue(reply_to)
            self.broker.declare(queue)
            with self._cond:
                self._queues[reply_to] = queue
        with self._cond:
            self._task_queue[task_id] = reply_to
            while len(self._task_queue) > MAX_KEPT:
                self._task_queue.popitem(last=False)

    def _record(self, task_id: str, meta: dict[str, Any]) -> None:
        with self._cond:
            current = self._results.get(task_id)
            if current is not None and current.get("status") == states.SUCCESS:
                return  # a SUCCESS is final
            self._results[task_id] = meta
            self._results.move_to_end(task_id)
            while len(self._results) > MAX_KEPT:
                self._results.popitem(last=False)
            self._cond.notify_all()

    def _on_delivery(self, delivery: Delivery) -> None:
        message = delivery.message
        try:
            meta = self.decode(message.body)
        except Exception:  # noqa: BLE001 - a bad reply must not stop the client
            logger.warning("Ignoring an undecodable message on reply queue %s.", delivery.queue)
            return
        if not isinstance(meta, dict) or "status" not in meta:
            logger.warning("Ignoring a message that is not a task result on reply queue %s.",
                           delivery.queue)
            return
        task_id = meta.get("task_id") or message.properties.get("correlation_id")
        if not task_id:
            return
        meta.setdefault("task_id", task_id)
        self._record(str(task_id), meta)

    def _consumer(self, name: str) -> Consumer:
        consumer = self._consumers.get(name)
        if consumer is None:
            consumer = self.broker.consumer([self._queues[name]], 0, no_ack=True)
            self._consumers[name] = consumer
        return consumer

    def _queues_for(self, task_ids: Sequence[str]) -> list[str]:
        """The reply queues the results of ``task_ids`` arrive on: those they were sent with,
        or every queue this process declared when one id was not sent from here (a chain's
        later step, an id built by hand)."""
        with self._cond:
            names = {self._task_queue.get(t) for t in task_ids}
            if None in names:
                return list(self._queues)
            return [n for n in names if n is not None]

    def _drain(self, timeout: float, names: list[str]) -> None:
        """Read what arrived on reply queues ``names``, waiting up to ``timeout`` s. Only one
        thread drains at a time; the others wait for the condition."""
        if not names or not self._drive.acquire(blocking=False):
            with self._cond:
                self._cond.wait(min(timeout, 0.05) if names else timeout)
            return
        try:
            share = timeout if len(names) == 1 else min(timeout, 0.05)
            for name in names:
                for delivery in self._consumer(name).fetch(10_000, share):
                    self._on_delivery(delivery)
        finally:
            self._drive.release()

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The latest state seen for ``task_id`` (after reading the reply queues), or None."""
        self._drain(0.0, self._queues_for([task_id]))
        with self._cond:
            meta = self._results.get(task_id)
            return dict(meta) if meta is not None else None

    def wait(self, task_ids: Sequence[str], timeout: float | None = None,
             interval: float = 0.5) -> dict[str, dict[str, Any]]:
        """Consume the reply queues until every id is ready; raises ``TimeoutError``."""
        ids = list(dict.fromkeys(task_ids))
        names = self._queues_for(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                done = {t: dict(self._results[t]) for t in ids
                        if t in self._results
                        and self._results[t].get("status") in states.READY_STATES}
            if len(done) == len(ids):
                return done
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                missing = [t for t in ids if t not in done]
                raise TimeoutError(f"The operation timed out after {timeout} s waiting for "
                                   f"{len(missing)} result(s), first {missing[0]}.")
            self._drain(min(left, 1.0), names)

    def forget(self, task_id: str) -> None:
        """Drop what this process keeps for ``task_id``."""
        with self._cond:
            self._results.pop(task_id, None)

    # -- chords -------------------------------------------------------------------------------

    @property
    def chords(self) -> ChordJoin:
        """The broker-side chord counter."""
        if self._chords is None:
            self._chords = ChordJoin(self.broker, self.conf, self.expires)
        return self._chords

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Create chord ``group_id``'s join queues and token for ``size`` members."""
        self.chords.start(group_id, size)

    def chord_part_return(self, group_id: str, group_index: int | None, task_id: str,
                          state: str, result: Any) -> list[ChordEntry] | None:
        """Record one finished member; the entries go to exactly one caller."""
        return self.chords.part_return(group_id, group_index, task_id, state, result)

    def close(self) -> None:
        """Stop consuming the reply queues and close the broker connection. Idempotent."""
        self._closed = True
        consumers = list(self._consumers.values())
        self._consumers.clear()
        for consumer in consumers:
            try:
                consumer.close()
            except Exception:
                logger.debug("Error closing a reply consumer", exc_info=True)
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.close()
