"""Shared fixtures: the live RabbitMQ URL, skipping cleanly when it is not running."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from celeriac.testing.process import require_server, server_reachable

from celeriac_amqp import AMQPBroker

AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672//")


def _reachable(url: str) -> bool:
    return server_reachable(url, 5672)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The RabbitMQ URL under test (skips, or fails with CELERIAC_REQUIRE_BROKERS=1)."""
    return require_server("RabbitMQ", AMQP_URL, 5672, "CELERIAC_TEST_AMQP_URL")


@pytest.fixture
def broker(amqp_url: str) -> Iterator[AMQPBroker]:
    """A connected broker, closed after the test."""
    b = AMQPBroker(amqp_url, {})
    b.connect()
    yield b
    b.close()


@pytest.fixture
def restart_rabbitmq(amqp_url: str) -> Iterator[Callable[[], None]]:
    """A function that restarts the local RabbitMQ application (``rabbitmqctl stop_app`` then
    ``start_app``); RabbitMQ is running again after the test whatever happened."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")

    def restart() -> None:
        try:
            subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        finally:
            ensure_rabbitmq_running()

    try:
        yield restart
    finally:
        ensure_rabbitmq_running()


def rabbitmq_running() -> bool:
    """True when the local RabbitMQ application accepts AMQP connections."""
    return _reachable(AMQP_URL)


def ensure_rabbitmq_running(timeout: float = 60.0) -> None:
    """Start the RabbitMQ application if a test stopped it, and wait until it accepts clients."""
    deadline = time.monotonic() + timeout
    subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=timeout, check=False)
    while time.monotonic() < deadline:
        if rabbitmq_running():
            return
        time.sleep(0.2)
    raise RuntimeError("RabbitMQ did not come back")
