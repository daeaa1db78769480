"""Broker URLs and the address dialects that map Celeriac's queues and exchanges to AMQP 1.0
node addresses.

URL: ``qpid://user:password@host:port/vhost`` (also ``amqp10://``; ``qpids://`` and
``amqps10://`` for TLS, default port 5671). As with ``amqp://``, the virtual host is the path
after the first slash: ``qpid://guest:guest@localhost:5672//`` is vhost ``/``. Several URLs
separated by ``;`` are failover alternates, tried in order.

AMQP 1.0 has no queue or exchange declarations; a broker creates nodes from the address of a
link. The dialect (transport option ``address_dialect``) says how:

``rabbitmq`` (default; RabbitMQ's AMQP 1.0 plugin)
    queue ``NAME`` -> ``/queue/NAME`` (declared on attach; durable as the Queue says),
    an existing queue of unknown settings -> ``/amq/queue/NAME``,
    broadcasts, and messages for an exchange ``X`` with routing key ``K`` that no queue known
    here is bound to -> ``/topic/<X>.<K>`` on ``amq.topic`` (AMQP 1.0 cannot declare an exchange
    on RabbitMQ 3.x); a transient queue bound to such an exchange (a remote-control reply queue)
    is consumed from ``/topic/<X>.<binding key>`` (RabbitMQ gives the link an exclusive queue).
``plain`` (Qpid Broker-J, ActiveMQ Artemis, Azure Service Bus, Solace ...)
    queue ``NAME`` -> ``NAME``; exchange ``X`` -> address ``X`` with subject ``K``;
    broadcasts -> address ``X`` with the ``topic`` capability (multicast), routing key in the
    subject, patterns matched by the subscriber.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from celeriac.broker.base import mask_url
from celeriac.exceptions import ImproperlyConfigured

__all__ = [
    "DIALECTS",
    "SCHEMES",
    "Dialect",
    "Endpoint",
    "PlainDialect",
    "RabbitMQDialect",
    "Target",
    "dialect_from_conf",
    "parse_url",
    "topic_matches",
]

#: URL scheme -> TLS
SCHEMES: dict[str, bool] = {"qpid": False, "amqp10": False, "qpids": True, "amqps10": True}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One broker address parsed from a URL."""

    scheme: str
    host: str
    port: int
    user: str | None
    password: str | None
    vhost: str | None
    tls: bool

    @property
    def url(self) -> str:
        """The ``amqp://``/``amqps://`` URL proton connects to (no credentials)."""
        return f"{'amqps' if self.tls else 'amqp'}://{self.host}:{self.port}"


def _parse_one(url: str) -> Endpoint:
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ImproperlyConfigured(
            f"Not an AMQP 1.0 URL: {mask_url(url)} (expected qpid://, amqp10://, qpids:// or amqps10://).")
    parts = urlsplit("http://" + rest)
    try:
        port = parts.port
    except ValueError as exc:
        raise ImproperlyConfigured(f"Invalid port in {mask_url(url)}: {exc}") from None
    tls = SCHEMES[scheme]
    path = (parts.path or "").removeprefix("/")
    return Endpoint(
        scheme=scheme,
        host=unquote(parts.hostname or "") or "localhost",
        port=port or (5671 if tls else 5672),
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        vhost=unquote(path) or None,
        tls=tls,
    )


def parse_url(url: str) -> list[Endpoint]:
    """Parse ``url`` (several separated by ``;`` are failover alternates).

    Raises ``ImproperlyConfigured`` (password masked) for a URL that is not AMQP 1.0.
    """
    urls = [u.strip() for u in url.split(";") if u.strip()]
    if not urls:
        raise ImproperlyConfigured("Empty AMQP 1.0 broker URL.")
    return [_parse_one(u) for u in urls]


@dataclass(frozen=True, slots=True)
class Target:
    """Where a sender link points: the node address, whether the node is declared durable,
    the target capabilities, and whether deliveries are pre-settled (fire-and-forget); the
    subject and time to live its messages get."""

    address: str
    durable: bool = False
    capabilities: tuple[str, ...] = ()
    presettled: bool = False
    subject: str | None = field(default=None, compare=False)
    ttl: float | None = field(default=None, compare=False)


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: words split on ``.``, ``*`` is one word, ``#`` zero or more."""
    if pattern in ("#", key):
        return True
    return _match(pattern.split("."), key.split(".") if key else [])


def _match(pat: list[str], words: list[str]) -> bool:
    if not pat:
        return not words
    head = pat[0]
    if head == "#":
        return any(_match(pat[1:], words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(pat[1:], words[1:])


class Dialect:
    """How queue, exchange and broadcast names become AMQP 1.0 addresses. Stateless."""

    name = ""

    def virtual_host(self, endpoint: Endpoint) -> str | None:
        """The ``hostname`` of the Open frame (selects the virtual host), or None for the host."""
        return endpoint.vhost

    def queue(self, name: str) -> str:
        """Address of queue ``name``, created on attach where the broker does that."""
        raise NotImplementedError

    def existing_queue(self, name: str) -> str:
        """Address of an existing queue whose settings are unknown here."""
        return self.queue(name)

    def exchange(self, exchange: str, routing_key: str) -> tuple[str, str | None]:
        """Address (and message subject) for a message to ``exchange`` with ``routing_key``."""
        raise NotImplementedError

    def broadcast(self, exchange: str, routing_key: str) -> tuple[str, str | None, tuple[str, ...]]:
        """Address, subject and target capabilities of a broadcast."""
        raise NotImplementedError

    def subscription(self, exchange: str, pattern: str) -> tuple[str, str | None, tuple[str, ...]]:
        """Source address, the pattern the subscriber still has to match on the subject
        (None when the broker filters), and source capabilities."""
        raise NotImplementedError


def _seg(text: str) -> str:
    return quote(text, safe="")


def _word(text: str) -> str:
    """An exchange name as one topic word (``.`` -> ``_``, ``/`` -> ``|``)."""
    return text.replace(".", "_").replace("/", "|")


class RabbitMQDialect(Dialect):
    """RabbitMQ 3.x's AMQP 1.0 plugin (``/queue/``, ``/exchange/``, ``/topic/`` addresses)."""

    name = "rabbitmq"

    def virtual_host(self, endpoint: Endpoint) -> str | None:
        """``vhost:NAME``, RabbitMQ's way of naming the virtual host."""
        return f"vhost:{endpoint.vhost or '/'}"

    def queue(self, name: str) -> str:
        """``/queue/NAME``: RabbitMQ declares the queue on attach."""
        return f"/queue/{_seg(name)}"

    def existing_queue(self, name: str) -> str:
        """``/amq/queue/NAME``: an existing queue, whatever its settings."""
        return f"/amq/queue/{_seg(name)}"

    def exchange(self, exchange: str, routing_key: str) -> tuple[str, str | None]:
        """The broadcast address: named exchanges are emulated on ``amq.topic``."""
        # AMQP 1.0 cannot declare an exchange on RabbitMQ 3.x (and /exchange/X must exist):
        # named exchanges are emulated on amq.topic, as broadcasts are.
        return self.broadcast(exchange, routing_key)[:2]

    def broadcast(self, exchange: str, routing_key: str) -> tuple[str, str | None, tuple[str, ...]]:
        """``/topic/<exchange>.<routing key>`` on ``amq.topic``."""
        key = f"{_word(exchange)}.{routing_key}" if routing_key else _word(exchange)
        return f"/topic/{key}", routing_key or None, ()

    def subscription(self, exchange: str, pattern: str) -> tuple[str, str | None, tuple[str, ...]]:
        """``/topic/<exchange>.<pattern>``: RabbitMQ binds a queue of its own to ``amq.topic``."""
        return f"/topic/{_word(exchange)}.{pattern or '#'}", None, ()


class PlainDialect(Dialect):
    """Bare node names (Qpid Broker-J, ActiveMQ Artemis, Azure Service Bus, Solace)."""

    name = "plain"

    def virtual_host(self, endpoint: Endpoint) -> str | None:
        """The URL's virtual host (Broker-J selects one by it); none for ``/`` (the broker's
        host name goes in the Open frame then, as Service Bus and Artemis expect)."""
        return None if endpoint.vhost in (None, "/") else endpoint.vhost

    def queue(self, name: str) -> str:
        """The bare queue name."""
        return name

    def exchange(self, exchange: str, routing_key: str) -> tuple[str, str | None]:
        """Address ``exchange``, the routing key as the subject."""
        return exchange, routing_key or None

    def broadcast(self, exchange: str, routing_key: str) -> tuple[str, str | None, tuple[str, ...]]:
        """Address ``exchange`` with the ``topic`` (multicast) capability."""
        return exchange, routing_key or None, ("topic",)

    def subscription(self, exchange: str, pattern: str) -> tuple[str, str | None, tuple[str, ...]]:
        """Address ``exchange`` (``topic`` capability); the subscriber matches ``pattern``."""
        return exchange, (pattern or "#"), ("topic",)


DIALECTS: dict[str, type[Dialect]] = {"rabbitmq": RabbitMQDialect, "plain": PlainDialect}


def dialect_from_conf(conf: Mapping[str, Any], safe_url: str) -> Dialect:
    """The dialect named by ``broker_transport_options["address_dialect"]`` (default
    ``rabbitmq``). Raises ``ImproperlyConfigured`` naming the URL for an unknown name."""
    opts = conf.get("broker_transport_options") or {}
    name = str(opts.get("address_dialect") or "rabbitmq").lower()
    cls = DIALECTS.get(name)
    if cls is None:
        raise ImproperlyConfigured(
            f"Unknown AMQP 1.0 address dialect {name!r} for {safe_url}: set "
            f"broker_transport_options['address_dialect'] to one of {', '.join(sorted(DIALECTS))}.")
    return cls()
