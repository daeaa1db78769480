"""Tasks waiting in the delay levels are listed (``inspect scheduled``) and purged, for their
own queue only, without being lost, delayed or reordered by the browsing."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from celeriac.broker.base import Delivery
from celeriac.protocol import Message
from celeriac.routing import Queue

from celeriac_amqp import AMQPBroker, delay


def _name(prefix: str) -> str:
    return f"celeriac-test-{prefix}-{uuid.uuid4().hex[:10]}"


def _task(task_id: str, not_before: float) -> Message:
    eta = dt.datetime.fromtimestamp(not_before, dt.timezone.utc).isoformat()
    return Message({"task": "t.add", "id": task_id, "eta": eta}, {"delivery_mode": 2}, b"[[], {}, {}]",
                   "application/json", "utf-8")


@pytest.fixture
def queues(broker: AMQPBroker) -> Iterator[tuple[Queue, Queue]]:
    pair = (Queue(_name("sched-a")), Queue(_name("sched-b")))
    for q in pair:
        broker.declare(q)
    yield pair
    for q in pair:
        broker.delete_queue(q.name)


def _park(broker: AMQPBroker, queue: Queue, task_id: str, delay: float) -> float:
    not_before = time.time() + delay
    broker.publish(_task(task_id, not_before), "", queue.name, queue=queue, not_before=not_before)
    return not_before


def _drain(broker: AMQPBroker, queue: Queue, count: int, timeout: float) -> list[Delivery]:
    consumer = broker.consumer([queue], 50)
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            batch = consumer.fetch(count - len(got), 0.2)
            for delivery in batch:
                consumer.ack(delivery)
            got += batch
        consumer.flush()
    finally:
        consumer.close()
    return got


def test_scheduled_lists_its_queues_parked_tasks_soonest_first(broker: AMQPBroker,
                                                              queues: tuple[Queue, Queue]) -> None:
    a, b = queues
    due = {"a-mid": _park(broker, a, "a-mid", 300), "a-near": _park(broker, a, "a-near", 40),
           "a-far": _park(broker, a, "a-far", 3_000)}
    _park(broker, b, "b-other", 60)

    listed = broker.scheduled([a.name])
    assert [m.headers["id"] for _, m in listed] == ["a-near", "a-mid", "a-far"]
    for when, message in listed:
        assert abs(when - due[message.headers["id"]]) < 0.01
        assert "celeriac-delay-to" not in message.headers  # as a worker would see it
    assert [m.headers["id"] for _, m in broker.scheduled([a.name, b.name], limit=2)] == ["a-near", "b-other"]
    # Browsing put everything back: listing again gives the same, and nothing reached a queue.
    assert [m.headers["id"] for _, m in broker.scheduled([a.name])] == ["a-near", "a-mid", "a-far"]
    assert broker.queue_size(a.name) == 0


def test_browsing_neither_loses_nor_holds_back_a_delayed_task(broker: AMQPBroker,
                                                              queues: tuple[Queue, Queue]) -> None:
    a, _ = queues
    due = [_park(broker, a, f"t{i}", 1.5 + i * 0.05) for i in range(20)]
    stop = threading.Event()

    def browse_all_the_time() -> None:
        while not stop.is_set():
            broker.scheduled([a.name])

    browser = threading.Thread(target=browse_all_the_time)
    browser.start()
    try:
        got = _drain(broker, a, 20, timeout=30)
    finally:
        stop.set()
        browser.join()
    arrived = time.time()
    assert sorted(d.message.headers["id"] for d in got) == sorted(f"t{i}" for i in range(20))
    assert arrived >= max(due)
    assert broker.scheduled([a.name]) == []


def test_purge_deletes_its_queues_parked_tasks_only(broker: AMQPBroker,
                                                    queues: tuple[Queue, Queue]) -> None:
    a, b = queues
    for i in range(3):
        _park(broker, a, f"a{i}", 30 + i)
    _park(broker, b, "b0", 2)
    broker.publish(_task("ready", time.time()), "", a.name, queue=a)
    time.sleep(0.2)

    assert broker.purge(a.name) == 4  # one ready, three parked
    assert broker.scheduled([a.name]) == []
    assert broker.queue_size(a.name) == 0
    assert [d.message.headers["id"] for d in _drain(broker, b, 1, timeout=20)] == ["b0"]


def test_two_brokers_browsing_at_once_each_see_everything(amqp_url: str, broker: AMQPBroker,
                                                          queues: tuple[Queue, Queue]) -> None:
    a, _ = queues
    for i in range(30):
        _park(broker, a, f"c{i}", 120 + i)
    other = AMQPBroker(amqp_url, {})
    seen: list[int] = []

    def browse(which: AMQPBroker) -> None:
        for _ in range(5):
            seen.append(len(which.scheduled([a.name])))

    try:
        threads = [threading.Thread(target=browse, args=(x,)) for x in (broker, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        other.close()
    assert seen == [30] * 10


def test_each_delayed_task_reaches_its_own_queue_only(broker: AMQPBroker,
                                                      queues: tuple[Queue, Queue]) -> None:
    a, b = queues
    for i in range(5):
        _park(broker, a, f"a{i}", 0.5)
        _park(broker, b, f"b{i}", 0.5)
    time.sleep(2.5)  # all due; a message routed to both queues would be there by now
    assert sorted(d.message.headers["id"] for d in _drain(broker, a, 10, timeout=3)) == [f"a{i}" for i in range(5)]
    assert sorted(d.message.headers["id"] for d in _drain(broker, b, 10, timeout=3)) == [f"b{i}" for i in range(5)]


def test_the_first_versions_binding_is_replaced(broker: AMQPBroker, queues: tuple[Queue, Queue]) -> None:
    """Bound on an x- header, a queue received every delayed message of every queue."""
    a, b = queues
    link = broker._thread_link()
    link.ensure_delay_topology()
    link.channel.queue_bind(a.name, delay.DELIVER_EXCHANGE, routing_key="",
                            arguments={"x-match": "all", delay.LEGACY_TARGET_HEADER: a.name})
    _park(broker, a, "mine", 0.3)  # binds a the new way, which removes the old binding
    _park(broker, b, "not-mine", 0.3)
    time.sleep(2)
    assert [d.message.headers["id"] for d in _drain(broker, a, 2, timeout=3)] == ["mine"]
