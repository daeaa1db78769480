"""Nothing lost: a worker killed with SIGKILL while holding ``acks_late`` tasks, and RabbitMQ
stopped and started (``rabbitmqctl stop_app``/``start_app``) while tasks flow.

The issue's counts: the killed worker holds 1,000 unacknowledged ``acks_late`` tasks (another
worker runs them all), and 5,000 tasks flow through the restart. Bounded: each test waits at
most a minute or two for its workers, and every worker and client process is stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qpid_support import delete_queues, ready_count, unique

CELERIAC = [sys.executable, "-m", "celeriac"]

APP = """
import os, time
from celeriac import Celeriac

app = Celeriac("relapp", broker=os.environ["REL_BROKER"])
app.conf.task_default_queue = os.environ["REL_QUEUE"]
app.conf.task_ignore_result = True


def _tally(i):
    fd = os.open(os.environ["REL_TALLY"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{i} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)


@app.task(acks_late=True)
def work(i, delay=0.0):
    delay = float(os.environ.get("REL_SLOW") or delay)  # a worker started with REL_SLOW dawdles
    if delay:
        time.sleep(delay)
    _tally(i)


@app.task
def record(i):
    _tally(i)
"""


@pytest.fixture
def rel_app(tmp_path: Path, qpid_url: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """The test app module; its queue is deleted after the workers stopped."""
    (tmp_path / "relapp.py").write_text(APP)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "REL_BROKER": qpid_url,
           "REL_QUEUE": unique("rel"), "REL_TALLY": str(tmp_path / "tally")}
    yield tmp_path, env
    delete_queues([env["REL_QUEUE"]])


def _tally(env: dict[str, str]) -> list[tuple[int, int]]:
    path = Path(env["REL_TALLY"])
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            rows.append((int(parts[0]), int(parts[1])))
    return rows


def _wait_all(env: dict[str, str], total: int, timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    done: set[int] = set()
    while time.monotonic() < deadline and len(done) < total:
        done = {i for i, _ in _tally(env)}
        time.sleep(0.2)
    return done


def _worker(cwd: Path, env: dict[str, str], spawn_worker: Callable[..., Any], concurrency: int = 4,
            *extra: str) -> Any:
    worker = spawn_worker([*CELERIAC, "-A", "relapp", "worker", "-l", "info", "-c", str(concurrency),
                           "-P", "threads", *extra], cwd, env)
    worker.wait_ready()
    return worker


def _send(cwd: Path, env: dict[str, str], code: str) -> None:
    sent = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert sent.returncode == 0, sent.stderr[-3000:]


def test_kill_9_with_1000_unacked_acks_late_tasks_loses_none(rel_app: tuple[Path, dict[str, str]],
                                                            spawn_worker: Callable[..., Any]) -> None:
    cwd, env = rel_app
    total = 1000
    _send(cwd, env, f"""
        from relapp import app, work
        for i in range({total}):
            work.delay(i)
        app.close()
    """)
    # prefetch 4 x 250 = 1000: the first worker takes every task and finishes none of them
    doomed = _worker(cwd, {**env, "REL_SLOW": "600"}, spawn_worker, 4, "--prefetch-multiplier", "250")
    deadline = time.monotonic() + 60
    while ready_count(env["REL_QUEUE"]) != 0:
        assert time.monotonic() < deadline, f"the first worker never took all {total} tasks"
        time.sleep(0.2)
    assert not _tally(env), "the first worker ran a task it should still be holding"
    doomed.kill()  # SIGKILL while 1,000 acks_late deliveries are unacknowledged
    survivor = _worker(cwd, env, spawn_worker, 8)
    done = _wait_all(env, total, 120)
    missing = set(range(total)) - done
    assert not missing, f"{len(missing)} tasks lost, e.g. {sorted(missing)[:10]}\n{survivor.log()[-2000:]}"
    assert {pid for _, pid in _tally(env)} == {survivor.proc.pid}


def test_rabbitmq_stop_start_app_during_a_flow_loses_none(
        rel_app: tuple[Path, dict[str, str]], spawn_worker: Callable[..., Any],
        restart_rabbitmq: Callable[..., None]) -> None:
    cwd, env = rel_app
    total = 5000
    worker = _worker(cwd, env, spawn_worker, 8)
    code = f"""
        import json, sys
        from relapp import app, record
        for i in range({total}):
            record.delay(i)
            if i == {total // 3}:
                print("third", flush=True)
                sys.stdin.readline()   # the test restarts RabbitMQ now
        app.close()
        print(json.dumps({{"sent": {total}}}), flush=True)
    """
    client = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "third"
        restarter = threading.Thread(target=restart_rabbitmq)
        restarter.start()
        time.sleep(0.5)  # RabbitMQ is stopping: the rest is published through the outage
        client.stdin.write("go\n")
        client.stdin.flush()
        restarter.join(120)
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"sent": total}
        done = _wait_all(env, total, 120)
        missing = set(range(total)) - done
        assert not missing, (f"{len(missing)} tasks lost, e.g. {sorted(missing)[:10]}\nclient:\n{err[-2000:]}"
                             f"\nworker:\n{worker.log()[-2000:]}")
        assert "reconnecting" in worker.log(), "the worker never saw the outage"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)


def test_consumers_survive_a_connect_that_fails_during_an_outage(qpid_url: str) -> None:
    """A liveness probe (or anyone) calling ``connect()`` while the network is partitioned must
    not close the connection the consumers use: after the heal they consume again. (It used to
    close it for good: the worker never consumed again after a long partition.)"""
    from urllib.parse import urlsplit

    from celeriac.broker.base import BrokerConnectionError
    from celeriac.protocol import Message
    from celeriac.routing import Queue
    from celeriac.testing.proxy import HoldingProxy

    from celeriac_qpid import QpidBroker

    parts = urlsplit(qpid_url)
    proxy = HoldingProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    through = QpidBroker(f"qpid://guest:guest@127.0.0.1:{proxy.port}//",
                         {"broker_heartbeat": 1.0, "broker_connection_timeout": 1.0,
                          "broker_connection_max_retries": 0})
    direct = QpidBroker(qpid_url, {})
    queue = Queue(f"celeriac-test-qpid-outage-{uuid.uuid4().hex[:8]}")
    through.declare(queue)
    consumer = through.consumer([queue], 10)
    try:
        consumer.fetch(1, 0.5)
        proxy.hold_replies.set()  # the partition: RabbitMQ's bytes (heartbeats too) stop
        deadline = time.monotonic() + 15
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                through.connect()
            except BrokerConnectionError:
                refused = True
        assert refused, "connect() during the outage should have failed"
        proxy.hold_replies.clear()
        direct.publish(Message({"id": "after"}, {"delivery_mode": 2}, b"x"), "", queue.name, queue=queue)
        got: list = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            try:
                got = consumer.fetch(1, 1.0)
            except BrokerConnectionError:
                time.sleep(0.5)
        assert [d.message.headers.get("id") for d in got] == ["after"]
        consumer.ack(got[0])
        consumer.flush()
    finally:
        consumer.close()
        with contextlib.suppress(Exception):
            direct.delete_queue(queue.name)
        direct.close()
        through.close()
        proxy.close()
