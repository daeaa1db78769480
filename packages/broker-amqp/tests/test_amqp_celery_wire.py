"""Wire compatibility with Celery/kombu on the same RabbitMQ: topology and messages.

kombu (Celery's own messaging library) declares the same entities after us and before us:
RabbitMQ must never answer PRECONDITION_FAILED. Messages we publish are decoded by kombu and
the other way round, null and float header values included.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
from celeriac.protocol import Message, decode_task, encode_task
from celeriac.routing import Exchange, Queue

from celeriac_amqp import AMQPBroker


def _name(prefix: str) -> str:
    return f"celeriac-test-{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def conn(amqp_url: str) -> Iterator[kombu.Connection]:
    """A kombu (py-amqp) connection, as Celery opens it."""
    connection = kombu.Connection(amqp_url.replace("amqp://", "pyamqp://", 1))
    connection.connect()
    yield connection
    connection.release()


def _kombu_declare(conn: kombu.Connection, queue: kombu.Queue) -> None:
    channel = conn.channel()
    try:
        queue(channel).declare()  # raises amqp.PreconditionFailed on any mismatch
    finally:
        channel.close()


def _kombu_task_queue(name: str, **kwargs: object) -> kombu.Queue:
    return kombu.Queue(name, kombu.Exchange(name, "direct"), routing_key=name, **kwargs)  # type: ignore[arg-type]


def _kombu_get(queue: kombu.Queue) -> kombu.Message | None:
    """The next message kombu gets from ``queue`` within about a second, or None."""
    for _ in range(50):
        received = queue.get(no_ack=True, accept=["json"])
        if received is not None:
            return received
        time.sleep(0.02)
    return None


def _fetch(consumer: Any) -> list[Any]:
    """Our consumer's first delivery within about ten seconds (a list of one), or []."""
    for _ in range(40):
        deliveries = consumer.fetch(1, 0.25)
        if deliveries:
            return list(deliveries)
    return []


@pytest.mark.parametrize("max_priority", [None, 10])
def test_task_queue_declared_by_both_sides(conn: kombu.Connection, broker: AMQPBroker,
                                           max_priority: int | None) -> None:
    first, second = _name("q1"), _name("q2")
    try:
        # ours first, then Celery's declaration of the same queue
        broker.declare(Queue(first, max_priority=max_priority))
        _kombu_declare(conn, _kombu_task_queue(first, max_priority=max_priority))
        # Celery's first, then ours (a fresh broker: nothing cached)
        _kombu_declare(conn, _kombu_task_queue(second, max_priority=max_priority))
        other = AMQPBroker(broker.url, {})
        try:
            other.declare(Queue(second, max_priority=max_priority))
            other.publish(Message({}, {}, b"x"), "", second)
            assert other.queue_size(second) == 1
        finally:
            other.close()
    finally:
        broker.delete_queue(first)
        broker.delete_queue(second)


def test_default_celery_exchange_and_queue_flags(conn: kombu.Connection, broker: AMQPBroker) -> None:
    # The default entities exactly as Celery's defaults build them (app.amqp.Queues).
    from celery import Celery

    app = Celery("wire", broker=broker.url)
    name = _name("dflt")
    app.conf.task_default_queue = name
    celery_queue = app.amqp.queues[name]
    try:
        broker.declare(Queue(name, Exchange(name, "direct"), name))
        _kombu_declare(conn, celery_queue)
    finally:
        broker.delete_queue(name)


def test_rpc_reply_queue_matches_celery(conn: kombu.Connection, broker: AMQPBroker) -> None:
    name = str(uuid.uuid4())
    try:
        broker.declare(Queue(name, Exchange(""), name, durable=False, auto_delete=True,
                             expires=86400.0))
        celery_binding = kombu.Queue(name, kombu.Exchange(None), name, durable=False,
                                     auto_delete=True, expires=86400.0)
        _kombu_declare(conn, celery_binding)
    finally:
        broker.delete_queue(name)


def test_pidbox_and_event_exchanges_match_celery(conn: kombu.Connection, broker: AMQPBroker) -> None:
    # Celery's control exchange is fanout and transient, the event exchange topic and durable.
    sub_control = broker.subscribe("celery.pidbox")
    sub_events = broker.subscribe("celeryev", "worker.#")
    try:
        channel = conn.channel()
        try:
            kombu.Exchange("celery.pidbox", "fanout", durable=False, auto_delete=False)(channel).declare()
            kombu.Exchange("celeryev", "topic", durable=True)(channel).declare()
            kombu.Exchange("reply.celery.pidbox", "direct", durable=False)(channel).declare()
        finally:
            channel.close()
        broker.broadcast("reply.celery.pidbox", Message({}, {}, b"{}"), "nobody")
    finally:
        sub_control.close()
        sub_events.close()


def test_our_task_message_decoded_by_kombu(conn: kombu.Connection, broker: AMQPBroker) -> None:
    name = _name("to-kombu")
    task_id = str(uuid.uuid4())
    message = encode_task("proj.add", task_id, [2, 2], {}, timelimit=(30.5, None),
                          reply_to="reply-oid", expiration_ms=60_000, priority=3)
    broker.publish(message, "", name, queue=Queue(name))
    try:
        queue = _kombu_task_queue(name)(conn.default_channel)
        received = _kombu_get(queue)
        assert received is not None
        headers = received.headers
        assert headers["id"] == task_id
        assert headers["task"] == "proj.add"
        assert headers["eta"] is None and headers["shadow"] is None and headers["parent_id"] is None
        assert headers["timelimit"] == [30.5, None]
        assert headers["stamps"] == {}
        assert received.properties["correlation_id"] == task_id
        assert received.properties["reply_to"] == "reply-oid"
        assert received.properties["delivery_mode"] == 2
        assert received.properties["priority"] == 3
        assert received.properties["expiration"] == "60000"
        assert received.content_type == "application/json"
        assert received.decode() == [[2, 2], {}, {"callbacks": None, "errbacks": None,
                                                   "chain": None, "chord": None}]
    finally:
        broker.delete_queue(name)


def test_celery_task_message_decoded_by_us(broker: AMQPBroker) -> None:
    from celery import Celery

    name = _name("from-celery")
    app = Celery("wire", broker=broker.url.replace("amqp://", "pyamqp://", 1))
    app.conf.task_default_queue = name
    consumer = broker.consumer([Queue(name)], 10)
    try:
        result = app.send_task("proj.mul", args=[3, 4], kwargs={"x": None}, countdown=5,
                               expires=120, time_limit=10.5, priority=7)
        deliveries = _fetch(consumer)
        assert len(deliveries) == 1
        delivery = deliveries[0]
        task = decode_task(delivery.message, None)
        assert task.id == result.id
        assert task.name == "proj.mul"
        assert task.args == [3, 4] and task.kwargs == {"x": None}
        headers = delivery.message.headers
        assert headers["shadow"] is None and headers["group"] is None
        assert headers["eta"] is not None and headers["expires"] is not None
        assert headers["timelimit"] == [10.5, None]
        assert delivery.message.properties["correlation_id"] == result.id
        assert delivery.message.properties["priority"] == 7
        assert delivery.exchange == "" and delivery.routing_key == name
        consumer.ack(delivery)
    finally:
        consumer.close()
        broker.delete_queue(name)
        app.close()


def test_compressed_task_messages_cross_both_ways(conn: kombu.Connection, broker: AMQPBroker) -> None:
    """Celery's ``compression="gzip"`` message is decoded by us; ours is decoded by kombu."""
    from celery import Celery

    name = _name("compressed")
    app = Celery("wire", broker=broker.url.replace("amqp://", "pyamqp://", 1))
    app.conf.task_default_queue = name
    consumer = broker.consumer([Queue(name)], 10)
    try:
        sent = app.send_task("proj.mul", args=[3, "y" * 500], compression="gzip")
        deliveries = _fetch(consumer)
        assert len(deliveries) == 1
        assert deliveries[0].message.headers["compression"] == "application/x-gzip"
        task = decode_task(deliveries[0].message, None)
        assert (task.id, task.args) == (sent.id, [3, "y" * 500])
        consumer.ack(deliveries[0])
        consumer.close()  # kombu takes the next one
        broker.publish(encode_task("proj.add", "t-2", [1, "z" * 500], {}, compression="bzip2"), "", name,
                       queue=Queue(name))
        queue = _kombu_task_queue(name)(conn.default_channel)
        received = _kombu_get(queue)
        assert received is not None and received.headers["compression"] == "application/x-bz2"
        assert received.decode()[0] == [1, "z" * 500]
    finally:
        consumer.close()
        broker.delete_queue(name)
        app.close()


def test_null_and_nested_header_values_round_trip(broker: AMQPBroker) -> None:
    name = _name("nulls")
    headers = {"a": None, "b": [None, 1, 2.5, "x", True], "c": {"d": None, "e": {"f": -7}},
               "big": 2**40, "neg": -1.25, "t": (1, None)}
    broker.publish(Message(headers, {}, b"{}"), "", name, queue=Queue(name))
    consumer = broker.consumer([Queue(name)], 1)
    try:
        got = []
        for _ in range(40):
            got = consumer.fetch(1, 0.25)
            if got:
                break
        assert got
        received = got[0].message.headers
        assert received == {**headers, "t": [1, None]}
        consumer.ack(got[0])
    finally:
        consumer.close()
        broker.delete_queue(name)


def test_broadcasts_interoperate_with_celery_control_and_events(conn: kombu.Connection,
                                                                 broker: AMQPBroker) -> None:
    # A Celery worker's pidbox queue receives our control broadcast ...
    node_queue = kombu.Queue(f"{_name('node')}.celery.pidbox",
                             kombu.Exchange("celery.pidbox", "fanout", durable=False),
                             auto_delete=True, durable=False, message_ttl=300.0, expires=10.0)
    bound = node_queue(conn.default_channel)
    bound.declare()
    oid = str(uuid.uuid4())
    replies = broker.subscribe("reply.celery.pidbox", oid)
    events = broker.subscribe("celeryev", "worker.#")
    try:
        body = b'{"method": "ping", "arguments": {}, "destination": null}'
        broker.broadcast("celery.pidbox", Message({"clock": 1, "expires": 0}, {}, body))
        received = None
        for _ in range(50):
            received = bound.get(no_ack=True, accept=["json"])
            if received is not None:
                break
            time.sleep(0.02)
        assert received is not None and received.decode()["method"] == "ping"
        # ... and Celery's reply and event messages reach our subscriptions.
        producer = conn.Producer()
        producer.publish({"w1@host": {"ok": "pong"}}, exchange="reply.celery.pidbox",
                         routing_key=oid, serializer="json", headers={"ticket": "t"})
        producer.publish({"type": "worker-heartbeat"}, exchange="celeryev",
                         routing_key="worker.heartbeat", serializer="json")
        producer.publish({"type": "task-sent"}, exchange="celeryev", routing_key="task.sent",
                         serializer="json")
        got_replies: list[Message] = []
        got_events: list[Message] = []
        deadline = time.monotonic() + 10
        while (not got_replies or not got_events) and time.monotonic() < deadline:
            got_replies.extend(replies.fetch(0.1))
            got_events.extend(events.fetch(0.1))
        got_events.extend(events.fetch(0.3))
        assert [m.headers.get("ticket") for m in got_replies] == ["t"]
        assert [m.body for m in got_events] == [b'{"type": "worker-heartbeat"}']
    finally:
        replies.close()
        events.close()
        bound.delete()
