"""Redis clients from Celery-style URLs, and one-line descriptions of connection errors.

Supported URLs (the same forms Celery accepts):

``redis://[[user]:password@]host[:port][/db]``   plain TCP
``rediss://...``                                  TLS (``?ssl_cert_reqs=required|optional|none``)
``redis+socket:///path/to/redis.sock[?virtual_host=db]``  unix socket (``db=`` also accepted)
``sentinel://[:password@]host:port[/db][;sentinel://host:port...]``  Sentinel; the master name
                                                  comes from the ``master_name`` transport option
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

__all__ = ["TRANSIENT_ERRORS", "RedisURL", "describe_error", "make_client", "parse_url"]

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


@dataclass
class RedisURL:
    """A parsed broker/backend URL."""

    scheme: str
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
            raise ValueError(f"{mask_url(url)}: a redis+socket URL needs a socket path.")
        return RedisURL(scheme, socket_path=path, db=_db_from("", query), username=username,
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
        return RedisURL(scheme, db=db, username=username, password=password,
                        sentinels=sentinels, query=query)
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"{mask_url(url)}: unsupported scheme {scheme!r} for the Redis plugin.")
    return RedisURL(scheme, host=parts.hostname or "localhost", port=parts.port or 6379,
                    db=_db_from(parts.path, query), username=username, password=password,
                    ssl=scheme == "rediss", query=query)


def _ssl_kwargs(parsed: RedisURL, ssl_options: Mapping[str, Any] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"ssl": True}
    opts = dict(ssl_options or {})
    reqs = opts.pop("ssl_cert_reqs", None) or parsed.query.get("ssl_cert_reqs")
    if isinstance(reqs, str):
        reqs = _CERT_REQS.get(reqs.lower(), ssl.CERT_REQUIRED)
    if reqs is not None:
        kwargs["ssl_cert_reqs"] = reqs
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"):
        value = opts.pop(key, None) or parsed.query.get(key)
        if value is not None:
            kwargs[key] = value
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
                f"{mask_url(url)}: a sentinel:// URL needs the master_name transport option, e.g. "
                "broker_transport_options={'master_name': 'mymaster'} (and the same in "
                "result_backend_transport_options for results)."
            )
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
    extra = _ssl_kwargs(parsed, ssl_options) if parsed.ssl else {}
    conn_class = redis.SSLConnection if parsed.ssl else redis.Connection
    extra.pop("ssl", None)
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


def describe_error(exc: BaseException, url: str) -> str:
    """One line saying why ``url`` cannot be used, with the password masked."""
    where = mask_url(url)
    if isinstance(exc, redis.AuthenticationError) or ("AUTH" in str(exc).upper() and
            "password" in str(exc).lower()):
        reason = f"authentication failed ({exc}); check the password in the URL"
    elif isinstance(exc, redis.exceptions.ResponseError) and "NOAUTH" in str(exc):
        reason = "the server requires a password; put it in the URL"
    elif isinstance(exc, (redis.exceptions.InvalidResponse,)) or "Protocol error" in str(exc):
        reason = f"the server does not speak the Redis protocol ({exc}); wrong port?"
    elif isinstance(exc, ssl.SSLError) or "SSL" in str(exc):
        reason = f"TLS failed ({exc})"
    elif isinstance(exc, redis.exceptions.BusyLoadingError):
        reason = "the server is loading its dataset"
    else:
        reason = str(exc) or type(exc).__name__
    return f"Cannot use Redis at {where}: {reason}"
