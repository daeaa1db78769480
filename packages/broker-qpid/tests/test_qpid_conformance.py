"""The broker conformance kit against RabbitMQ's AMQP 1.0 plugin."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from celeriac.testing.broker_kit import BrokerConformance
from qpid_support import connected_broker

from celeriac_qpid import QpidBroker


class TestQpidConformance(BrokerConformance):
    """Every SPI test of the kit, plus the capabilities QpidBroker declares."""

    @pytest.fixture
    def broker(self, qpid_url: str) -> Iterator[QpidBroker]:
        with connected_broker(qpid_url, {}) as b:
            yield b

    @pytest.fixture
    def make_broker(self, qpid_url: str) -> Callable[[], QpidBroker]:
        return lambda: QpidBroker(qpid_url, {})
