"""The Redis broker: kombu's storage layout, atomic fetch, delayed delivery through the unacked set.

Publishing ``LPUSH``es kombu's envelope onto the queue's priority list (exchange ``''``) or onto
every queue bound to a named exchange (``_kombu.binding.<exchange>``); fanout exchanges and
:meth:`RedisBroker.broadcast` use ``PUBLISH`` on ``/<db>.<exchange>`` channels.

Delayed messages (countdown/ETA) are published as Celery publishes them: straight into the
queue, the ``eta`` header saying when to run. So a Celery worker on the same queue gets the
message at once and runs it at its ETA, as it does for a Celery client's message (mixed fleets
are on time). A Celeriac consumer that fetches a message whose ``eta`` is more than
``park_eta_after`` (2 s) away *parks* it instead of holding it in worker memory: the entry that
the fetch recorded in ``unacked`` gets the index score ``eta - visibility_timeout``, so the
visibility sweep, which moves entries whose score is at or below ``now - visibility_timeout``
back to their queues, delivers it when it is due. The consumer that parked it sweeps right at
that time (and every consumer sweeps every ``delay_poll_interval``); a Celery worker's own kombu
sweep delivers parked messages too, only later (kombu 5.6 sweeps about every 100 s).

With ``native_delay=True`` (for fleets of Celeriac workers only) the broker declares the
``delay`` capability and parks at publish time instead: ``HSET unacked <tag> [envelope,
exchange, routing_key]`` with ``ZADD unacked_index (not_before - visibility_timeout) <tag>``.
Celery workers see such a message only after their next sweep.

Transport options (``broker_transport_options``), kombu's names where kombu has one:
``visibility_timeout`` (3600), ``global_keyprefix``, ``sep``, ``unacked_key``,
``unacked_index_key``, ``priority_steps``, ``fanout_prefix``, ``fanout_patterns``,
``polling_interval`` (longest single BRPOP, 1 s), ``unacked_restore_limit`` (1000),
``socket_timeout``, ``socket_connect_timeout``, ``health_check_interval``, ``max_connections``,
``master_name`` (Sentinel); Celeriac's own: ``native_delay`` (False: delayed messages go
straight to the queue as Celery sends them; True parks them at publish time, for fleets of
Celeriac workers only), ``delay_poll_interval`` (0.5 s),
``publish_retry_timeout`` (20 s), ``dead_letter_key`` (``celeriac.dead``), ``park_eta_after``
(2 s; None never parks fetched ETA messages), ``priority_order`` (``kombu``: 0 served first;
``high_first``: 9 first, and then the ``priority`` capability is declared).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from celeriac.broker.base import (
    BATCH,
    BROADCAST,
    DELAY,
    PRIORITY,
    QUEUE_SIZE,
    REPLY_QUEUES,
    Broker,
    Consumer,
    Subscription,
)
from celeriac.exceptions import BrokerConnectionError, ImproperlyConfigured
from celeriac.protocol import Message
from celeriac.routing import Queue
from celeriac.serialization import json_dumps, json_loads
from celeriac_redis import scripts
from celeriac_redis.connection import (
    TRANSIENT_ERRORS,
    describe_error,
    is_fatal,
    make_client,
    parse_url,
)
from celeriac_redis.layout import (
    PARKED_PROPERTY,
    CorruptEnvelope,
    Layout,
    decode_envelope,
    encode_envelope,
    split_binding,
    topic_matches,
    topic_pattern,
)

__all__ = ["RedisBroker"]

logger = logging.getLogger("celeriac.redis")


class RedisBroker(Broker):
    """A broker on one Redis database; one connection pool per broker object.

    ``publish``, ``purge``, ``queue_size``, ``broadcast`` are thread-safe (redis-py's pool
    hands each call its own connection).
    """

    capabilities = frozenset({DELAY, PRIORITY, QUEUE_SIZE, BROADCAST, REPLY_QUEUES, BATCH})
    description = "Redis (kombu layout)"

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        options = dict(conf.get("broker_transport_options") or {})
        self.options = options
        try:
            parsed = parse_url(url)
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from None
        self.layout = Layout.from_options(options, parsed.db)
        self.visibility_timeout = float(options.get("visibility_timeout", 3600))
        #: Park delayed messages at publish time (only Celeriac workers deliver them on time).
        self.native_delay = bool(options.get("native_delay", False))
        self.delay_poll_interval = float(options.get("delay_poll_interval", 0.5))
        self.polling_interval = float(options.get("polling_interval", 1.0))
        park = options.get("park_eta_after", 2.0)
        #: Fetched messages whose ``eta`` header is further away than this are parked, not held.
        self.park_eta_after: float | None = None if park is None or park is False else float(park)
        self.restore_limit = int(options.get("unacked_restore_limit") or 1000)
        self.publish_retry_timeout = float(options.get("publish_retry_timeout", 20.0))
        self.retry_enabled = bool(conf.get("broker_connection_retry", True))
        order = str(options.get("priority_order", "kombu"))
        if order not in ("kombu", "high_first"):
            raise ImproperlyConfigured(
                f"priority_order must be 'kombu' (0 served first, as Celery on Redis) or "
                f"'high_first' (9 served first, as on RabbitMQ), not {order!r}.")
        self.high_first = order == "high_first"
        caps = set(self.capabilities)
        if not self.native_delay:
            caps.discard(DELAY)
        if not self.high_first:
            caps.discard(PRIORITY)  # the SPI means "higher number first"; kombu serves 0 first
        self.capabilities = frozenset(caps)  # type: ignore[misc]
        self._consumers: weakref.WeakSet[Any] = weakref.WeakSet()
        ssl_opts = conf.get("broker_use_ssl")
        self._client: redis.Redis | None = None
        self._client_lock = threading.Lock()
        self._ssl = ssl_opts if isinstance(ssl_opts, Mapping) else None
        self._declared: set[str] = set()
        self._exchange_types: dict[str, str] = {}
        self._scripts: dict[str, Any] = {}
        self._down_since: float | None = None

    # -- connection ---------------------------------------------------------------------------

    @property
    def client(self) -> redis.Redis:
        """The redis-py client (created on first use, does not connect by itself)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    try:
                        self._client = make_client(self.url, self.options, self._ssl)
                    except ValueError as exc:
                        raise ImproperlyConfigured(str(exc)) from None
        return self._client

    def script(self, name: str) -> Any:
        """The registered Lua script ``name`` (``FETCH`` or ``RESTORE``)."""
        found = self._scripts.get(name)
        if found is None:
            found = self._scripts[name] = self.client.register_script(getattr(scripts, name))
        return found

    def connect(self) -> None:
        """PING the server now; raises ``BrokerConnectionError`` with one clear line."""
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as exc:
            error = BrokerConnectionError(describe_error(exc, self.url))
            # A refused certificate or login does not get better by retrying: the worker stops.
            error.transient = not is_fatal(exc)
            raise error from None

    def connection_lost(self, exc: BaseException) -> None:
        """Note a failed call: log once per outage and forget cached declarations (a restarted
        server lost its binding sets)."""
        self._declared.clear()
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning("%s; retrying with backoff.", describe_error(exc, self.url))

    def connection_ok(self) -> None:
        """Note a successful call after an outage."""
        if self._down_since is not None:
            logger.warning("Reconnected to Redis at %s after %.1f s.", self.safe_url,
                           time.monotonic() - self._down_since)
            self._down_since = None

    def retrying(self, fn: Any, timeout: float | None = None) -> Any:
        """Call ``fn()`` retrying transient connection errors with backoff for up to
        ``timeout`` seconds (``publish_retry_timeout``); then raise ``BrokerConnectionError``."""
        limit = self.publish_retry_timeout if timeout is None else timeout
        deadline = time.monotonic() + (limit if self.retry_enabled else 0.0)
        delay = 0.05
        while True:
            try:
                result = fn()
            except TRANSIENT_ERRORS as exc:
                if is_fatal(exc):
                    error = BrokerConnectionError(describe_error(exc, self.url))
                    error.transient = False
                    raise error from None
                self.connection_lost(exc)
                if time.monotonic() + delay > deadline:
                    raise BrokerConnectionError(describe_error(exc, self.url)) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.connection_ok()
            return result

    # -- declarations -------------------------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        """Record ``queue``'s binding (``_kombu.binding.<exchange>`` and kombu 5.7's permanent
        set) unless its exchange is the default one. Idempotent, cached per broker object."""
        exchange = queue.exchange_name
        ex_type = queue.exchange.type if queue.exchange is not None else "direct"
        self._exchange_types[exchange] = ex_type
        if queue.name in self._declared or not exchange:
            self._declared.add(queue.name)
            return
        pattern = topic_pattern(queue.binding_key) if ex_type == "topic" else ""
        member = self.layout.binding_member(queue.binding_key, pattern, queue.name)

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.sadd(self.layout.binding_key(exchange), member)
            pipe.sadd(self.layout.binding_permanent_key(exchange), member)
            pipe.execute()

        self.retrying(run)
        self._declared.add(queue.name)

    def _lookup(self, exchange: str, routing_key: str) -> list[str]:
        if not exchange:
            return [routing_key]
        members = self.client.smembers(self.layout.binding_key(exchange))
        ex_type = self._exchange_types.get(exchange, "direct")
        found: list[str] = []
        for member in members:
            parts = split_binding(member, self.layout.sep)
            if parts is None:
                continue
            key, pattern, queue = parts
            if pattern:  # a topic binding carries kombu's regular expression
                matched = topic_matches(pattern, routing_key)
            else:
                matched = ex_type == "fanout" or key == routing_key
            if matched:
                found.append(queue)
        return sorted(set(found))

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, message: Message, exchange: str, routing_key: str, *,
                queue: Queue | None = None, not_before: float | None = None) -> None:
        """Publish one message; see :class:`celeriac.broker.base.Broker.publish`.

        ``not_before`` is honoured only with ``native_delay`` on (the message is parked until
        due); otherwise the message goes to its queue at once and its ``eta`` header delays it,
        as with Celery. A named exchange with no matching binding drops the message, as kombu
        does (logged).
        Thread-safe; raises ``BrokerConnectionError`` after ``publish_retry_timeout``.
        """
        if queue is not None and queue.name not in self._declared:
            self.declare(queue)
        if exchange and self._exchange_types.get(exchange) == "fanout":
            self.broadcast(exchange, message, routing_key)
            return
        now = time.time()
        if not_before is not None and self.native_delay and not_before > now + 0.001:
            self.retrying(lambda: self._park(message, exchange, routing_key, not_before))
            for consumer in list(self._consumers):
                consumer.note_due(not_before)  # our own consumers sweep right on time
            return
        priority = message.properties.get("priority")
        _, raw = encode_envelope(message, exchange, routing_key)

        def run() -> None:
            targets = self._lookup(exchange, routing_key)
            if not targets:
                logger.warning("Message to exchange %r with routing key %r matched no queue; "
                               "dropped (as kombu does).", exchange, routing_key)
                return
            if len(targets) == 1:
                self.client.lpush(self.layout.queue_key(targets[0], priority), raw)
                return
            pipe = self.client.pipeline(transaction=True)
            for target in targets:
                pipe.lpush(self.layout.queue_key(target, priority), raw)
            pipe.execute()

        self.retrying(run)

    def _park(self, message: Message, exchange: str, routing_key: str, not_before: float) -> None:
        tag, raw = encode_envelope(message, exchange, routing_key,
                                   extra_properties={PARKED_PROPERTY: not_before})
        entry = b"[" + raw + b", " + json_dumps(exchange) + b", " + json_dumps(routing_key) + b"]"
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.layout.key(self.layout.unacked), tag, entry)
        pipe.zadd(self.layout.key(self.layout.unacked_index),
                  {tag: not_before - self.visibility_timeout})
        pipe.execute()

    def broadcast(self, exchange: str, message: Message, routing_key: str = "") -> None:
        """``PUBLISH`` the envelope on ``/<db>.<exchange>[/<routing_key>]``. Thread-safe."""
        _, raw = encode_envelope(message, exchange, routing_key)
        channel = self.layout.fanout_channel(exchange, routing_key)
        self.retrying(lambda: self.client.publish(channel, raw))

    def subscribe(self, exchange: str, pattern: str = "#") -> Subscription:
        """Subscribe to ``exchange``'s broadcasts whose routing key matches ``pattern``."""
        from celeriac_redis.pubsub import RedisSubscription

        return RedisSubscription(self, exchange, pattern)

    # -- consuming ----------------------------------------------------------------------------

    def consumer(self, queues: Sequence[Queue], prefetch: int, *, no_ack: bool = False) -> Consumer:
        """A consumer of ``queues``; see :class:`celeriac_redis.consumer.RedisConsumer`."""
        from celeriac_redis.consumer import RedisConsumer

        for queue in queues:
            if queue.name not in self._declared:
                self.declare(queue)
        consumer = RedisConsumer(self, list(queues), prefetch, no_ack=no_ack)
        self._consumers.add(consumer)
        return consumer

    def sweep(self) -> tuple[int, float | None]:
        """Move overdue unacked entries (dead consumers' messages, due parked messages) back to
        their queues, atomically. Returns ``(moved, lowest remaining index score or None)``."""
        lay = self.layout
        result = self.script("RESTORE")(
            keys=[lay.key(lay.unacked), lay.key(lay.unacked_index), lay.key(lay.dead_letter)],
            args=["sweep", repr(time.time() - self.visibility_timeout + 0.002), self.restore_limit,
                  lay.prefix, lay.sep, ",".join(map(str, lay.priority_steps)), "front"],
        )
        moved = int(result[0])
        lowest = float(result[1]) if len(result) > 1 and result[1] else None
        if moved:
            logger.debug("Restored %d unacked or due message(s).", moved)
        return moved, lowest

    def restore_tags(self, tags: Sequence[str], front: bool) -> int:
        """Move the unacked entries ``tags`` back to their queues (front = consumed next)."""
        if not tags:
            return 0
        lay = self.layout
        result = self.script("RESTORE")(
            keys=[lay.key(lay.unacked), lay.key(lay.unacked_index), lay.key(lay.dead_letter)],
            args=["tags", "0", 0, lay.prefix, lay.sep, ",".join(map(str, lay.priority_steps)),
                  "front" if front else "back", *tags],
        )
        return int(result[0])

    # -- management ---------------------------------------------------------------------------

    def _parked(self, queues: Sequence[str]) -> list[tuple[float, str, bytes]]:
        """``(due time, tag, stored envelope)`` of the parked entries for ``queues`` (matched by
        routing key, as the restore routes them), soonest first."""
        wanted = set(queues)
        lay = self.layout
        stored = self.retrying(lambda: self.client.hgetall(lay.key(lay.unacked)))
        found: list[tuple[float, str, bytes]] = []
        for tag, raw in stored.items():
            try:
                envelope, _exchange, routing_key = json_loads(raw)[:3]
                when = (envelope.get("properties") or {}).get(PARKED_PROPERTY)
            except (ValueError, TypeError, AttributeError):
                continue
            if when is not None and routing_key in wanted:
                found.append((float(when), tag.decode() if isinstance(tag, bytes) else str(tag),
                              json_dumps(envelope)))
        found.sort()
        return found

    def scheduled(self, queues: Sequence[str], limit: int = 1000) -> list[tuple[float, Message]]:
        """Messages of ``queues`` parked until their ETA (at publish with ``native_delay``, or on
        fetch when due more than ``park_eta_after`` away), soonest first. Thread-safe."""
        out: list[tuple[float, Message]] = []
        for when, _tag, envelope in self._parked(queues)[:limit]:
            try:
                out.append((when, decode_envelope(envelope)[0]))
            except CorruptEnvelope:
                continue
        return out

    def purge(self, queue: str) -> int:
        """Delete the ready messages of every priority list of ``queue``, and its messages parked
        until their ETA; return how many. Thread-safe."""
        keys = self.layout.queue_keys(queue)
        lay = self.layout
        tags = [tag for _, tag, _ in self._parked([queue])]

        def run() -> int:
            pipe = self.client.pipeline(transaction=True)
            for key in keys:
                pipe.llen(key)
            pipe.delete(*keys)
            if tags:
                pipe.hdel(lay.key(lay.unacked), *tags)
                pipe.zrem(lay.key(lay.unacked_index), *tags)
            results = pipe.execute()
            removed = int(results[len(keys) + 1]) if tags else 0
            return int(sum(results[:len(keys)])) + removed

        return int(self.retrying(run))

    def queue_size(self, queue: str) -> int | None:
        """Ready messages of ``queue`` over all priority lists. Thread-safe."""
        keys = self.layout.queue_keys(queue)

        def run() -> int:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            return int(sum(pipe.execute()))

        return int(self.retrying(run))

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue``'s lists and its binding members (kombu's ``queue_delete``)."""
        keys = self.layout.queue_keys(queue)

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*keys)
            for exchange in list(self._exchange_types):
                if exchange:
                    key = self.layout.binding_key(exchange)
                    for member in self.client.smembers(key):
                        parts = split_binding(member, self.layout.sep)
                        if parts is not None and parts[2] == queue:
                            pipe.srem(key, member)
                            pipe.srem(self.layout.binding_permanent_key(exchange), member)
            pipe.execute()

        self.retrying(run)
        self._declared.discard(queue)

    def close(self) -> None:
        """Close this broker's consumers (their held messages go back to the queues) and
        disconnect the pool. Idempotent."""
        for consumer in list(self._consumers):
            consumer.close()
        client, self._client = self._client, None
        self._scripts.clear()
        if client is not None:
            try:
                client.close()
                client.connection_pool.disconnect()
            except Exception:  # closing must not raise
                pass
