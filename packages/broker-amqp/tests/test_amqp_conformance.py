"""The broker conformance kit against the live RabbitMQ."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from celeriac.testing.broker_kit import BrokerConformance

from celeriac_amqp import AMQPBroker


class TestAMQPConformance(BrokerConformance):
    """Every SPI test of the kit, plus the capabilities AMQPBroker declares."""

    @pytest.fixture
    def broker(self, amqp_url: str) -> Iterator[AMQPBroker]:
        b = AMQPBroker(amqp_url, {})
        b.connect()
        yield b
        b.close()

    @pytest.fixture
    def make_broker(self, amqp_url: str) -> Callable[[], AMQPBroker]:
        return lambda: AMQPBroker(amqp_url, {})
