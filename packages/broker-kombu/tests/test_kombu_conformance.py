"""The broker conformance kit from ``celeriac.testing`` on kombu's filesystem and SQLAlchemy
(PostgreSQL) transports."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from celeriac.broker.base import BROADCAST, QUEUE_SIZE, REPLY_QUEUES
from celeriac.testing.broker_kit import BrokerConformance
from celeriac_kombu import KombuBroker


class TestFilesystem(BrokerConformance):
    """``kombu+filesystem:///tmp/...``: fanout through kombu's control folder."""

    receive_timeout = 20.0  # a commit or file per message: slow on a busy machine

    @pytest.fixture
    def broker(self, filesystem_url: str) -> Iterator[KombuBroker]:
        b = KombuBroker(filesystem_url, {})
        b.connect()
        yield b
        b.close()

    @pytest.fixture
    def make_broker(self, filesystem_url: str) -> Callable[[], KombuBroker]:
        return lambda: KombuBroker(filesystem_url, {})

    def test_capabilities_as_kombu_reports_them(self, broker: KombuBroker) -> None:
        assert broker.capabilities == {BROADCAST, QUEUE_SIZE, REPLY_QUEUES}


class TestSQLAlchemyPostgres(BrokerConformance):
    """``kombu+sqla+postgresql://``: no fanout in kombu's SQLAlchemy transport."""

    receive_timeout = 30.0  # a commit or file per message: slow on a busy machine

    @pytest.fixture
    def broker(self, sqla_url: str) -> Iterator[KombuBroker]:
        b = KombuBroker(sqla_url, {})
        b.connect()
        yield b
        b.close()

    @pytest.fixture
    def make_broker(self, sqla_url: str) -> Callable[[], KombuBroker]:
        return lambda: KombuBroker(sqla_url, {})

    def test_capabilities_as_kombu_reports_them(self, broker: KombuBroker) -> None:
        assert broker.capabilities == {QUEUE_SIZE, REPLY_QUEUES}


class TestZookeeper(BrokerConformance):
    """``kombu+zookeeper://``: kazoo's queue recipe; no fanout."""

    receive_timeout = 30.0  # a commit or file per message: slow on a busy machine

    @pytest.fixture
    def broker(self, zookeeper_url: str) -> Iterator[KombuBroker]:
        b = KombuBroker(zookeeper_url, {})
        b.connect()
        yield b
        b.close()

    @pytest.fixture
    def make_broker(self, zookeeper_url: str) -> Callable[[], KombuBroker]:
        return lambda: KombuBroker(zookeeper_url, {})

    def test_capabilities_as_kombu_reports_them(self, broker: KombuBroker) -> None:
        assert broker.capabilities == {QUEUE_SIZE, REPLY_QUEUES}

    def test_large_binary_body(self) -> None:  # type: ignore[override]
        pytest.skip("Zookeeper keeps a message in one znode, at most jute.maxbuffer (1 MiB by default); "
                    "the kit's 1 MiB body is about 1.4 MiB once kombu base64-encodes it")
