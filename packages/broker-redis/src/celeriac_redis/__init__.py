"""Redis broker and result backend for Celeriac, sharing kombu's and Celery's Redis layouts.

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celeriac.plugins import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "RedisBackend": "celeriac_redis.backend",
    "RedisBroker": "celeriac_redis.broker",
}

__all__ = ["RedisBackend", "RedisBroker", "__version__"]

if TYPE_CHECKING:
    from celeriac_redis.backend import RedisBackend
    from celeriac_redis.broker import RedisBroker


__getattr__ = lazy_exports(__name__, _LAZY)
