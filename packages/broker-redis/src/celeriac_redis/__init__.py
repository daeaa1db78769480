"""Redis broker and result backend for Celeriac, sharing kombu's and Celery's Redis layouts.

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "RedisBackend": "celeriac_redis.backend",
    "RedisBroker": "celeriac_redis.broker",
}

__all__ = ["RedisBackend", "RedisBroker", "__version__"]

if TYPE_CHECKING:
    from celeriac_redis.backend import RedisBackend
    from celeriac_redis.broker import RedisBroker


def __getattr__(name: str) -> Any:
    """Load ``name`` from its module on first access. Raises ``AttributeError`` for others."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'celeriac_redis' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
