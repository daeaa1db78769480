"""Who drives a consumer's connection: the thread waiting in ``fetch()`` does (no hand-off
between threads for a delivery), and the consumer's I/O thread takes over whenever nobody
fetches, so acks still go out, deliveries are still buffered and heartbeats still answered
while the fetching thread is busy elsewhere (a long task on the solo pool, a full pool; the
heartbeats are checked in test_amqp_faults.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from celeriac.broker.base import Delivery
from celeriac.protocol import Message
from celeriac.routing import Queue

from celeriac_amqp import AMQPBroker
from celeriac_amqp.consumer import AMQPConsumer


def _msg(tag: str) -> Message:
    return Message({"kit": tag}, {"delivery_mode": 2}, b"{}")


def _fetch(consumer: AMQPConsumer, count: int, timeout: float = 10.0) -> list[Delivery]:
    deadline = time.monotonic() + timeout
    out: list[Delivery] = []
    while len(out) < count and time.monotonic() < deadline:
        out.extend(consumer.fetch(count - len(out), 0.2))
    return out


@pytest.fixture
def queue(broker: AMQPBroker) -> Iterator[Queue]:
    q = Queue(f"celeriac-test-drive-{uuid.uuid4().hex[:10]}")
    broker.declare(q)
    yield q
    broker.delete_queue(q.name)


def test_deliveries_reach_the_fetching_thread_itself(broker: AMQPBroker, queue: Queue,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from celeriac_amqp import consumer as consumer_module

    seen: list[str] = []
    original = consumer_module.to_message

    def to_message(*args: object) -> object:
        seen.append(threading.current_thread().name)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(consumer_module, "to_message", to_message)
    consumer = broker.consumer([queue], 4)
    try:
        # Connected and idle: the I/O thread drove until now; this fetch takes the connection
        # over, so what is published meanwhile is read by this very thread.
        assert consumer.fetch(1, 0.3) == []
        broker.publish(_msg("one"), "", queue.name)
        got = _fetch(consumer, 1)
        assert [d.message.headers["kit"] for d in got] == ["one"]
        assert seen == [threading.current_thread().name]
        consumer.ack(got[0])
    finally:
        consumer.close()


def test_acks_and_prefetch_go_on_while_nobody_fetches(broker: AMQPBroker, queue: Queue) -> None:
    for tag in ("a", "b", "c"):
        broker.publish(_msg(tag), "", queue.name)
    broker.flush()
    consumer = broker.consumer([queue], 1)  # RabbitMQ sends the next only after an ack
    assert isinstance(consumer, AMQPConsumer)
    try:
        first = _fetch(consumer, 1)
        assert [d.message.headers["kit"] for d in first] == ["a"]
        # Acked from another thread (a pool thread) while this one stops fetching: the I/O
        # thread applies the ack and buffers the next delivery, which leaves the queue.
        threading.Thread(target=consumer.ack, args=(first[0],)).start()
        deadline = time.monotonic() + 5
        while broker.queue_size(queue.name) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.queue_size(queue.name) == 1
        second = consumer.fetch(1, 0.0)  # already buffered: no wait
        assert [d.message.headers["kit"] for d in second] == ["b"]
        consumer.ack(second[0])
        assert [d.message.headers["kit"] for d in _fetch(consumer, 1)] == ["c"]
    finally:
        consumer.close()
