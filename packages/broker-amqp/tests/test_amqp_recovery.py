"""Recovery: RabbitMQ restarted under load, and a consumer killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable

from celeriac.broker.base import BrokerConnectionError
from celeriac.protocol import Message
from celeriac.routing import Queue

from celeriac_amqp import AMQPBroker


def _name(prefix: str) -> str:
    return f"celeriac-test-{prefix}-{uuid.uuid4().hex[:10]}"


def _msg(tag: str) -> Message:
    return Message({"kit": tag, "nothing": None}, {"delivery_mode": 2}, tag.encode())


def test_restart_while_publishing_and_consuming_loses_nothing(
        amqp_url: str, restart_rabbitmq: Callable[[], None]) -> None:
    queue = Queue(_name("restart"))
    publisher = AMQPBroker(amqp_url, {"broker_transport_options": {"publish_retry_timeout": 60}})
    worker = AMQPBroker(amqp_url, {})
    publisher.declare(queue)
    consumer = worker.consumer([queue], 50)
    total = 1500
    confirmed: list[str] = []
    failures: list[BaseException] = []
    received: set[str] = set()
    restarted = threading.Event()

    def publish() -> None:
        for i in range(total):
            tag = f"r{i}"
            try:
                publisher.publish(_msg(tag), "", queue.name, queue=queue)
                confirmed.append(tag)
            except BrokerConnectionError as exc:
                failures.append(exc)
            if i == total // 3:
                restarted.wait(90)  # make sure the restart happens mid-flow

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        while len(confirmed) < total // 3:
            for delivery in consumer.fetch(100, 0.1):
                received.add(delivery.message.headers["kit"])
                consumer.ack(delivery)
        try:
            restart_rabbitmq()
        finally:
            restarted.set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for delivery in consumer.fetch(200, 0.2):
                received.add(delivery.message.headers["kit"])
                consumer.ack(delivery)
            if not thread.is_alive() and set(confirmed) <= received:
                break
        thread.join(timeout=60)
        assert not failures, failures[:3]
        assert len(confirmed) == total
        missing = set(confirmed) - received
        assert not missing, f"{len(missing)} confirmed messages lost, e.g. {sorted(missing)[:5]}"
    finally:
        restarted.set()
        consumer.close()
        publisher.delete_queue(queue.name)
        publisher.close()
        worker.close()


_HOLDER = textwrap.dedent("""
    import sys, time
    from celeriac.routing import Queue
    from celeriac_amqp import AMQPBroker
    broker = AMQPBroker(sys.argv[1], {})
    consumer = broker.consumer([Queue(sys.argv[2])], 5)
    held = []
    deadline = time.monotonic() + 20
    while len(held) < 5 and time.monotonic() < deadline:
        held.extend(consumer.fetch(5 - len(held), 0.2))
    print("holding", len(held), flush=True)
    time.sleep(600)
""")


def test_kill_9_consumer_work_is_redelivered_at_once(amqp_url: str, broker: AMQPBroker) -> None:
    queue = Queue(_name("kill9"))
    broker.declare(queue)
    for i in range(8):
        broker.publish(_msg(f"k{i}"), "", queue.name, queue=queue)
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, amqp_url, queue.name],
                            stdout=subprocess.PIPE, text=True)
    consumer = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "holding 5", line
        consumer = broker.consumer([queue], 20)
        first: list = []
        deadline = time.monotonic() + 5
        while len(first) < 3 and time.monotonic() < deadline:
            first.extend(consumer.fetch(20, 0.2))
        assert sorted(d.message.headers["kit"] for d in first) == ["k5", "k6", "k7"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        again: list = []
        deadline = time.monotonic() + 5  # "at once": RabbitMQ sees the socket close
        while len(again) < 5 and time.monotonic() < deadline:
            again.extend(consumer.fetch(20, 0.2))
        assert sorted(d.message.headers["kit"] for d in again) == [f"k{i}" for i in range(5)]
        assert all(d.redelivered for d in again)
        for delivery in first + again:
            consumer.ack(delivery)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if consumer is not None:
            consumer.close()
        broker.delete_queue(queue.name)
