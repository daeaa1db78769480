"""Shared fixtures: the live AMQP 1.0 broker (RabbitMQ's AMQP 1.0 plugin), skipping cleanly when
it is not running, and removal of the queues a test created."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from celeriac.testing.process import require_server

# pytest runs with --import-mode=importlib: make the helper module importable by the tests.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qpid_support import (
    QPID_URL,
    delete_leaked_subscriptions,
    delete_queues,
    ensure_rabbitmq_running,
)

from celeriac_qpid import QpidBroker


@pytest.fixture(scope="session")
def qpid_url() -> Iterator[str]:
    """The AMQP 1.0 URL under test (skips, or fails with CELERIAC_REQUIRE_BROKERS=1). At the end
    of the session, the subscription queues RabbitMQ 3.x kept are deleted."""
    yield require_server("RabbitMQ (AMQP 1.0)", QPID_URL, 5672, "CELERIAC_TEST_QPID_URL")
    if shutil.which("rabbitmqctl") is not None:
        delete_leaked_subscriptions()


@pytest.fixture
def broker(qpid_url: str) -> Iterator[QpidBroker]:
    """A connected broker; the queues declared through it are deleted after the test."""
    b = QpidBroker(qpid_url, {})
    b.connect()
    yield b
    declared = list(b._declared)
    b.close()
    delete_queues(declared)


@pytest.fixture
def restart_rabbitmq(qpid_url: str) -> Iterator[Callable[[float], None]]:
    """``restart(pause)``: ``rabbitmqctl stop_app``, wait ``pause`` s, ``start_app``; RabbitMQ
    is running again after the test whatever happened."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")

    def restart(pause: float = 0.0) -> None:
        try:
            subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
            time.sleep(pause)
        finally:
            ensure_rabbitmq_running()

    try:
        yield restart
    finally:
        ensure_rabbitmq_running()
