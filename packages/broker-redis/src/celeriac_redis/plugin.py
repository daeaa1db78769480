"""Registers the Redis broker and result backend with Celeriac (entry point group ``celeriac``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celeriac.plugins import hookimpl

SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")


def _broker(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac_redis.broker import RedisBroker

    return RedisBroker(url, conf)


def _backend(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac_redis.backend import RedisBackend

    return RedisBackend(url, conf)


@hookimpl
def celeriac_brokers() -> Mapping[str, Callable[..., Any]]:
    """``redis``, ``rediss`` (TLS), ``redis+socket`` (unix socket) and ``sentinel`` brokers."""
    return dict.fromkeys(SCHEMES, _broker)


@hookimpl
def celeriac_result_backends() -> Mapping[str, Callable[..., Any]]:
    """The same schemes as result backends (Celery's Redis backend layout)."""
    return dict.fromkeys(SCHEMES, _backend)
