"""Broker URLs as Celery parses them, turned into pika connection parameters.

``amqp://user:password@host:port/vhost``: the virtual host is the path after the first slash,
so ``amqp://guest@localhost:5672//`` means vhost ``/`` and ``amqp://u:p@h/vh`` means ``vh``
(``%2F`` is unquoted). A missing user or password is ``guest``. Schemes ``amqp`` and
``pyamqp`` are plain TCP (port 5672), ``amqps`` is TLS (port 5671). Several URLs separated by
``;`` are failover alternates, tried in order.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pika

__all__ = ["SCHEMES", "AMQPAddress", "connection_parameters", "parse_url"]

SCHEMES = ("amqp", "amqps", "pyamqp")
DEFAULT_PORTS = {"amqp": 5672, "pyamqp": 5672, "amqps": 5671}


@dataclass(frozen=True, slots=True)
class AMQPAddress:
    """One broker address parsed from a URL."""

    scheme: str
    host: str
    port: int
    user: str
    password: str
    vhost: str
    query: tuple[tuple[str, str], ...] = ()

    @property
    def tls(self) -> bool:
        """True for ``amqps``."""
        return self.scheme == "amqps"


def _parse_one(url: str) -> AMQPAddress:
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"Not an AMQP URL (expected amqp://, amqps:// or pyamqp://): {url!r}")
    # Parse with HTTP semantics, as Celery does, so the vhost keeps a leading slash of its own.
    parts = urlsplit("http://" + rest)
    path = parts.path or ""
    path = path.removeprefix("/")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"Invalid port in AMQP URL: {exc}") from None
    return AMQPAddress(
        scheme=scheme,
        host=unquote(parts.hostname or "") or "localhost",
        port=port or DEFAULT_PORTS[scheme],
        user=unquote(parts.username or "") or "guest",
        password=unquote(parts.password or "") or "guest",
        vhost=unquote(path) or "/",
        query=tuple(parse_qsl(parts.query)),
    )


def parse_url(url: str) -> list[AMQPAddress]:
    """Parse ``url`` (possibly several, separated by ``;``) into addresses.

    Raises ``ValueError`` for a URL that is not AMQP.
    """
    urls = [u.strip() for u in url.split(";") if u.strip()]
    if not urls:
        raise ValueError("Empty AMQP URL.")
    return [_parse_one(u) for u in urls]


def _ssl_options(address: AMQPAddress, use_ssl: Any) -> pika.SSLOptions:
    if isinstance(use_ssl, ssl.SSLContext):
        return pika.SSLOptions(use_ssl, address.host)
    options: Mapping[str, Any] = use_ssl if isinstance(use_ssl, Mapping) else {}
    context = ssl.create_default_context(cafile=options.get("ca_certs"))
    if options.get("certfile"):
        context.load_cert_chain(options["certfile"], options.get("keyfile"))
    cert_reqs = options.get("cert_reqs", ssl.CERT_REQUIRED)
    if cert_reqs == ssl.CERT_NONE:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return pika.SSLOptions(context, options.get("server_hostname") or address.host)


def _heartbeat(conf: Mapping[str, Any], address: AMQPAddress) -> int:
    query = dict(address.query)
    value = query.get("heartbeat", conf.get("broker_heartbeat"))
    if value is None:
        return 120
    return max(0, int(float(value)))


def connection_parameters(address: AMQPAddress, conf: Mapping[str, Any]) -> pika.ConnectionParameters:
    """Build pika's parameters for ``address`` from the app's settings.

    Settings read: ``broker_heartbeat`` (120 s; 0 disables), ``broker_connection_timeout`` (4 s),
    ``broker_use_ssl`` (True, an ``ssl.SSLContext`` or a dict with ``ca_certs``, ``certfile``,
    ``keyfile``, ``cert_reqs``, ``server_hostname``; only used with ``amqps``, which turns TLS on
    by itself).
    """
    timeout = conf.get("broker_connection_timeout")
    timeout = 4.0 if timeout is None else float(timeout)
    ssl_options = None
    if address.tls:
        ssl_options = _ssl_options(address, conf.get("broker_use_ssl") or True)
    return pika.ConnectionParameters(
        host=address.host,
        port=address.port,
        virtual_host=address.vhost,
        credentials=pika.PlainCredentials(address.user, address.password),
        heartbeat=_heartbeat(conf, address),
        socket_timeout=timeout,
        stack_timeout=max(timeout * 2, 5.0),
        blocked_connection_timeout=None,
        connection_attempts=1,
        ssl_options=ssl_options,
        client_properties={"connection_name": "celeriac", "product": "celeriac"},
    )
