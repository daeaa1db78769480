"""``rpc://`` replies on RabbitMQ: a transient reply goes out without a publisher confirm (as
Celery's do), a persistent one (``result_persistent``) is confirmed like a task, and the replies
of one thread arrive in the order they were sent, interleaved with the thread's task publishes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from celeriac import states
from celeriac.backends.base import make_meta
from celeriac.protocol import Message
from celeriac.routing import Exchange, Queue
from celeriac_rpc import RPCBackend

from celeriac_amqp import AMQPBroker


@pytest.fixture
def reply_queue(broker: AMQPBroker) -> Iterator[Queue]:
    name = f"celeriac-test-reply-{uuid.uuid4().hex[:10]}"
    queue = Queue(name, Exchange(""), name, durable=False, auto_delete=False)
    broker.declare(queue)
    yield queue
    broker.delete_queue(name)


def _reply(n: int, delivery_mode: int) -> Message:
    return Message({}, {"correlation_id": f"r{n}", "delivery_mode": delivery_mode}, f"{n}".encode(),
                   "application/json", "utf-8")


def _drain(broker: AMQPBroker, queue: Queue, count: int) -> list[Message]:
    consumer = broker.consumer([queue], 0, no_ack=True)
    got: list[Message] = []
    deadline = time.monotonic() + 20
    try:
        while len(got) < count and time.monotonic() < deadline:
            got += [d.message for d in consumer.fetch(count - len(got), 0.5)]
    finally:
        consumer.close()
    return got


def test_a_transient_reply_is_sent_without_a_confirm(broker: AMQPBroker, reply_queue: Queue) -> None:
    broker.publish_reply(_reply(1, 1), reply_queue.name)
    confirms = broker._thread_link().confirms
    assert confirms is not None and not confirms.pending
    published_confirmed = confirms._tag
    broker.publish_reply(_reply(2, 1), reply_queue.name)
    assert confirms._tag == published_confirmed  # not published on the confirming channel
    broker.publish_reply(_reply(3, 2), reply_queue.name)  # persistent: confirmed like a task
    assert confirms._tag == published_confirmed + 1 and not confirms.pending
    got = _drain(broker, reply_queue, 3)
    assert [m.body for m in got] == [b"1", b"2", b"3"]
    assert [m.properties.get("delivery_mode") for m in got] == [1, 1, 2]


def test_one_threads_replies_keep_their_order_between_its_task_publishes(
        broker: AMQPBroker, reply_queue: Queue) -> None:
    tasks = Queue(f"celeriac-test-tasks-{uuid.uuid4().hex[:10]}")
    broker.declare(tasks)
    try:
        for n in range(300):
            broker.publish_reply(_reply(n, 1), reply_queue.name)
            if n % 3 == 0:
                broker.publish(Message({"id": f"t{n}"}, {"delivery_mode": 2}, b"[]", "application/json",
                                       "utf-8"), "", tasks.name)
        broker.flush()
        assert [int(m.body) for m in _drain(broker, reply_queue, 300)] == list(range(300))
        assert broker.queue_size(tasks.name) == 100
    finally:
        broker.delete_queue(tasks.name)


def test_rpc_results_through_the_reply_path(amqp_url: str) -> None:
    """The rpc:// backend end to end on RabbitMQ: a worker-side backend stores STARTED then
    SUCCESS for a task, the client's backend gets the final state."""
    conf = {"broker_url": amqp_url}
    client, worker = RPCBackend("rpc://", conf), RPCBackend("rpc://", conf)
    try:
        reply_to = str(uuid.uuid4())
        task_id = str(uuid.uuid4())
        client.on_task_call(task_id, reply_to)
        worker.store(task_id, make_meta(task_id, states.STARTED, {"pid": 1}), reply_to=reply_to,
                     correlation_id=task_id)
        worker.store(task_id, make_meta(task_id, states.SUCCESS, 42), reply_to=reply_to,
                     correlation_id=task_id)
        got = client.wait([task_id], timeout=10)
        assert got[task_id]["status"] == states.SUCCESS and got[task_id]["result"] == 42
    finally:
        client.close()
        worker.close()
