"""Fixtures: the live Redis (``CELERIAC_TEST_REDIS_URL``, default db 9) and per-test key prefixes.

Tests skip with a clear reason when Redis is down, unless ``CELERIAC_REQUIRE_BROKERS=1``. Each
test works under its own ``global_keyprefix`` and deletes only the keys under it afterwards.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

# pytest runs with --import-mode=importlib: make the helper module importable by the tests.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redis_support import REDIS_URL, delete_prefixed, redis_up


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis URL; skips (or fails with CELERIAC_REQUIRE_BROKERS=1) when it is down."""
    if not redis_up():
        if os.environ.get("CELERIAC_REQUIRE_BROKERS") == "1":
            pytest.fail(f"Redis is not reachable at {REDIS_URL} and CELERIAC_REQUIRE_BROKERS=1")
        pytest.skip(f"Redis is not reachable at {REDIS_URL} (set CELERIAC_TEST_REDIS_URL)")
    return REDIS_URL


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client on the test database."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix(raw: redis.Redis) -> Iterator[str]:
    """A fresh ``global_keyprefix`` for one test; its keys are deleted afterwards."""
    value = f"ct{uuid.uuid4().hex[:10]}_"
    yield value
    delete_prefixed(raw, value)


@pytest.fixture
def broker_conf(prefix: str) -> Callable[..., dict[str, Any]]:
    """Build a conf with this test's key prefix (broker and results) and extra transport options."""
    def make(**options: Any) -> dict[str, Any]:
        return {"broker_transport_options": {"global_keyprefix": prefix, **options},
                "result_backend_transport_options": {"global_keyprefix": prefix}}

    return make
