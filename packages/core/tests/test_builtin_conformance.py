"""The broker and backend conformance kits against the built-in memory:// and sqlite:// ones."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celeriac.backends.base import ResultBackend
from celeriac.backends.memory import MemoryBackend
from celeriac.backends.sqlite import SQLiteBackend
from celeriac.broker.base import Broker
from celeriac.broker.memory import MemoryBroker
from celeriac.broker.sqlite import SQLiteBroker
from celeriac.testing.backend_kit import BackendConformance
from celeriac.testing.broker_kit import BrokerConformance

SQLITE_CONF = {"broker_transport_options": {"visibility_timeout": 30}}


class TestMemoryBroker(BrokerConformance):
    @pytest.fixture
    def memory_url(self) -> str:
        return f"memory://kit-{uuid.uuid4().hex}"

    @pytest.fixture
    def broker(self, memory_url: str) -> Iterator[Broker]:
        broker = MemoryBroker(memory_url, {})
        yield broker
        broker.close()

    @pytest.fixture
    def make_broker(self, memory_url: str) -> Callable[[], Broker]:
        return lambda: MemoryBroker(memory_url, {})


class TestSQLiteBroker(BrokerConformance):
    @pytest.fixture
    def sqlite_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'broker.db'}"

    @pytest.fixture
    def broker(self, sqlite_url: str) -> Iterator[Broker]:
        broker = SQLiteBroker(sqlite_url, SQLITE_CONF)
        yield broker
        broker.close()

    @pytest.fixture
    def make_broker(self, sqlite_url: str) -> Callable[[], Broker]:
        return lambda: SQLiteBroker(sqlite_url, SQLITE_CONF)


class TestMemoryBackend(BackendConformance):
    @pytest.fixture
    def memory_url(self) -> str:
        return f"memory://kit-{uuid.uuid4().hex}"

    @pytest.fixture
    def backend(self, memory_url: str) -> Iterator[ResultBackend]:
        backend = MemoryBackend(memory_url, {})
        yield backend
        backend.close()

    @pytest.fixture
    def make_backend(self, memory_url: str) -> Callable[[], ResultBackend]:
        return lambda: MemoryBackend(memory_url, {})


class TestSQLiteBackend(BackendConformance):
    @pytest.fixture
    def sqlite_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'results.db'}"

    @pytest.fixture
    def backend(self, sqlite_url: str) -> Iterator[ResultBackend]:
        backend = SQLiteBackend(sqlite_url, {})
        yield backend
        backend.close()

    @pytest.fixture
    def make_backend(self, sqlite_url: str) -> Callable[[], ResultBackend]:
        return lambda: SQLiteBackend(sqlite_url, {})


def test_builtin_schemes_resolve_to_these_classes(tmp_path: Path) -> None:
    from celeriac.plugins import create_backend, create_broker

    brokers = [(create_broker(f"memory://{uuid.uuid4().hex}", {}), MemoryBroker),
               (create_broker(f"sqlite:///{tmp_path / 'b.db'}", {}), SQLiteBroker)]
    for broker, broker_cls in brokers:
        assert type(broker) is broker_cls
        broker.close()
    backends = [(create_backend(f"memory://{uuid.uuid4().hex}", {}), MemoryBackend),
                (create_backend(f"sqlite:///{tmp_path / 'r.db'}", {}), SQLiteBackend)]
    for backend, backend_cls in backends:
        assert type(backend) is backend_cls
        backend.close()


def test_memory_urls_are_separate_brokers() -> None:
    from celeriac.routing import Queue
    from celeriac.testing.broker_kit import make_message

    name = uuid.uuid4().hex
    one, same, other = (MemoryBroker(f"memory://{name}", {}), MemoryBroker(f"memory://{name}", {}),
                        MemoryBroker(f"memory://{name}-other", {}))
    queue = Queue("q")
    one.publish(make_message("x"), "", "q", queue=queue)
    assert other.queue_size("q") == 0
    assert same.queue_size("q") == 1
    consumer = same.consumer([queue], 1)
    assert [d.message.headers["kit"] for d in consumer.fetch(1, 1.0)] == ["x"]
    for broker in (one, same, other):
        broker.close()
