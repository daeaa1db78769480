"""The Redis consumer: batch fetch with one Lua call, BRPOP when idle, batched acks.

A fetch first runs the FETCH script, which pops up to N envelopes across the queues' priority
lists (priority-major: every queue's bucket 0, then bucket 3 ...) and records each in
``unacked`` / ``unacked_index`` in the same atomic step. Only when nothing is ready does it block
in ``BRPOP`` (capped at ``polling_interval``); the message BRPOP returns is recorded right away.
The queue that delivered last moves to the end of the order (round-robin fairness).

A small housekeeping thread per consumer flushes acks in pipelines (a few ms after the first
ack), refreshes the index score of the deliveries this consumer still holds (so a live worker's
long task or held ETA message is never redelivered to another worker) and runs the atomic
restore sweep every ``delay_poll_interval`` seconds (dead consumers' messages after the
visibility timeout, parked delayed messages when due), and right when a message it parked is due.

Messages whose ``eta`` header is more than ``park_eta_after`` away are parked (given back to
the unacked index with the score ``eta - visibility_timeout``) instead of being held in memory;
nearer ones are held and do not use up the prefetch window.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celeriac.broker.base import Consumer, Delivery
from celeriac.exceptions import BrokerConnectionError
from celeriac.routing import Queue
from celeriac.serialization import json_dumps
from celeriac_redis.connection import TRANSIENT_ERRORS, describe_error
from celeriac_redis.layout import PARKED_PROPERTY, CorruptEnvelope, decode_envelope, eta_timestamp

if TYPE_CHECKING:
    from celeriac_redis.broker import RedisBroker

__all__ = ["RedisConsumer"]

logger = logging.getLogger("celeriac.redis")

_TAG_RE = re.compile(rb'"delivery_tag": "([^"]+)"')
_ACK_CHUNK = 1000
#: A fetch stops taking messages once it holds this many bytes: a batch of large bodies does not
#: keep Redis busy in one script for long, and the first task starts sooner.
_FETCH_BYTES = 4 << 20


def _mark_parked(raw: bytes, park: dict[str, float]) -> tuple[str, bytes] | None:
    """``(tag, unacked entry)`` for a fetched envelope to park, its properties carrying the
    parked marker (as a message parked at publish time does); None when it is not to be parked
    or its layout is not kombu's."""
    match = _TAG_RE.search(raw)
    tag = match.group(1).decode("utf-8", "replace") if match else None
    if tag is None or tag not in park:
        return None
    at = raw.rfind(b'"properties": {')  # the last top-level key of kombu's envelope
    if at < 0:
        return None
    at += len(b'"properties": {')
    marker = b'"' + PARKED_PROPERTY.encode() + b'": ' + repr(park[tag]).encode()
    envelope = raw[:at] + marker + (b"" if raw[at:at + 1] == b"}" else b", ") + raw[at:]
    try:
        _, exchange, routing_key, _, _ = decode_envelope(envelope)
    except CorruptEnvelope:
        return None
    return tag, b"[" + envelope + b", " + json_dumps(exchange) + b", " + json_dumps(routing_key) + b"]"


class RedisConsumer(Consumer):
    """Consumes a set of queues. ``fetch`` runs on one thread; ``ack``/``reject``/``flush`` are
    thread-safe (redis-py's pool gives each thread its own connection)."""

    def __init__(self, broker: RedisBroker, queues: Sequence[Queue], prefetch: int, *,
                 no_ack: bool = False) -> None:
        self.broker = broker
        self.layout = broker.layout
        self.names = list(dict.fromkeys(q.name for q in queues))
        self.prefetch = max(0, int(prefetch or 0))
        self.no_ack = no_ack
        self._order = list(range(len(self.names)))
        #: tag -> counts against prefetch (False for ETA messages held until due, as Celery
        #: raises its QoS for them).
        self._held: dict[str, bool] = {}
        self._counted = 0
        self._acks: list[str] = []
        self._lock = threading.Condition()
        self._closed = False
        self._backoff = 0.0
        self._retry_at = 0.0
        self._wake = threading.Event()
        self._due_hint: float | None = None
        self._can_park = not no_ack
        self._peek = True  # BLMOVE available (Redis 6.2+); see _wait_for_message
        self._thread: threading.Thread | None = None
        if not no_ack:
            self._thread = threading.Thread(target=self._housekeeping, daemon=True,
                                            name="celeriac-redis-acks")
            self._thread.start()

    # -- fetching -----------------------------------------------------------------------------

    def _keys(self) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        owners: list[str] = []
        steps = self.layout.priority_steps
        for step in (reversed(steps) if self.broker.high_first else steps):
            for index in self._order:
                name = self.names[index]
                keys.append(self.layout.queue_key(name, step))
                owners.append(name)
        return keys, owners

    def _rotate(self, name: str) -> None:
        index = self.names.index(name)
        if len(self._order) > 1 and index in self._order:
            self._order.remove(index)
            self._order.append(index)

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Return up to ``max_count`` deliveries, waiting at most ``timeout`` s for the first.

        Connection loss is retried with backoff (one log line per outage); meanwhile this
        returns an empty list. Raises ``BrokerConnectionError`` only when
        ``broker_connection_retry`` is off."""
        deadline = time.monotonic() + max(0.0, timeout)
        if self._closed or max_count <= 0:
            return []
        limit = max_count
        if self.prefetch and not self.no_ack:
            with self._lock:
                free = self.prefetch - self._counted
                if free <= 0:
                    self._lock.wait(max(0.0, deadline - time.monotonic()))
                    free = self.prefetch - self._counted
            if free <= 0:
                return []
            limit = min(limit, free)
        now = time.monotonic()
        if now < self._retry_at:
            time.sleep(max(0.0, min(self._retry_at - now, deadline - now)))
            if time.monotonic() < self._retry_at:
                return []
        try:
            items = self._fetch(limit, deadline)
        except TRANSIENT_ERRORS as exc:
            if not self.broker.retry_enabled:
                raise BrokerConnectionError(describe_error(exc, self.broker.url)) from None
            self.broker.connection_lost(exc)
            self._backoff = min(max(self._backoff * 2, 0.1), 2.0)
            self._retry_at = time.monotonic() + self._backoff
            remaining = deadline - time.monotonic()
            if remaining > 0:
                time.sleep(min(self._backoff, remaining))
            return []
        self._backoff = 0.0
        self.broker.connection_ok()
        return self._deliveries(items)

    def _fetch(self, limit: int, deadline: float) -> list[tuple[str, bytes]]:
        self._can_park = not self.no_ack
        keys, owners = self._keys()
        items = self._run_fetch(keys, owners, limit)
        if items:
            return items
        while True:
            remaining = deadline - time.monotonic()
            if remaining < 0.01:
                return []
            block = min(remaining, self.broker.polling_interval)
            # Wait for a message without taking it, then take it with the atomic FETCH script
            # (which records it as unacked in the same step). A BRPOP here lost the message when
            # the connection broke after Redis popped it and before the reply arrived: it was
            # in neither the queue nor ``unacked`` (found by faults/test_network.py).
            self._wait_for_message(keys, block)
            items = self._run_fetch(keys, owners, limit)
            if items:
                return items

    def _wait_for_message(self, keys: list[str], block: float) -> None:
        """Block up to ``block`` s until a queue may hold a message; take nothing.

        ``BLMOVE key key RIGHT RIGHT`` pops the oldest message of ``key`` and pushes it back in
        the same place, atomically: the list is unchanged whatever happens to the connection.
        It waits on one list: the default-priority list of the first queue, where messages
        without a priority go. With more lists than that (priorities, several queues) the wait
        is cut to 0.1 s so the caller's FETCH also sees the others soon. Redis before 6.2 has
        no BLMOVE: a 0.05 s sleep, then the caller polls again."""
        if self._peek:
            key = self.layout.queue_key(self.names[self._order[0]], 0)
            wait = block if len(keys) == 1 else min(block, 0.1)
            try:
                self.broker.client.blmove(key, key, wait, "RIGHT", "RIGHT")
                return
            except TRANSIENT_ERRORS:
                raise
            except Exception as exc:  # "unknown command" on Redis < 6.2
                if "unknown command" not in str(exc).lower():
                    raise
                self._peek = False
        time.sleep(min(block, 0.05))

    def _run_fetch(self, keys: list[str], owners: list[str], limit: int,
                   client: Any = None) -> list[tuple[str, bytes]]:
        lay = self.layout
        flat = self.broker.script("FETCH")(
            keys=[lay.key(lay.unacked), lay.key(lay.unacked_index), lay.key(lay.dead_letter), *keys],
            args=[limit, repr(time.time()), "0" if self.no_ack else "1", _FETCH_BYTES],
            client=client,
        )
        if client is not None:  # queued on a pipeline: parsed after it runs
            return []
        return self._parse_fetch(flat, owners)

    def _parse_fetch(self, flat: Any, owners: list[str]) -> list[tuple[str, bytes]]:
        lay = self.layout
        items: list[tuple[str, bytes]] = []
        for i in range(0, len(flat), 2):
            index, raw = int(flat[i]), flat[i + 1]
            if index == 0:
                logger.error("Moved a corrupt message (not a kombu envelope) to the dead-letter "
                             "list %r: %.200r", lay.dead_letter, raw)
                continue
            items.append((owners[index - 1], raw))
        return items

    def _deliveries(self, items: list[tuple[str, bytes]]) -> list[Delivery]:
        out: list[Delivery] = []
        uncounted: set[str] = set()
        park: dict[str, float] = {}
        now = time.time()
        for name, raw in items:
            try:
                message, exchange, routing_key, tag, redelivered = decode_envelope(raw)
                if not tag and not self.no_ack:
                    raise CorruptEnvelope("no delivery_tag")
            except CorruptEnvelope as exc:
                self._dead_letter(raw, str(exc))
                continue
            eta = None if self.no_ack else eta_timestamp(message.headers)
            if eta is not None and eta > now:
                if self._can_park and self.broker.park_eta_after is not None and \
                        eta > now + self.broker.park_eta_after:
                    park[tag] = eta
                    continue
                uncounted.add(tag)
            out.append(Delivery(message, name, tag, exchange, routing_key, redelivered))
        if park:
            uncounted.update(park)  # whatever cannot be parked is held, outside the prefetch
            out.extend(self._park(park, items))
        if out:
            self._rotate(out[0].queue)
            if not self.no_ack:
                with self._lock:
                    for delivery in out:
                        counted = delivery.tag not in uncounted
                        self._held[delivery.tag] = counted
                        self._counted += counted
        return out

    def _park(self, park: dict[str, float], items: list[tuple[str, bytes]]) -> list[Delivery]:
        """Give far-future ETA messages (e.g. sent by Celery clients) back to Redis as parked
        entries instead of holding them: their index score becomes ``eta - visibility_timeout``
        so the restore sweep delivers them when due. Returns what could not be parked."""
        lay = self.layout
        vt = self.broker.visibility_timeout
        try:
            pipe = self.broker.client.pipeline(transaction=True)
            for _, raw in items:
                # Mark the stored entry as parked, so that it does not come back flagged as a
                # redelivery (it was never handed to a task).
                marked = _mark_parked(raw, park)
                if marked is not None:
                    pipe.hset(lay.key(lay.unacked), marked[0], marked[1])
            pipe.zadd(lay.key(lay.unacked_index), {tag: eta - vt for tag, eta in park.items()}, xx=True)
            pipe.execute()
        except TRANSIENT_ERRORS as exc:
            logger.warning("Could not park %d ETA message(s) (%s); holding them instead.",
                           len(park), exc)
            back: list[Delivery] = []
            for name, raw in items:
                message, exchange, routing_key, tag, redelivered = decode_envelope(raw)
                if tag in park:
                    back.append(Delivery(message, name, tag, exchange, routing_key, redelivered))
            return back
        self.note_due(min(park.values()))
        return []

    def _dead_letter(self, raw: bytes, reason: str) -> None:
        logger.error("Moved a corrupt message to the dead-letter list %r (%s): %.200r",
                     self.layout.dead_letter, reason, raw)
        lay = self.layout
        pipe = self.broker.client.pipeline(transaction=True)
        pipe.lpush(lay.key(lay.dead_letter), raw)
        match = _TAG_RE.search(raw)
        if match and not self.no_ack:
            tag = match.group(1).decode("utf-8", "replace")
            pipe.zrem(lay.key(lay.unacked_index), tag)
            pipe.hdel(lay.key(lay.unacked), tag)
        try:
            pipe.execute()
        except TRANSIENT_ERRORS as exc:  # it stays in unacked and is retried after the timeout
            logger.warning("Could not move the corrupt message aside (%s).", exc)

    # -- acknowledgement ----------------------------------------------------------------------

    def ack(self, delivery: Delivery) -> None:
        """Queue the ack of ``delivery``; flushed in a pipeline within a few ms. Thread-safe."""
        if self.no_ack:
            return
        with self._lock:
            self._counted -= self._held.pop(delivery.tag, False)
            self._acks.append(delivery.tag)
            first = len(self._acks) == 1
            self._lock.notify_all()
        if first:
            self._wake.set()

    def reject(self, delivery: Delivery, requeue: bool = False) -> None:
        """Reject ``delivery``: with ``requeue`` it goes to the back of its queue (kombu's
        behaviour), otherwise it is dropped. Thread-safe."""
        if self.no_ack:
            return
        if not requeue:
            self.ack(delivery)
            return
        with self._lock:
            self._counted -= self._held.pop(delivery.tag, False)
            self._lock.notify_all()
        self.broker.retrying(lambda: self.broker.restore_tags([delivery.tag], front=False))

    def flush(self) -> None:
        """Send the queued acks now (one pipeline per 1000 tags). Thread-safe."""
        with self._lock:
            tags, self._acks = self._acks, []
        if not tags:
            return
        lay = self.layout
        try:
            pipe = self.broker.client.pipeline(transaction=False)
            for i in range(0, len(tags), _ACK_CHUNK):
                chunk = tags[i:i + _ACK_CHUNK]
                pipe.zrem(lay.key(lay.unacked_index), *chunk)
                pipe.hdel(lay.key(lay.unacked), *chunk)
            pipe.execute()
        except TRANSIENT_ERRORS as exc:
            self.broker.connection_lost(exc)
            with self._lock:
                self._acks[:0] = tags  # retried on the next flush

    def note_due(self, when: float) -> None:
        """A message parked by this process is due at ``when`` (Unix time): sweep then."""
        with self._lock:
            if self._due_hint is None or when < self._due_hint:
                self._due_hint = when
        self._wake.set()

    def _refresh(self) -> None:
        with self._lock:
            tags = list(self._held)
        if not tags:
            return
        now = time.time()
        lay = self.layout
        pipe = self.broker.client.pipeline(transaction=False)
        for i in range(0, len(tags), _ACK_CHUNK):
            pipe.zadd(lay.key(lay.unacked_index), dict.fromkeys(tags[i:i + _ACK_CHUNK], now), xx=True)
        pipe.execute()

    def _housekeeping(self) -> None:
        vt = self.broker.visibility_timeout
        refresh_every = max(0.1, vt / 4)
        parks = self.broker.native_delay or self.broker.park_eta_after is not None
        # Parked messages are due at their ETA: sweep often enough to deliver them on time even
        # when the consumer that parked one is gone.
        sweep_every = self.broker.delay_poll_interval if parks else min(10.0, vt / 4)
        sweep_every = max(0.05, sweep_every)
        next_refresh = time.monotonic() + refresh_every
        next_sweep = time.monotonic()
        while not self._closed:
            wait = max(0.0, min(next_refresh, next_sweep) - time.monotonic())
            if self._wake.wait(wait):
                self._wake.clear()
                time.sleep(0.002)  # let a burst of acks gather into one pipeline
            with self._lock:
                hint, self._due_hint = self._due_hint, None
            if hint is not None:
                next_sweep = min(next_sweep, time.monotonic() + max(0.0, hint - time.time()))
            try:
                self.flush()
                now = time.monotonic()
                if now >= next_refresh:
                    self._refresh()
                    next_refresh = now + refresh_every
                if now >= next_sweep:
                    _, lowest = self.broker.sweep()
                    next_sweep = now + sweep_every
                    if lowest is not None:
                        due_in = lowest + vt - time.time()
                        next_sweep = min(next_sweep, now + max(0.0, due_in))
            except TRANSIENT_ERRORS as exc:
                self.broker.connection_lost(exc)
                self._wake.wait(0.5)
            except Exception:  # housekeeping must survive anything
                logger.exception("Redis consumer housekeeping failed; going on.")
                self._wake.wait(0.5)

    def close(self) -> None:
        """Flush acks, put the deliveries still held back at the front of their queues, stop."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.no_ack:
            return
        try:
            self.flush()
            with self._lock:
                held, self._held, self._counted = list(self._held), {}, 0
            for i in range(0, len(held), 500):
                self.broker.restore_tags(held[i:i + 500], front=True)
        except TRANSIENT_ERRORS as exc:
            logger.warning("Could not return held messages on close (%s); they come back after "
                           "the visibility timeout.", exc)
