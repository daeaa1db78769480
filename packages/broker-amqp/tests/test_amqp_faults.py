"""Faults RabbitMQ users meet: bad credentials, deleted queues, mismatched declarations,
connection loss, heartbeats during long work, delayed messages held by the broker."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator

import kombu
import pytest
from celeriac.broker.base import BrokerConnectionError, Delivery
from celeriac.protocol import Message
from celeriac.routing import Queue

from celeriac_amqp import AMQPBroker
from celeriac_amqp.consumer import AMQPConsumer


def _name(prefix: str) -> str:
    return f"celeriac-test-{prefix}-{uuid.uuid4().hex[:10]}"


def _msg(tag: str, body: bytes = b"{}") -> Message:
    return Message({"kit": tag}, {"delivery_mode": 2}, body)


def _drain(consumer: object, count: int, timeout: float = 10.0) -> list[Delivery]:
    deadline = time.monotonic() + timeout
    out: list[Delivery] = []
    while len(out) < count and time.monotonic() < deadline:
        out.extend(consumer.fetch(count - len(out), 0.2))  # type: ignore[attr-defined]
    return out


@pytest.fixture
def queue(broker: AMQPBroker) -> Iterator[Queue]:
    q = Queue(_name("f"))
    broker.declare(q)
    yield q
    broker.delete_queue(q.name)


def _with_credentials(url: str, user: str, password: str, vhost: str = "/") -> str:
    rest = url.split("@", 1)[1].split("/", 1)[0]
    return f"amqp://{user}:{password}@{rest}/{vhost if vhost != '/' else '/'}"


def test_wrong_password_is_one_clear_line(amqp_url: str) -> None:
    url = _with_credentials(amqp_url, "guest", "not-the-password")
    broker = AMQPBroker(url, {})
    with pytest.raises(BrokerConnectionError) as info:
        broker.connect()
    text = str(info.value)
    assert "\n" not in text
    assert "not-the-password" not in text
    assert "amqp://guest:**@" in text
    assert "refused the login" in text
    with pytest.raises(BrokerConnectionError, match="refused the login"):
        broker.consumer([Queue(_name("never"))], 1)
    broker.close()


def test_unknown_vhost_is_one_clear_line(amqp_url: str) -> None:
    url = _with_credentials(amqp_url, "guest", "guest", "no-such-vhost-" + uuid.uuid4().hex[:6])
    broker = AMQPBroker(url, {})
    with pytest.raises(BrokerConnectionError) as info:
        broker.connect()
    text = str(info.value)
    assert "\n" not in text and "guest:**@" in text
    assert "virtual host" in text and "no-such-vhost" in text
    broker.close()


def test_unreachable_port_gives_up_with_masked_url() -> None:
    broker = AMQPBroker("amqp://u:secret@127.0.0.1:1//",
                        {"broker_transport_options": {"publish_retry_timeout": 0.5}})
    with pytest.raises(BrokerConnectionError) as info:
        broker.connect()
    assert "secret" not in str(info.value) and "u:**@127.0.0.1:1" in str(info.value)
    broker.close()


def test_publish_to_missing_exchange_is_clear_and_broker_goes_on(broker: AMQPBroker,
                                                                 queue: Queue) -> None:
    with pytest.raises(BrokerConnectionError, match="NOT_FOUND"):
        broker.publish(_msg("lost"), _name("no-exchange"), "key")
    broker.publish(_msg("ok"), "", queue.name, queue=queue)
    assert broker.queue_size(queue.name) == 1


def test_mismatched_declaration_is_tolerated(amqp_url: str, broker: AMQPBroker,
                                             caplog: pytest.LogCaptureFixture) -> None:
    name = _name("mismatch")
    with kombu.Connection(amqp_url.replace("amqp://", "pyamqp://", 1)) as conn:
        kombu.Queue(name, kombu.Exchange(name), name, max_priority=5)(conn.default_channel).declare()
    try:
        with caplog.at_level(logging.WARNING, logger="celeriac.amqp"):
            broker.publish(_msg("m"), "", name, queue=Queue(name))  # no x-max-priority
            consumer = broker.consumer([Queue(name)], 1)
        try:
            assert [d.message.headers["kit"] for d in _drain(consumer, 1)] == ["m"]
        finally:
            consumer.close()
        assert any("different settings" in r.getMessage() for r in caplog.records)
    finally:
        broker.delete_queue(name)


def test_queue_deleted_while_consumed(amqp_url: str, broker: AMQPBroker, queue: Queue,
                                      caplog: pytest.LogCaptureFixture) -> None:
    consumer = broker.consumer([queue], 5)
    try:
        with caplog.at_level(logging.WARNING, logger="celeriac.amqp"), \
                kombu.Connection(amqp_url.replace("amqp://", "pyamqp://", 1)) as conn:
            conn.default_channel.queue_delete(queue.name)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # wait until the consumer declared it again
                try:
                    conn.channel().queue_declare(queue.name, passive=True)
                    break
                except Exception:  # noqa: BLE001 - not there yet
                    time.sleep(0.05)
            else:
                pytest.fail("the consumer did not declare its deleted queue again")
        broker.publish(_msg("after"), "", queue.name, queue=queue)
        got = _drain(consumer, 1)
        assert [d.message.headers["kit"] for d in got] == ["after"]
        consumer.ack(got[0])
        assert any("cancelled the consumer" in r.getMessage() for r in caplog.records)
    finally:
        consumer.close()


def test_messages_bigger_than_frame_max(amqp_url: str, broker: AMQPBroker, queue: Queue) -> None:
    body = bytes(range(256)) * (8 * 4096)  # 8 MiB, RabbitMQ's frame_max is 128 KiB
    broker.publish(_msg("big", body), "", queue.name, queue=queue)
    consumer = broker.consumer([queue], 1)
    try:
        got = _drain(consumer, 1)
        assert got and got[0].message.body == body
        consumer.ack(got[0])
    finally:
        consumer.close()
    # and one written by kombu, read by us
    with kombu.Connection(amqp_url.replace("amqp://", "pyamqp://", 1)) as conn:
        conn.Producer().publish(body, routing_key=queue.name, serializer=None,
                                content_type="application/octet-stream", content_encoding="binary")
    consumer = broker.consumer([queue], 1)
    try:
        got = _drain(consumer, 1)
        assert got and got[0].message.body == body
        consumer.ack(got[0])
    finally:
        consumer.close()


def test_heartbeats_survive_long_work_between_fetches(amqp_url: str, queue: Queue) -> None:
    # heartbeat 1 s: a connection that does not answer for ~2 s is closed by RabbitMQ. The
    # consumer's I/O thread keeps answering while "the task" runs for 4 s without fetching.
    broker = AMQPBroker(amqp_url, {"broker_heartbeat": 1})
    try:
        broker.publish(_msg("long"), "", queue.name, queue=queue)
        consumer = broker.consumer([queue], 1)
        got = _drain(consumer, 1)
        assert len(got) == 1
        time.sleep(4.0)  # the long task
        consumer.ack(got[0])
        consumer.flush()
        consumer.close()
        again = broker.consumer([queue], 1)
        assert _drain(again, 1, timeout=1.0) == [], "the ack was lost: the connection had died"
        again.close()
        # a publishing connection idle for longer than the heartbeat is reopened transparently
        broker.publish(_msg("after-idle"), "", queue.name, queue=queue)
        assert broker.queue_size(queue.name) == 1
    finally:
        broker.close()


def test_far_future_delay_waits_in_rabbitmq_not_in_the_consumer(broker: AMQPBroker,
                                                                queue: Queue) -> None:
    consumer = broker.consumer([queue], 10)
    try:
        not_before = time.time() + 2.0
        message = _msg("later")
        message.properties["expiration"] = "500"  # must not cut the wait short
        broker.publish(message, "", queue.name, queue=queue, not_before=not_before)
        assert consumer.fetch(10, 1.0) == []
        assert broker.queue_size(queue.name) == 0  # not in the target queue yet either
        got = _drain(consumer, 1, timeout=15)
        assert time.time() >= not_before
        assert [d.message.headers for d in got] == [{"kit": "later"}]  # routing headers gone
        assert (got[0].exchange, got[0].routing_key) == ("", queue.name)
        consumer.ack(got[0])
    finally:
        consumer.close()


def test_stale_acks_after_reconnect_are_ignored(broker: AMQPBroker, queue: Queue) -> None:
    broker.publish(_msg("s"), "", queue.name, queue=queue)
    consumer = broker.consumer([queue], 1)
    assert isinstance(consumer, AMQPConsumer)
    try:
        got = _drain(consumer, 1)
        link = consumer._link
        assert link is not None
        # cut the TCP connection under pika's feet, as a network failure would
        link.connection._impl._transport._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        again = _drain(consumer, 1)
        assert [d.redelivered for d in again] == [True]
        consumer.ack(got[0])  # tag of the lost connection: ignored, not a channel error
        consumer.ack(again[0])
        consumer.flush()
        assert _drain(consumer, 1, timeout=0.5) == []
    finally:
        consumer.close()


def test_forked_child_uses_its_own_connection(broker: AMQPBroker, queue: Queue) -> None:
    # prefork pools fork after the parent published: the child must not write on the
    # parent's socket, and the parent's connection must survive the child's exit.
    broker.publish(_msg("parent"), "", queue.name, queue=queue)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child process
        code = 0
        try:
            broker.publish(_msg("child"), "", queue.name, queue=queue)
            broker.close()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    broker.publish(_msg("parent-again"), "", queue.name, queue=queue)
    assert broker.queue_size(queue.name) == 3


def test_channel_closed_by_rabbitmq_is_logged_and_consuming_goes_on(
        broker: AMQPBroker, queue: Queue, caplog: pytest.LogCaptureFixture) -> None:
    broker.publish(_msg("c1"), "", queue.name, queue=queue)
    consumer = broker.consumer([queue], 5)
    assert isinstance(consumer, AMQPConsumer)
    try:
        first = _drain(consumer, 1)
        link = consumer._link
        assert link is not None
        with caplog.at_level(logging.WARNING, logger="celeriac.amqp"):
            # an ack RabbitMQ does not know: it closes the channel (406 PRECONDITION_FAILED)
            link.connection.add_callback_threadsafe(lambda: link.channel.basic_ack(10_000))
            again = _drain(consumer, 1)
        assert [d.message.headers["kit"] for d in again] == ["c1"] and again[0].redelivered
        consumer.ack(first[0])  # stale: ignored
        consumer.ack(again[0])
        broker.publish(_msg("c2"), "", queue.name, queue=queue)
        more = _drain(consumer, 1)
        assert [d.message.headers["kit"] for d in more] == ["c2"]
        consumer.ack(more[0])
        assert any("PRECONDITION_FAILED" in r.getMessage() for r in caplog.records)
    finally:
        consumer.close()


def test_quorum_queue_declared_and_consumed_like_celery(amqp_url: str, broker: AMQPBroker) -> None:
    name = _name("quorum")
    queue = Queue(name, queue_arguments={"x-queue-type": "quorum"})
    try:
        broker.publish(_msg("q"), "", name, queue=queue)
        with kombu.Connection(amqp_url.replace("amqp://", "pyamqp://", 1)) as conn:
            kombu.Queue(name, kombu.Exchange(name), name,
                        queue_arguments={"x-queue-type": "quorum"})(conn.default_channel).declare()
        consumer = broker.consumer([queue], 4)  # per-consumer QoS: quorum refuses global QoS
        try:
            got = _drain(consumer, 1)
            assert [d.message.headers["kit"] for d in got] == ["q"]
            consumer.ack(got[0])
        finally:
            consumer.close()
    finally:
        broker.delete_queue(name)


def test_a_half_open_connection_is_noticed_within_two_heartbeats(
        amqp_url: str, broker: AMQPBroker, queue: Queue, caplog: pytest.LogCaptureFixture) -> None:
    """The network stops delivering RabbitMQ's bytes without closing anything: the consumer
    must see it within 2 heartbeat intervals, say so once, and consume again afterwards."""
    from urllib.parse import urlsplit

    from celeriac.testing.proxy import HoldingProxy

    parts = urlsplit(amqp_url)
    proxy = HoldingProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    heartbeat = 2.0
    proxied = AMQPBroker(f"amqp://guest:guest@127.0.0.1:{proxy.port}//",
                         {"broker_heartbeat": heartbeat, "broker_connection_timeout": 2})
    consumer = proxied.consumer([queue], 10)
    caplog.set_level(logging.WARNING, logger="celeriac.amqp")
    try:
        consumer.fetch(1, 0.5)
        proxy.hold_replies.set()
        started = time.monotonic()
        while not any("half-open" in r.getMessage() for r in caplog.records):
            assert time.monotonic() - started < 2 * heartbeat + 1.0, "the dead peer was not noticed in time"
            time.sleep(0.1)
        proxy.hold_replies.clear()
        broker.publish(_msg("after"), "", queue.name, queue=queue)
        got = _drain(consumer, 1, timeout=20)
        assert [d.message.headers for d in got] == [{"kit": "after"}]
        consumer.ack(got[0])
        lost = [r for r in caplog.records if "lost" in r.getMessage()]
        assert len(lost) == 1, [r.getMessage() for r in caplog.records]
        assert not any(r.exc_info for r in caplog.records)
    finally:
        consumer.close()
        proxied.close()
        proxy.close()
