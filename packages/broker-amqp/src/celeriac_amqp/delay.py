"""Broker-side delayed delivery: countdown/ETA messages wait in RabbitMQ, not in a worker.

The delay, in milliseconds, is written in binary in the routing key: 32 words ``0``/``1``, most
significant first. Level ``k`` (k = 31 .. 0) is a topic exchange ``celeriac.delay.<k>`` and a
durable queue of the same name whose messages all live exactly ``2**k`` ms
(``x-message-ttl``) and are then dead-lettered to the next level's exchange, routing key kept.
Each level exchange sends messages whose bit ``k`` is 1 into its queue and the others straight
on to the next level (an exchange-to-exchange binding). After level 0 the message reaches the
headers exchange ``celeriac.delay.deliver``, where every destination queue is bound on the
header ``celeriac-delay-to = <queue name>``. (Not an ``x-`` name: RabbitMQ's headers exchange
ignores headers starting with ``x-`` when matching, so such a binding would match every message;
an earlier version bound on ``x-celeriac-delay-to`` and :func:`bind_target` removes that binding.)

So a message waits ``sum(2**k for set bits)`` = its delay, never less, in queues whose messages
all have the same TTL (so they expire in arrival order); 32 queues serve every delay up to
~49.7 days and every destination. The consumer strips the routing headers again. Publishing
drops the ``expiration`` property, which would otherwise cut the wait short (the task's own
``expires`` header still applies).

Browsing (``inspect scheduled``, ``purge``): :func:`browse` takes every message of every level
without acknowledging it, keeps (or acknowledges, to delete) those for the wanted queues, and
returns the rest when its channel closes. RabbitMQ puts a requeued message back at its original
position in a classic queue and keeps its original expiry time, so a level's order and each
message's wait are unchanged (a message due during the browse, milliseconds, moves on right
after it). Two browses at once would each see part of a level, so callers serialise them with
:data:`BROWSE_LOCK`, a queue only one connection may declare at a time.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

__all__ = [
    "BROWSE_LOCK",
    "DELIVER_EXCHANGE",
    "LEGACY_TARGET_HEADER",
    "LEVELS",
    "MAX_DELAY_MS",
    "ROUTING_HEADERS",
    "TARGET_HEADER",
    "bind_target",
    "browse",
    "declare_topology",
    "entry_exchange",
    "level_name",
    "routing_key",
]

LEVELS = 32
MAX_DELAY_MS = 2**LEVELS - 1
PREFIX = "celeriac.delay"
DELIVER_EXCHANGE = f"{PREFIX}.deliver"
TARGET_HEADER = "celeriac-delay-to"
#: The header of the first version, whose bindings matched every message (see above).
LEGACY_TARGET_HEADER = "x-celeriac-delay-to"
#: An exclusive, auto-deleted queue: whoever declared it may browse the levels.
BROWSE_LOCK = f"{PREFIX}.browse-lock"
#: Headers RabbitMQ or the delay path add, removed before a delivery reaches the worker.
ROUTING_HEADERS = (
    TARGET_HEADER,
    LEGACY_TARGET_HEADER,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)


def level_name(level: int) -> str:
    """Name of level ``level``'s exchange and queue (the exit exchange for -1)."""
    return DELIVER_EXCHANGE if level < 0 else f"{PREFIX}.{level}"


def routing_key(delay_ms: int) -> str:
    """The 32-word binary routing key for ``delay_ms`` (clamped to ``[0, MAX_DELAY_MS]``)."""
    delay_ms = max(0, min(int(delay_ms), MAX_DELAY_MS))
    return ".".join(format(delay_ms, f"0{LEVELS}b"))


def entry_exchange(delay_ms: int) -> str:
    """The level exchange to publish to: the one of the highest set bit."""
    delay_ms = max(1, min(int(delay_ms), MAX_DELAY_MS))
    return level_name(delay_ms.bit_length() - 1)


def _pattern(level: int, bit: str) -> str:
    return "*." * (LEVELS - 1 - level) + bit + ".#"


def declare_topology(channel: BlockingChannel) -> None:
    """Declare every level (idempotent; same arguments every time)."""
    channel.exchange_declare(DELIVER_EXCHANGE, "headers", durable=True)
    for level in range(LEVELS):
        channel.exchange_declare(level_name(level), "topic", durable=True)
    for level in range(LEVELS):
        name = level_name(level)
        after = level_name(level - 1)
        arguments: dict[str, Any] = {"x-message-ttl": 2**level, "x-dead-letter-exchange": after}
        channel.queue_declare(name, durable=True, arguments=arguments)
        channel.queue_bind(name, name, routing_key=_pattern(level, "1"))
        channel.exchange_bind(destination=after, source=name, routing_key=_pattern(level, "0"))


def bind_target(channel: BlockingChannel, queue: str) -> None:
    """Bind ``queue`` to the exit exchange so delayed messages for it (and only those) arrive
    there; remove the first version's binding, which matched every delayed message."""
    channel.queue_bind(queue, DELIVER_EXCHANGE, routing_key="",
                       arguments={"x-match": "all", TARGET_HEADER: queue})
    channel.queue_unbind(queue, DELIVER_EXCHANGE, routing_key="",
                         arguments={"x-match": "all", LEGACY_TARGET_HEADER: queue})


def browse(channel: BlockingChannel, targets: Collection[str], *,
           remove: bool = False) -> list[tuple[pika.BasicProperties, bytes]]:
    """The messages waiting in the delay levels for a queue in ``targets``, as
    ``(properties, body)`` pairs (routing headers still in place), most delayed level first.

    ``remove=True`` deletes them (acknowledges them) as well. Every other message is returned to its level when the caller closes
    ``channel``, which must be a channel of its own, without publisher confirms; the caller
    holds :data:`BROWSE_LOCK`. A level that was never declared counts as empty. Raises pika's
    errors.
    """
    wanted = set(targets)
    found: list[tuple[pika.BasicProperties, bytes]] = []
    for level in reversed(range(LEVELS)):
        name = level_name(level)
        try:
            waiting = channel.queue_declare(name, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            return found  # the topology was never declared: nothing waits
        for _ in range(int(waiting)):
            method, properties, body = channel.basic_get(name, auto_ack=False)
            if method is None:
                break
            headers = properties.headers or {}
            target = headers.get(TARGET_HEADER, headers.get(LEGACY_TARGET_HEADER))
            if target not in wanted:
                continue
            if remove:
                channel.basic_ack(method.delivery_tag)
            found.append((properties, body or b""))
    return found
