"""Redis clients from Celery-style URLs, and one-line descriptions of connection errors.

Supported URLs (the same forms Celery accepts):

``redis://[[user]:password@]host[:port][/db]``   plain TCP
``rediss://...``                                  TLS (``?ssl_cert_reqs=required|optional|none``
                                                  ``&ssl_ca_certs=/path/ca.pem``: see below)
``redis+socket:///path/to/redis.sock[?virtual_host=db]``  unix socket (``db=`` also accepted)
``sentinel://[:password@]host:port[/db][;sentinel://host:port...]``  Sentinel; the master name
                                                  comes from the ``master_name`` transport option

TLS verifies the server's certificate and host name by default (``ssl_cert_reqs=required``),
against the system's CAs unless ``ssl_ca_certs`` names a CA file. The TLS options come from the
URL query or from ``broker_use_ssl`` / ``redis_backend_use_ssl`` (Celery's names: ``ssl_cert_reqs``,
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``, ...); a non-empty
``*_use_ssl`` turns TLS on for a ``redis://`` URL too, as in Celery.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celeriac.broker.base import mask_url

__all__ = ["TRANSIENT_ERRORS", "RedisURL", "describe_error", "is_fatal", "make_client", "parse_url", "safe_url"]

#: Errors after which a retry may succeed (the server restarts, a failover happens ...).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.InvalidResponse,  # not a Redis on that port (yet): retried, one log line
    OSError,
)

_CERT_REQS = {
    "required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL, "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE,
}


def safe_url(url: str) -> str:
    """``url`` with every password masked, including each URL of a ``;``-separated list (Sentinel,
    failover); a part that cannot be parsed is hidden whole."""
    parts = []
    for part in url.split(";"):
        try:
            parts.append(mask_url(part))
        except ValueError:  # e.g. a port that is not a number
            parts.append(part.split("://", 1)[0] + "://**")
    return ";".join(parts)


@dataclass
class RedisURL:
    """A parsed broker/backend URL."""

    scheme: str
    url: str = ""
    host: str = "localhost"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    socket_path: str | None = None
    ssl: bool = False
    sentinels: list[tuple[str, int]] = field(default_factory=list)
    query: dict[str, str] = field(default_factory=dict)


def _db_from(path: str, query: Mapping[str, str]) -> int:
    raw = query.get("virtual_host") or query.get("db") or path.strip("/") or "0"
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"The Redis database must be a number, got {raw!r}.") from None


def parse_url(url: str) -> RedisURL:
    """Parse a ``redis``/``rediss``/``redis+socket``/``sentinel`` URL.

    Raises ``ValueError`` with a one-line reason for a URL that cannot work.
    """
    first = url.split(";", 1)[0]
    parts = urlsplit(first)
    scheme = parts.scheme.lower()
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if scheme == "redis+socket":
        path = parts.path
        if not path:
            raise ValueError(f"{safe_url(url)}: a redis+socket URL needs a socket path.")
        return RedisURL(scheme, url, socket_path=path, db=_db_from("", query), username=username,
                        password=password, query=query)
    if scheme == "sentinel":
        sentinels = []
        db = _db_from(parts.path, query)
        for item in url.split(";"):
            item = item.strip()
            if not item:
                continue
            sub = urlsplit(item)
            password = password or (unquote(sub.password) if sub.password else None)
            sentinels.append((sub.hostname or "localhost", sub.port or 26379))
        return RedisURL(scheme, url, db=db, username=username, password=password,
                        sentinels=sentinels, query=query)
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"{safe_url(url)}: unsupported scheme {scheme!r} for the Redis plugin.")
    return RedisURL(scheme, url, host=parts.hostname or "localhost", port=parts.port or 6379,
                    db=_db_from(parts.path, query), username=username, password=password,
                    ssl=scheme == "rediss", query=query)


#: TLS settings read from ``broker_use_ssl`` / ``redis_backend_use_ssl`` and from the URL query,
#: under Celery's names; the names without ``ssl_`` (the AMQP spelling) are accepted too.
_SSL_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname",
             "ssl_ca_path", "ssl_ca_data", "ssl_password", "ssl_ciphers", "ssl_min_version")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _ssl_kwargs(parsed: RedisURL, ssl_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """redis-py's ``SSLConnection`` arguments. Certificates are verified (against the system CAs
    unless ``ssl_ca_certs`` is given) and so is the host name, unless ``ssl_cert_reqs`` says
    otherwise. Raises ``ValueError`` for an unknown key or value."""
    given: dict[str, Any] = {}
    for key, value in (ssl_options or {}).items():
        name = key if key.startswith("ssl_") else f"ssl_{key}"
        if name not in _SSL_KEYS:
            raise ValueError(
                f"{safe_url(parsed.url)}: unknown TLS option {key!r}; known: {', '.join(_SSL_KEYS)}.")
        given[name] = value
    for name in _SSL_KEYS:  # the URL query wins, as in Celery
        if name in parsed.query and name != "ssl_password":
            given[name] = parsed.query[name]
    kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    reqs = kwargs.get("ssl_cert_reqs", ssl.CERT_REQUIRED)
    if isinstance(reqs, str):
        if reqs.lower() not in _CERT_REQS:
            raise ValueError(f"{safe_url(parsed.url)}: ssl_cert_reqs must be required, optional or none, "
                             f"got {reqs!r}.")
        reqs = _CERT_REQS[reqs.lower()]
    kwargs["ssl_cert_reqs"] = reqs
    check = kwargs.get("ssl_check_hostname", reqs != ssl.CERT_NONE)
    if isinstance(check, str):
        if check.lower() not in _TRUE | _FALSE:
            raise ValueError(f"{safe_url(parsed.url)}: ssl_check_hostname must be true or false, "
                             f"got {check!r}.")
        check = check.lower() in _TRUE
    kwargs["ssl_check_hostname"] = bool(check) and reqs != ssl.CERT_NONE
    return kwargs


def make_client(url: str, options: Mapping[str, Any] | None = None,
                ssl_options: Mapping[str, Any] | None = None) -> redis.Redis:
    """Create a :class:`redis.Redis` with its own connection pool for ``url``.

    ``options`` are transport options (``socket_timeout``, ``socket_connect_timeout``,
    ``health_check_interval``, ``max_connections``, ``master_name``, ``sentinel_kwargs``).
    Connecting is lazy. redis-py retries a command once on a dropped connection (so a restarted
    server is reconnected transparently); longer outages are retried by the caller.
    """
    opts = dict(options or {})
    parsed = parse_url(url)
    common: dict[str, Any] = {
        "db": parsed.db,
        "username": parsed.username,
        "password": parsed.password,
        "socket_timeout": opts.get("socket_timeout", 30.0),
        "socket_connect_timeout": opts.get("socket_connect_timeout", 5.0),
        "socket_keepalive": opts.get("socket_keepalive", True),
        "health_check_interval": int(opts.get("health_check_interval", 25)),
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [redis.ConnectionError],
    }
    if parsed.scheme == "sentinel":
        from redis.sentinel import Sentinel

        master_name = opts.get("master_name")
        if not master_name:
            raise ValueError(
                f"{safe_url(url)}: a sentinel:// URL needs the master_name transport option, e.g. "
                "broker_transport_options={'master_name': 'mymaster'} (and the same in "
                "result_backend_transport_options for results)."
            )
        if ssl_options:
            common.update(ssl=True, **_ssl_kwargs(parsed, ssl_options))
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            parsed.sentinels, sentinel_kwargs=opts.get("sentinel_kwargs") or {},
            socket_timeout=common["socket_timeout"])
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            str(master_name), redis_class=redis.Redis, **common)
        return master
    if parsed.socket_path is not None:
        common.pop("socket_keepalive")  # TCP only
        pool: redis.ConnectionPool = _make_pool(
            opts.get("max_connections"), connection_class=redis.UnixDomainSocketConnection,
            path=parsed.socket_path, **common)
        return redis.Redis(connection_pool=pool)
    use_tls = parsed.ssl or bool(ssl_options)  # as in Celery, *_use_ssl turns TLS on for redis://
    extra = _ssl_kwargs(parsed, ssl_options) if use_tls else {}
    conn_class = redis.SSLConnection if use_tls else redis.Connection
    pool = _make_pool(opts.get("max_connections"), connection_class=conn_class, host=parsed.host,
                      port=parsed.port, **common, **extra)
    return redis.Redis(connection_pool=pool)


def _make_pool(max_connections: Any, **kwargs: Any) -> redis.ConnectionPool:
    """redis-py's pool raises ``MaxConnectionsError`` past ``max_connections`` (100 by default
    in redis-py 8). In a process that gevent or eventlet patched, a thousand greenlets may want
    a connection at once: there a blocking pool (100 unless set) makes them wait for a free one
    instead of failing."""
    if socket.socket.__module__.partition(".")[0] in ("gevent", "eventlet"):
        return redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
            max_connections=int(max_connections or 100), **kwargs)
    return redis.ConnectionPool(max_connections=max_connections, **kwargs)


def _tls_failure(exc: BaseException) -> str | None:
    """The verification failure inside ``exc`` (redis-py wraps ``ssl`` errors in its own), or None."""
    text = str(exc)
    for marker in ("certificate verify failed", "Hostname mismatch", "doesn't match", "not valid for"):
        if marker in text:
            found = text.split("] ", 1)[-1] if "] " in text else text
            return found.split(" (_ssl.c", 1)[0].rstrip(". ")
    return None


def is_fatal(exc: BaseException) -> bool:
    """True for errors retrying cannot fix: the server's certificate was refused, or the login."""
    return _tls_failure(exc) is not None or isinstance(exc, redis.AuthenticationError)


def describe_error(exc: BaseException, url: str) -> str:
    """One line saying why ``url`` cannot be used and what to do, with the password masked."""
    where = safe_url(url)
    text = str(exc)
    tls = urlsplit(url.split(";", 1)[0]).scheme.lower() == "rediss"
    failure = _tls_failure(exc)
    if failure is not None:
        reason = (f"the server's TLS certificate was refused ({failure}). Give the CA that signed it "
                  "as ssl_ca_certs (in the URL query, or in broker_use_ssl / redis_backend_use_ssl) and "
                  "use a host name the certificate lists; ssl_cert_reqs=none turns verification off")
    elif isinstance(exc, redis.AuthenticationError) or ("AUTH" in text.upper() and
            "password" in text.lower()):
        reason = f"authentication failed ({exc}); check the user name and password in the URL"
    elif isinstance(exc, redis.exceptions.ResponseError) and "NOAUTH" in text:
        reason = "the server requires a password; put it in the URL"
    elif isinstance(exc, (redis.exceptions.InvalidResponse,)) or "Protocol error" in text:
        reason = f"the server does not speak the Redis protocol ({exc}); wrong port?"
    elif isinstance(exc, ssl.SSLError) or "SSL" in text:
        reason = f"TLS failed ({exc}); is that port serving TLS?"
    elif isinstance(exc, redis.exceptions.BusyLoadingError):
        reason = "the server is loading its dataset"
    elif tls and isinstance(exc, redis.TimeoutError):
        reason = f"{exc} (is that port serving TLS? rediss:// needs a TLS port)"
    elif not tls and "reset by peer" in text:
        reason = f"{exc} (if the server only serves TLS there, use rediss://)"
    else:
        reason = text or type(exc).__name__
    return f"Cannot use Redis at {where}: {reason}"
