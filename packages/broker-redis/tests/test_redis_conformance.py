"""The broker and backend conformance kits from ``celeriac.testing`` against the live Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celeriac.testing.backend_kit import BackendConformance
from celeriac.testing.broker_kit import BrokerConformance
from celeriac_redis import RedisBackend, RedisBroker


class TestRedisBroker(BrokerConformance):
    """Default options: kombu's priority order, native delay on."""

    @pytest.fixture
    def broker(self, redis_url: str, broker_conf: Callable[..., dict[str, Any]]) -> Iterator[RedisBroker]:
        b = RedisBroker(redis_url, broker_conf())
        b.connect()
        yield b
        b.close()

    @pytest.fixture
    def make_broker(self, redis_url: str,
                    broker_conf: Callable[..., dict[str, Any]]) -> Callable[[], RedisBroker]:
        return lambda: RedisBroker(redis_url, broker_conf())


class TestRedisBrokerHighFirst(TestRedisBroker):
    """``priority_order='high_first'`` declares the ``priority`` capability (RabbitMQ's order)."""

    @pytest.fixture
    def broker(self, redis_url: str, broker_conf: Callable[..., dict[str, Any]]) -> Iterator[RedisBroker]:
        b = RedisBroker(redis_url, broker_conf(priority_order="high_first"))
        b.connect()
        yield b
        b.close()

    def test_declares_priority(self, broker: RedisBroker) -> None:
        assert broker.has("priority")


# Run only the priority-related test of the kit a second time, with the other order.
for _name in dir(BrokerConformance):
    if _name.startswith("test_") and _name not in ("test_priority_higher_first_then_fifo",
                                                   "test_capabilities_are_known_names"):
        setattr(TestRedisBrokerHighFirst, _name, None)


class TestRedisBackend(BackendConformance):
    """Celery's Redis result layout."""

    @pytest.fixture
    def backend(self, redis_url: str, broker_conf: Callable[..., dict[str, Any]]) -> Iterator[RedisBackend]:
        b = RedisBackend(redis_url, broker_conf())
        yield b
        b.close()

    @pytest.fixture
    def make_backend(self, redis_url: str,
                     broker_conf: Callable[..., dict[str, Any]]) -> Callable[[], RedisBackend]:
        return lambda: RedisBackend(redis_url, broker_conf())
