"""The built-in broker, backends and pools, registered through the same hooks a plugin uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celeriac.plugins.hookspecs import hookimpl


def _memory_broker(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac.broker.memory import MemoryBroker

    return MemoryBroker(url, conf)


def _sqlite_broker(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac.broker.sqlite import SQLiteBroker

    return SQLiteBroker(url, conf)


def _memory_backend(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac.backends.memory import MemoryBackend

    return MemoryBackend(url, conf)


def _sqlite_backend(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac.backends.sqlite import SQLiteBackend

    return SQLiteBackend(url, conf)


def _solo_pool(**kwargs: Any) -> Any:
    from celeriac.worker.pool import SoloPool

    return SoloPool(**kwargs)


def _threads_pool(**kwargs: Any) -> Any:
    from celeriac.worker.pool import ThreadPool

    return ThreadPool(**kwargs)


@hookimpl
def celeriac_brokers() -> Mapping[str, Callable[..., Any]]:
    """``memory://`` (one process, for tests) and ``sqlite://`` (embedded default)."""
    return {"memory": _memory_broker, "sqlite": _sqlite_broker}


@hookimpl
def celeriac_result_backends() -> Mapping[str, Callable[..., Any]]:
    """``memory://`` and ``sqlite:///path``."""
    return {"memory": _memory_backend, "sqlite": _sqlite_backend}


@hookimpl
def celeriac_pools() -> Mapping[str, Callable[..., Any]]:
    """``solo`` (one task at a time in the consumer's process) and ``threads``."""
    return {"solo": _solo_pool, "threads": _threads_pool}
