"""Shared fixtures: the live RabbitMQ URL, skipping cleanly when it is not running.

``spawn_worker`` comes from the ``celeriac.testing`` pytest plugin.
"""

from __future__ import annotations

import os

import pytest
from celeriac.testing.process import require_server

AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672//")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The RabbitMQ URL under test (skips, or fails with CELERIAC_REQUIRE_BROKERS=1)."""
    return require_server("RabbitMQ", AMQP_URL, 5672, "CELERIAC_TEST_AMQP_URL")
