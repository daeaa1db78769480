"""The broker conformance kit with the ``plain`` address dialect (bare node names).

No AMQP 1.0 broker that uses plain addresses can be installed on this project's machines (see
the README: Debian's ActiveMQ Classic is built without its AMQP transport; Artemis, Qpid
Broker-J and Qpid Dispatch are in none of the registries they reach). Two runs stand in:

- ``TestPlainDialectOnRabbitMQ``: the machine's RabbitMQ AMQP 1.0 plugin, which takes a bare
  address as a queue name. It checks the plain dialect's queue paths on a real server (bare
  queue addresses, the Open frame's host name for ``//``, purge, the outcomes, client-side
  routing to bound queues). RabbitMQ 3.x ignores the ``topic`` capability (a bare address is
  a queue there, so subscribers would compete for broadcasts): ``broadcast`` is taken out of
  this run's capabilities, and the plain broadcast path stays untested here.
- ``TestPlainDialectConformance``: every declared capability against the broker named by
  ``CELERIAC_TEST_QPID_PLAIN_URL`` (for instance ``qpid://artemis:artemis@localhost:5672//``
  for ActiveMQ Artemis); skipped, saying so, when the variable is not set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celeriac.broker.base import BROADCAST
from celeriac.testing.broker_kit import BrokerConformance
from celeriac.testing.process import require_server
from qpid_support import delete_queues

from celeriac_qpid import QpidBroker

PLAIN: dict[str, Any] = {"broker_transport_options": {"address_dialect": "plain"}}
PLAIN_URL = os.environ.get("CELERIAC_TEST_QPID_PLAIN_URL", "")


class TestPlainDialectOnRabbitMQ(BrokerConformance):
    """The kit's required tests and ``reply_queues``/``batch`` with bare addresses on RabbitMQ."""

    @staticmethod
    def _broker(url: str) -> QpidBroker:
        broker = QpidBroker(url, PLAIN)
        # RabbitMQ 3.x has no multicast for a bare address (see the module docstring)
        broker.capabilities = broker.capabilities - {BROADCAST}  # type: ignore[misc]
        return broker

    @pytest.fixture
    def broker(self, qpid_url: str) -> Iterator[QpidBroker]:
        b = self._broker(qpid_url)
        b.connect()
        assert b.dialect.name == "plain"
        yield b
        declared = list(b._declared)
        b.close()
        delete_queues(declared)

    @pytest.fixture
    def make_broker(self, qpid_url: str) -> Callable[[], QpidBroker]:
        return lambda: self._broker(qpid_url)


@pytest.fixture(scope="module")
def plain_url() -> str:
    """``CELERIAC_TEST_QPID_PLAIN_URL``; skips when it is not set (no such broker here)."""
    if not PLAIN_URL:
        pytest.skip("CELERIAC_TEST_QPID_PLAIN_URL is not set: no AMQP 1.0 broker with plain addresses "
                    "(Artemis, Qpid Broker-J, ActiveMQ Classic with its AMQP transport) to test against")
    return require_server("AMQP 1.0 broker (plain dialect)", PLAIN_URL, 5672, "CELERIAC_TEST_QPID_PLAIN_URL")


class TestPlainDialectConformance(BrokerConformance):
    """Every capability the plugin declares, on a broker with plain addresses."""

    @pytest.fixture
    def broker(self, plain_url: str) -> Iterator[QpidBroker]:
        b = QpidBroker(plain_url, PLAIN)
        b.connect()
        yield b
        b.close()

    @pytest.fixture
    def make_broker(self, plain_url: str) -> Callable[[], QpidBroker]:
        return lambda: QpidBroker(plain_url, PLAIN)
