"""Broker URLs as Celery parses them, turned into pika connection parameters.

``amqp://user:password@host:port/vhost``: the virtual host is the path after the first slash,
so ``amqp://guest@localhost:5672//`` means vhost ``/`` and ``amqp://u:p@h/vh`` means ``vh``
(``%2F`` is unquoted). A missing user or password is ``guest``. Schemes ``amqp`` and
``pyamqp`` are plain TCP (port 5672), ``amqps`` is TLS (port 5671). Several URLs separated by
``;`` are failover alternates, tried in order.

TLS (``amqps``, or any scheme with ``broker_use_ssl`` set, as in Celery) verifies the server's
certificate and its host name by default, against the system's CAs unless ``ca_certs`` names a
CA file. Options come from ``broker_use_ssl`` (``ca_certs``, ``certfile``, ``keyfile``,
``cert_reqs``, ``server_hostname``, ``check_hostname``, ``ciphers``; the ``ssl_``-prefixed spellings
too) and from the URL query (``?ssl_ca_certs=...&ssl_cert_reqs=required``), the query winning.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pika
from celeriac.exceptions import ImproperlyConfigured

__all__ = ["SCHEMES", "AMQPAddress", "connection_parameters", "parse_url", "tls_failure"]

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
    #: False when the URL had no port (TLS turned on by ``broker_use_ssl`` then means 5671).
    port_given: bool = True

    @property
    def tls(self) -> bool:
        """True for ``amqps`` (``broker_use_ssl`` may turn TLS on for the other schemes)."""
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
        port_given=port is not None,
    )


def parse_url(url: str) -> list[AMQPAddress]:
    """Parse ``url`` (possibly several, separated by ``;``) into addresses.

    Raises ``ValueError`` for a URL that is not AMQP.
    """
    urls = [u.strip() for u in url.split(";") if u.strip()]
    if not urls:
        raise ValueError("Empty AMQP URL.")
    return [_parse_one(u) for u in urls]


_CERT_REQS = {
    "required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL, "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE,
}
_TLS_KEYS = ("ca_certs", "certfile", "keyfile", "cert_reqs", "server_hostname", "check_hostname",
             "ciphers")


def _tls_settings(address: AMQPAddress, use_ssl: Any) -> dict[str, Any]:
    """``broker_use_ssl`` (a mapping) overlaid with the URL's ``ssl_*`` query keys, under the
    names without ``ssl_``. Raises ``ImproperlyConfigured`` for an unknown key."""
    found: dict[str, Any] = {}
    sources = [("broker_use_ssl", use_ssl if isinstance(use_ssl, Mapping) else {}),
               ("the URL", {k: v for k, v in address.query if k.startswith("ssl_")})]
    for where, values in sources:
        for key, value in values.items():
            name = key.removeprefix("ssl_")
            if name not in _TLS_KEYS:
                raise ImproperlyConfigured(
                    f"Unknown TLS option {key!r} in {where} for {address.host}:{address.port}; "
                    f"known: {', '.join(_TLS_KEYS)}.")
            found[name] = value
    return found


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ImproperlyConfigured(f"TLS option {name} must be true or false, got {value!r}.")
        return lowered in ("1", "true", "yes", "on")
    return bool(value)


def _ssl_options(address: AMQPAddress, use_ssl: Any) -> pika.SSLOptions:
    if isinstance(use_ssl, ssl.SSLContext):
        return pika.SSLOptions(use_ssl, address.host)
    options = _tls_settings(address, use_ssl)
    cert_reqs = options.get("cert_reqs", ssl.CERT_REQUIRED)
    if isinstance(cert_reqs, str):
        if cert_reqs.lower() not in _CERT_REQS:
            raise ImproperlyConfigured(
                f"TLS option cert_reqs must be required, optional or none, got {cert_reqs!r}.")
        cert_reqs = _CERT_REQS[cert_reqs.lower()]
    try:
        context = ssl.create_default_context(cafile=options.get("ca_certs") or None)
        if options.get("certfile"):
            context.load_cert_chain(options["certfile"], options.get("keyfile") or None)
        if options.get("ciphers"):
            context.set_ciphers(options["ciphers"])
    except (OSError, ssl.SSLError) as exc:
        raise ImproperlyConfigured(
            f"Cannot load the TLS files for {address.host}:{address.port} "
            f"(ca_certs={options.get('ca_certs')!r}, certfile={options.get('certfile')!r}): {exc}") from None
    check = _flag(options.get("check_hostname", True), "check_hostname")
    context.check_hostname = check and cert_reqs != ssl.CERT_NONE
    context.verify_mode = ssl.VerifyMode(cert_reqs)
    return pika.SSLOptions(context, options.get("server_hostname") or address.host)


def tls_failure(exc: BaseException) -> str | None:
    """When ``exc`` (a pika or socket error, possibly nested) is a refused server certificate,
    one line saying why and what to do; else None."""
    current: Any = exc
    for _ in range(6):
        if current is None:
            break
        if isinstance(current, ssl.SSLCertVerificationError):
            reason = current.verify_message or str(current)
            return (f"the server's TLS certificate was refused ({reason}). Give the CA that signed it "
                    "as broker_use_ssl={'ca_certs': '/path/ca.pem'} (or ?ssl_ca_certs= in the URL) "
                    "and use a host name the certificate lists; cert_reqs=none turns verification off")
        inner = getattr(current, "exception", None)
        if not isinstance(inner, BaseException):
            args = getattr(current, "args", ())
            inner = next((a for a in args if isinstance(a, BaseException)), None)
        current = inner if isinstance(inner, BaseException) else current.__cause__ or current.__context__
    return None


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
    ``keyfile``, ``cert_reqs``, ``server_hostname``, ``check_hostname``, ``ciphers``; setting it
    turns TLS on for ``amqp://`` too, on port 5671 unless the URL names one, as in Celery).
    Raises ``ImproperlyConfigured`` for a TLS option that cannot work.
    """
    timeout = conf.get("broker_connection_timeout")
    timeout = 4.0 if timeout is None else float(timeout)
    ssl_options = None
    use_ssl = conf.get("broker_use_ssl")
    port = address.port
    if address.tls or use_ssl:
        ssl_options = _ssl_options(address, use_ssl or True)
        if not address.port_given:
            port = DEFAULT_PORTS["amqps"]
    return pika.ConnectionParameters(
        host=address.host,
        port=port,
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
