"""Redis broker and result backend for Celeriac, sharing kombu's and Celery's Redis layouts."""

from __future__ import annotations

from celeriac_redis.backend import RedisBackend
from celeriac_redis.broker import RedisBroker

__all__ = ["RedisBackend", "RedisBroker", "__version__"]

__version__ = "0.1.0"
