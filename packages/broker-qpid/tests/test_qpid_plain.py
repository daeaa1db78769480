"""The broker conformance kit with the ``plain`` address dialect (bare node names).

No AMQP 1.0 broker that uses plain addresses can be installed on this project's machines (see
the README: Debian's ActiveMQ Classic is built without its AMQP transport; Artemis, Qpid
Broker-J and Qpid Dispatch are in none of the registries they reach). Two runs stand in:

- ``TestPlainDialectOnRabbitMQ``: the machine's RabbitMQ AMQP 1.0 plugin, which takes a bare
  address as a queue name. It checks the plain dialect's queue paths on a real server (bare
  queue addresses, the Open frame's host name for ``//``, purge, the outcomes, client-side
  routing to bound queues). RabbitMQ 3.x ignores the ``topic`` capability (a bare address is
  a queue there, so subscribers would compete for broadcasts): these runs set the transport
  option ``broadcast=False``, and the plain broadcast path stays untested here. The seed
  tutorial runs the same way through the real CLI (results in SQLite, for the chord).
- ``TestPlainDialectConformance``: every declared capability against the broker named by
  ``CELERIAC_TEST_QPID_PLAIN_URL`` (for instance ``qpid://artemis:artemis@localhost:5672//``
  for ActiveMQ Artemis); skipped, saying so, when the variable is not set.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celeriac.broker.base import BROADCAST
from celeriac.testing.broker_kit import BrokerConformance
from celeriac.testing.process import require_server
from qpid_support import (
    CELERIAC,
    connected_broker,
    copy_seed,
    delete_queues,
    ready_count,
    run_client,
    unique,
)

from celeriac_qpid import QpidBroker

PLAIN: dict[str, Any] = {"broker_transport_options": {"address_dialect": "plain"}}
#: RabbitMQ 3.x has no multicast for a bare address (see the module docstring)
PLAIN_ON_RABBITMQ: dict[str, Any] = {"broker_transport_options": {"address_dialect": "plain", "broadcast": False}}
PLAIN_URL = os.environ.get("CELERIAC_TEST_QPID_PLAIN_URL", "")


class TestPlainDialectOnRabbitMQ(BrokerConformance):
    """The kit's required tests and ``reply_queues``/``batch`` with bare addresses on RabbitMQ."""

    @pytest.fixture
    def broker(self, qpid_url: str) -> Iterator[QpidBroker]:
        with connected_broker(qpid_url, PLAIN_ON_RABBITMQ) as b:
            assert b.dialect.name == "plain" and not b.has(BROADCAST)
            yield b

    @pytest.fixture
    def make_broker(self, qpid_url: str) -> Callable[[], QpidBroker]:
        return lambda: QpidBroker(qpid_url, PLAIN_ON_RABBITMQ)


def test_seed_tutorial_with_the_plain_dialect_through_the_cli(
        tmp_path: Path, qpid_url: str, spawn_worker: Callable[..., Any]) -> None:
    """A worker started by the ``celeriac`` CLI, tasks, a group, a chord and a chain with bare
    addresses; remote control says it is not available (``broadcast=False``)."""
    queue = unique("plain-e2e")
    copy_seed(tmp_path, f"app.conf.task_default_queue = {queue!r}  # test isolation",
              f"app.conf.broker_transport_options = {PLAIN_ON_RABBITMQ['broker_transport_options']!r}")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CELERIAC_BROKER_URL": qpid_url,
           "CELERIAC_RESULT_BACKEND": f"sqlite:///{tmp_path / 'results.db'}"}
    try:
        node = f"plain{os.getpid()}@localhost"
        worker = spawn_worker([*CELERIAC, "-A", "proj", "worker", "-l", "info", "-c", "2", "-P", "threads",
                               "-n", node], tmp_path, env)
        worker.wait_ready()
        assert "AMQP 1.0" in worker.log()
        assert ready_count(queue) == 0, "the worker consumes a queue of that bare name"
        got = run_client("""
            import json, time
            from celeriac import chain, chord, group
            from proj.celery import app
            from proj.tasks import add, mul, xsum, flaky
            out = {"dialect": app.broker.dialect.name}
            res = add.delay(4, 4)
            out["add"] = res.get(timeout=20)
            out["ready"] = res.ready()
            out["group"] = group(add.s(i, i) for i in range(10))().get(timeout=20)
            out["chord"] = chord((add.s(i, i) for i in range(10)), xsum.s())().get(timeout=20)
            out["chain"] = chain(add.s(4, 4), mul.s(8))().get(timeout=20)
            started = time.time()
            out["countdown"] = add.apply_async((1, 1), countdown=1).get(timeout=20)
            out["waited"] = time.time() - started
            out["flaky"] = flaky.delay().get(timeout=20)
            print(json.dumps(out))
        """, tmp_path, env)
        assert got["dialect"] == "plain"
        assert got["add"] == 8 and got["ready"] is True
        assert got["group"] == [i + i for i in range(10)]
        assert got["chord"] == 90
        assert got["chain"] == 64
        assert got["countdown"] == 2 and got["waited"] >= 1.0
        assert got["flaky"] == "succeeded after 2 retries"
        for command in (["inspect", "active"], ["status"]):
            out = subprocess.run([*CELERIAC, "-A", "proj", *command], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=60, check=False)
            assert out.returncode != 0, out.stdout
            assert "does not support broadcast messages" in out.stdout + out.stderr, out.stdout + out.stderr
        worker.stop()
        assert "Traceback" not in worker.log(), worker.log()[-3000:]
    finally:
        delete_queues([queue])


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
