"""The prefork pool whose children consume themselves, on a real RabbitMQ: the canvas, a child
lost with a late-acked task (RabbitMQ gives its message back at once), and a broker restart."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celeriac import Celeriac, chord, group
from celeriac.exceptions import WorkerLostError
from celeriac.testing.plugin import start_worker
from celeriac.testing.process import require_server, server_reachable

AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672//")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celeriac]:
    url = require_server("RabbitMQ", AMQP_URL, 5672, "CELERIAC_TEST_AMQP_URL")
    app = Celeriac("pfa", broker=url, backend=f"sqlite:///{tmp_path}/r.db",
                   task_default_queue=f"pfa-{uuid.uuid4().hex[:8]}")

    @app.task(name="pfa.pid")
    def pid(seconds: float = 0.0) -> int:
        time.sleep(seconds)
        return os.getpid()

    @app.task(name="pfa.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="pfa.xsum")
    def xsum(values: list[int]) -> int:
        return sum(values)

    @app.task(acks_late=True, name="pfa.record_and_die")
    def record_and_die(path: str) -> None:
        with open(path, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        os._exit(7)

    yield app
    try:
        app.broker.delete_queue(app.conf.task_default_queue)
    finally:
        app.close()


def _stop(worker: Any) -> None:
    worker.stop()
    worker._thread.join(30)


def test_children_consume_and_run_the_canvas(app: Celeriac) -> None:
    worker = start_worker(app, pool="prefork", concurrency=2)
    try:
        from celeriac_prefork.direct import DirectPreforkPool

        assert isinstance(worker.pool, DirectPreforkPool)
        pids = set(group(app.tasks["pfa.pid"].s(0.1) for _ in range(8))().get(timeout=20))
        assert os.getpid() not in pids and len(pids) == 2
        add, xsum = app.tasks["pfa.add"], app.tasks["pfa.xsum"]
        assert chord((add.s(i, i) for i in range(50)), xsum.s())().get(timeout=30) == 2450
        stats = app.control.inspect(timeout=2).stats() or {}
        assert stats[worker.hostname]["total"].get("pfa.add") == 50
    finally:
        _stop(worker)


def test_a_late_acked_task_whose_child_died_fails_once_and_is_not_run_again(app: Celeriac, tmp_path: Path) -> None:
    """Celery stores WorkerLostError and acks the message. Here the message belonged to the dead
    child's connection: RabbitMQ gives it back at once, redelivered, and the worker drops it."""
    runs = tmp_path / "runs"
    worker = start_worker(app, pool="prefork", concurrency=2)
    try:
        result = app.tasks["pfa.record_and_die"].delay(str(runs))
        with pytest.raises(WorkerLostError):
            result.get(timeout=20)
        # the redelivered message reached a child (and was dropped) before later tasks ran
        assert [app.tasks["pfa.add"].delay(i, 1).get(timeout=20) for i in range(6)] == [1, 2, 3, 4, 5, 6]
        time.sleep(0.5)
        assert len(runs.read_text().split()) == 1
        assert app.broker.queue_size(app.conf.task_default_queue) == 0
    finally:
        _stop(worker)


def _rabbitmq_up(timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=timeout, check=False)
    while not server_reachable(AMQP_URL, 5672):
        assert time.monotonic() < deadline, "RabbitMQ did not come back"
        time.sleep(0.2)


def test_children_reconnect_after_a_rabbitmq_restart(app: Celeriac) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")
    worker = start_worker(app, pool="prefork", concurrency=2)
    try:
        assert app.tasks["pfa.add"].delay(1, 1).get(timeout=20) == 2
        pids_before = {s.process.pid for s in worker.pool._slots}
        try:
            subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        finally:
            _rabbitmq_up()
        # the queue was not durable across the restart in every setup: declare it again
        app.broker.declare(app.router.queue(app.conf.task_default_queue))
        results = [app.tasks["pfa.add"].delay(i, i) for i in range(20)]
        assert [r.get(timeout=60) for r in results] == [2 * i for i in range(20)]
        # the same children went on: they reconnected rather than dying
        assert {s.process.pid for s in worker.pool._slots} == pids_before
    finally:
        _rabbitmq_up()
        _stop(worker)
