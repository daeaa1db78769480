"""What RabbitMQ's AMQP 1.0 plugin can and cannot do for the capabilities the plugin does not
declare (see the README): priorities work on a queue created beforehand with ``x-max-priority``,
and a priority queue that does not exist is a clear error, not a silent FIFO queue. Also: the
plugin still works where its short way for deliveries cannot be installed."""

from __future__ import annotations

import time

import pytest
from celeriac.broker.base import DELAY, PRIORITY, QUEUE_SIZE, BrokerConnectionError
from celeriac.routing import Queue
from celeriac.testing.broker_kit import make_message
from qpid_support import declare_priority_queue, delete_queues, unique

from celeriac_qpid import QpidBroker


def test_declared_capabilities(broker: QpidBroker) -> None:
    assert not broker.has(PRIORITY) and not broker.has(DELAY) and not broker.has(QUEUE_SIZE)


def test_priorities_are_honoured_on_a_queue_created_with_x_max_priority(broker: QpidBroker) -> None:
    name = unique("prio")
    declare_priority_queue(name, 9)
    try:
        queue = Queue(name, max_priority=9)
        broker.declare(queue)
        sent = [("low-a", 0), ("mid-a", 3), ("high", 9), ("low-b", 0), ("mid-b", 6)]
        for tag, priority in sent:
            message = make_message(tag)
            message.properties["priority"] = priority
            broker.publish(message, "", name, queue=queue)
        broker.flush(10)
        time.sleep(0.3)  # the broker has them all before the first is taken
        consumer = broker.consumer([queue], 1)
        got = []
        try:
            deadline = time.monotonic() + 10
            while len(got) < len(sent) and time.monotonic() < deadline:
                for delivery in consumer.fetch(1, 0.5):
                    got.append(delivery.message.headers["kit"])
                    consumer.ack(delivery)
        finally:
            consumer.close()
        assert got == ["high", "mid-b", "mid-a", "low-a", "low-b"]
    finally:
        delete_queues([name])


def test_a_priority_queue_that_does_not_exist_is_one_clear_error(qpid_url: str) -> None:
    broker = QpidBroker(qpid_url, {"broker_transport_options": {"attach_timeout": 1}})
    try:
        with pytest.raises(BrokerConnectionError) as info:
            broker.declare(Queue(unique("noprio"), max_priority=5))
        assert "x-max-priority" in str(info.value) and "guest:**@" in str(info.value)
    finally:
        broker.close()


def test_messages_flow_without_the_short_way_for_deliveries(qpid_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proton whose container does not have the collector the short way expects: every
    delivery goes through proton's handler, and messages still arrive, once, and are acked."""
    import celeriac_qpid.reactor

    monkeypatch.setattr(celeriac_qpid.reactor, "Collector", type("OtherCollector", (), {}))
    broker = QpidBroker(qpid_url, {})
    queue = Queue(unique("slow-way"))
    try:
        broker.declare(queue)
        for i in range(20):
            broker.publish(make_message(f"m{i}"), "", queue.name, queue=queue)
        broker.flush(10)
        consumer = broker.consumer([queue], 5)
        got: list[str] = []
        deadline = time.monotonic() + 10
        while len(got) < 20 and time.monotonic() < deadline:
            for delivery in consumer.fetch(10, 0.5):
                got.append(delivery.message.headers["kit"])
                consumer.ack(delivery)
        assert sorted(got) == sorted(f"m{i}" for i in range(20))
        assert consumer.fetch(10, 0.5) == []
        consumer.close()
    finally:
        broker.close()
        delete_queues([queue.name])


def test_flush_waits_for_what_each_thread_published(broker: QpidBroker) -> None:
    """``flush()`` (the worker calls it after each task): once it returned in a thread, what
    that thread published is on the broker, for another connection to read."""
    import threading

    queue = Queue(unique("flush"))
    broker.declare(queue)
    errors: list[BaseException] = []

    def publish(prefix: str) -> None:
        try:
            for i in range(200):
                broker.publish(make_message(f"{prefix}{i}"), "", queue.name, queue=queue)
            broker.flush(30)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(p,)) for p in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    reader = QpidBroker(broker.url, {})
    try:
        consumer = reader.consumer([queue], 0)
        got: set[str] = set()
        deadline = time.monotonic() + 10
        while len(got) < 400 and time.monotonic() < deadline:
            for delivery in consumer.fetch(500, 0.5):
                got.add(delivery.message.headers["kit"])
                consumer.ack(delivery)
        consumer.close()
    finally:
        reader.close()
    assert got == {f"{p}{i}" for p in "ab" for i in range(200)}
