"""Publisher confirms with a window: publishing does not wait for each confirm, yet nothing a
client published is lost: not when it exits without closing, not when the connection drops
before the confirms arrive, and a refused exchange still fails the call that used it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from celeriac.broker.base import BrokerConnectionError
from celeriac.protocol import Message
from celeriac.routing import Queue
from celeriac.testing.proxy import HoldingProxy

from celeriac_amqp import AMQPBroker


def _name(prefix: str) -> str:
    return f"celeriac-test-{prefix}-{uuid.uuid4().hex[:10]}"


def _msg(i: int) -> Message:
    return Message({"id": f"m{i}", "task": "t.noop"}, {"delivery_mode": 2}, b"[[], {}, {}]",
                   "application/json", "utf-8")


@pytest.fixture
def queue(broker: AMQPBroker) -> Iterator[Queue]:
    q = Queue(_name("confirm"))
    broker.declare(q)
    yield q
    broker.delete_queue(q.name)


def _drain_ids(broker: AMQPBroker, queue: Queue, at_least: int, timeout: float = 20.0) -> list[str]:
    consumer = broker.consumer([queue], 500)
    ids: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            batch = consumer.fetch(500, 0.3)
            for delivery in batch:
                ids.append(delivery.message.headers["id"])
                consumer.ack(delivery)
            if not batch and len(ids) >= at_least:
                break
        consumer.flush()
    finally:
        consumer.close()
    return ids


def test_the_window_bounds_unconfirmed_messages_and_flush_settles_them(amqp_url: str,
                                                                       queue: Queue) -> None:
    broker = AMQPBroker(amqp_url, {"broker_transport_options": {"confirm_window": 5}})
    try:
        for i in range(300):
            broker.publish(_msg(i), "", queue.name, queue=queue)
            assert len(broker._local.link.confirms.pending) < 5
        broker.flush()
        assert broker._local.link.confirms.pending == {}
        assert broker.queue_size(queue.name) == 300
    finally:
        broker.close()


def test_a_client_that_exits_without_closing_loses_nothing(amqp_url: str, broker: AMQPBroker,
                                                           queue: Queue) -> None:
    code = textwrap.dedent(f"""
        from celeriac.protocol import Message
        from celeriac.routing import Queue
        from celeriac_amqp import AMQPBroker
        broker = AMQPBroker({amqp_url!r}, {{}})
        queue = Queue({queue.name!r})
        for i in range(2000):
            broker.publish(Message({{"id": str(i)}}, {{"delivery_mode": 2}}, b"x" * 2000), "",
                           queue.name, queue=queue)
    """)  # no close(), no flush(): the interpreter's exit waits for the confirms
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True, env=os.environ)
    assert broker.queue_size(queue.name) == 2000


def test_a_missing_exchange_still_fails_the_publish_that_used_it(broker: AMQPBroker,
                                                                 queue: Queue) -> None:
    for i in range(50):
        broker.publish(_msg(i), "", queue.name, queue=queue)
    with pytest.raises(BrokerConnectionError, match="NOT_FOUND"):
        broker.publish(_msg(99), _name("no-exchange"), "key")
    broker.flush()
    # the 50 windowed ones before it arrived exactly once, and the refused one is not retried
    assert sorted(_drain_ids(broker, queue, 50)) == sorted(f"m{i}" for i in range(50))


def test_messages_unconfirmed_when_the_connection_drops_are_published_again(
        amqp_url: str, broker: AMQPBroker, queue: Queue) -> None:
    parts = urlsplit(amqp_url)
    proxy = HoldingProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
    client = AMQPBroker(url, {"broker_transport_options": {"publish_retry_timeout": 20}})
    try:
        client.publish(_msg(-1), "", queue.name, queue=queue)
        client.flush()
        proxy.hold_replies.set()  # RabbitMQ gets the messages; their confirms stay in the proxy
        for i in range(200):
            client.publish(_msg(i), "", queue.name, queue=queue)
        assert len(client._local.link.confirms.pending) == 200
        proxy.cut()
        proxy.hold_replies.clear()
        client.flush()  # reconnects and publishes the 200 again
    finally:
        client.close()
        proxy.close()
    ids = _drain_ids(broker, queue, 401)
    assert set(ids) == {f"m{i}" for i in range(-1, 200)}  # none lost
    # at least once: an unconfirmed message that did reach RabbitMQ before the cut came twice
    assert 201 <= len(ids) <= 401
