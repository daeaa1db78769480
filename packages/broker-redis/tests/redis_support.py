"""Helpers shared by the Redis plugin's tests (the live server, waiting, restarting)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import redis

REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS_URL", "redis://localhost:6379/9")


def redis_up(url: str = REDIS_URL) -> bool:
    """True when a Redis answers PING at ``url``."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except (redis.RedisError, OSError):
        return False


def delete_prefixed(client: redis.Redis, prefix: str) -> None:
    """Delete the keys under ``prefix`` (never anything else)."""
    for key in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(key)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1",
               "--port", "6379", "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
               "--logfile", "/var/log/redis/ci.log"]


def ensure_redis_running(timeout: float = 20.0) -> None:
    """Start the machine's Redis if it is down (used after restart tests)."""
    if redis_up():
        return
    subprocess.run(REDIS_START, check=False, capture_output=True)
    wait_for(redis_up, timeout, "Redis to come back")
