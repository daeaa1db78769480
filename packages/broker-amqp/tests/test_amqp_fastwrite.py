"""Joined frames and direct writes (``celeriac_amqp.fastwrite``) put the same bytes on the wire
as pika's own path, and messages keep their order and content when the socket cannot take
them (partial sends, a stalled peer)."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pika
import pika.connection
import pika.spec
from celeriac.protocol import Message
from celeriac.routing import Queue
from celeriac.testing.proxy import HoldingProxy

from celeriac_amqp import AMQPBroker, fastwrite

fastwrite.install()
ORIGINAL = fastwrite._installed["_output_marshaled_frames"]


class _Recorder:
    """Just what ``_send_message`` and ``_output_marshaled_frames`` touch (pure logic)."""

    _body_max_length = 131072 - 8

    def __init__(self) -> None:
        self.bytes_sent = self.frames_sent = 0
        self.emitted: list[bytes] = []

    def _adapter_emit_data(self, data: bytes) -> None:
        self.emitted.append(data)


def _wire(output: Any, body: bytes) -> tuple[bytes, int, int, int]:
    recorder = _Recorder()
    recorder._output_marshaled_frames = output.__get__(recorder)  # type: ignore[attr-defined]
    properties = pika.spec.BasicProperties(content_type="application/json", headers={"id": "x"})
    pika.connection.Connection._send_message(recorder, 1, pika.spec.Basic.Publish(exchange="", routing_key="q"),  # type: ignore[arg-type]
                                             (properties, body))
    return b"".join(recorder.emitted), len(recorder.emitted), recorder.bytes_sent, recorder.frames_sent


def test_joined_frames_are_the_bytes_pika_sends() -> None:
    for size in (0, 1, 1000, 131072 * 2 + 5, fastwrite.JOIN_LIMIT + 1):
        body = bytes(i % 251 for i in range(size))
        ours, writes, sent, frames = _wire(fastwrite._output_marshaled_frames, body)
        theirs, their_writes, their_sent, their_frames = _wire(ORIGINAL, body)
        assert ours == theirs
        assert (sent, frames) == (their_sent, their_frames)
        # One write per message unless it is larger than the limit.
        assert writes == (1 if len(theirs) <= fastwrite.JOIN_LIMIT else their_writes)


def _published_in_order(url: str, amqp_url: str, proxy: HoldingProxy | None) -> None:
    queue = Queue(f"celeriac-test-fastwrite-{uuid.uuid4().hex[:8]}")
    reader = AMQPBroker(amqp_url, {})
    reader.connect()
    reader.declare(queue)
    writer = AMQPBroker(url, {})
    writer.connect()
    writer.declare(queue)
    sizes = [0, 10, 10_000, 300_000, 40_000] * 60
    try:
        if proxy is not None:
            proxy.hold_requests.set()
        errors: list[BaseException] = []

        def publish() -> None:
            try:
                for i, size in enumerate(sizes):
                    body = i.to_bytes(4, "big") + bytes([i % 256]) * size
                    writer.publish(Message({"n": i}, {}, body, "application/octet-stream", "binary"),
                                   "", queue.name, queue=queue)
                writer.flush()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        thread = threading.Thread(target=publish)
        thread.start()
        if proxy is not None:
            time.sleep(1.0)  # the writer's socket buffer fills up, sends go partial
            assert thread.is_alive(), "the writer should be blocked by the stalled peer"
            proxy.hold_requests.clear()
        thread.join(120)
        assert not errors, errors
        consumer = reader.consumer([queue], 100)
        got: list[int] = []
        try:
            deadline = time.monotonic() + 60
            while len(got) < len(sizes) and time.monotonic() < deadline:
                for delivery in consumer.fetch(100, 1.0):
                    body = delivery.message.body
                    n = int.from_bytes(body[:4], "big")
                    assert body[4:] == bytes([n % 256]) * sizes[n]
                    assert delivery.message.headers["n"] == n
                    got.append(n)
                    consumer.ack(delivery)
        finally:
            consumer.close()
        assert got == list(range(len(sizes)))
    finally:
        reader.delete_queue(queue.name)
        writer.close()
        reader.close()


def test_messages_cross_rabbitmq_in_order_and_intact(amqp_url: str) -> None:
    _published_in_order(amqp_url, amqp_url, None)


def test_a_stalled_peer_keeps_order_and_content(amqp_url: str) -> None:
    proxy = HoldingProxy(("127.0.0.1", 5672))
    try:
        _published_in_order(f"amqp://guest:guest@127.0.0.1:{proxy.port}//", amqp_url, proxy)
    finally:
        proxy.close()


def test_corked_writes_hold_until_the_block_ends(amqp_url: str) -> None:
    queue = f"celeriac-test-corked-{uuid.uuid4().hex[:8]}"
    params = pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F")
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, auto_delete=False)
        sends: list[int] = []
        transport = connection._impl._transport
        real_sock = transport._sock

        class _Counting:
            def __getattr__(self, name: str) -> Any:
                return getattr(real_sock, name)

            def send(self, data: bytes) -> int:
                sends.append(len(data))
                return real_sock.send(data)

        transport._sock = _Counting()
        try:
            try:
                with fastwrite.corked(connection):
                    for i in range(5):
                        channel._impl.basic_publish("", queue, str(i).encode())
                    assert sends == [], "nothing leaves while corked"
                    raise RuntimeError("boom")
            except RuntimeError:
                pass
            assert len(sends) == 1, "what was held leaves in one send"
        finally:
            transport._sock = real_sock
        bodies = []
        deadline = time.monotonic() + 10
        while len(bodies) < 5 and time.monotonic() < deadline:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            bodies.append(body)
        assert bodies == [str(i).encode() for i in range(5)]
        channel.queue_delete(queue)
    finally:
        connection.close()


def _pika_frames(channel: int, method: Any, content: tuple[Any, bytes] | None = None,
                 body_max: int = 131072 - 8) -> list[bytes]:
    """What pika's ``Connection._send_method`` marshals for ``method`` (and content)."""
    import pika.frame

    frames = [pika.frame.Method(channel, method).marshal()]
    if content is not None:
        properties, body = content
        frames.append(pika.frame.Header(channel, len(body), properties).marshal())
        for start in range(0, len(body), body_max):
            frames.append(pika.frame.Body(channel, body[start:start + body_max]).marshal())
    return frames


def test_publish_frames_are_pikas_byte_for_byte() -> None:
    props = pika.spec.BasicProperties(
        content_type="application/json", content_encoding="utf-8", delivery_mode=2, priority=3,
        correlation_id="c-1", reply_to="r\u00e9ply", headers={"id": "x", "retries": 0, "n": None},
        expiration="1000", message_id="m", timestamp=1700000000, type="t", app_id="a")
    cases = [("", "celery", b'[[2, 2], {}, {}]', props, False),
             ("ex\u00e9", "rk.topic", b"", pika.spec.BasicProperties(), True),
             ("", "q", b"x" * 300_000, props, False),  # three body frames
             ("", "q", b"y" * (131072 - 8), pika.spec.BasicProperties(delivery_mode=1), False)]
    for channel, (exchange, key, body, properties, mandatory) in enumerate(cases, start=1):
        ours = fastwrite.publish_frames(channel, exchange, key, body, properties, 131072 - 8,
                                        mandatory=mandatory)
        method = pika.spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=mandatory)
        assert ours == _pika_frames(channel, method, (properties, body))


def test_ack_and_reject_frames_are_pikas_byte_for_byte() -> None:
    sent: list[bytes] = []

    class _Connection:
        is_closed = False

        def _output_marshaled_frames(self, frames: list[bytes]) -> None:
            sent.extend(frames)

    class _Impl:
        connection = _Connection()

        def _raise_if_not_open(self) -> None:
            pass

    class _Channel:
        _impl = _Impl()
        channel_number = 7

    channel: Any = _Channel()
    fastwrite.basic_ack(channel, 2**40 + 5, multiple=True)
    fastwrite.basic_ack(channel, 1)
    fastwrite.basic_reject(channel, 9, requeue=True)
    fastwrite.basic_reject(channel, 10, requeue=False)
    expected = [
        pika.spec.Basic.Ack(delivery_tag=2**40 + 5, multiple=True),
        pika.spec.Basic.Ack(delivery_tag=1),
        pika.spec.Basic.Reject(delivery_tag=9, requeue=True),
        pika.spec.Basic.Reject(delivery_tag=10, requeue=False),
    ]
    assert sent == [frame for method in expected for frame in _pika_frames(7, method)]


def test_fast_publish_reaches_rabbitmq_intact(amqp_url: str) -> None:
    broker = AMQPBroker(amqp_url, {})
    queue = Queue(f"fastpub-{uuid.uuid4().hex[:8]}", durable=False, auto_delete=False)
    try:
        broker.declare(queue)
        bodies = [b"", b"small", bytes(range(256)) * 1200]  # the last spans three body frames
        for index, body in enumerate(bodies):
            broker.publish(Message({"i": index}, {"correlation_id": f"c{index}"}, body,
                                   "application/octet-stream", "binary"), "", queue.name)
        broker.flush()
        consumer = broker.consumer([queue], 10)
        got: list[Any] = []
        deadline = time.monotonic() + 10
        while len(got) < len(bodies) and time.monotonic() < deadline:
            got.extend(consumer.fetch(10, 0.5))
        for delivery in got:
            consumer.ack(delivery)
        consumer.close()
        assert [d.message.body for d in got] == bodies
        assert [d.message.headers for d in got] == [{"i": i} for i in range(len(bodies))]
        assert [d.message.properties["correlation_id"] for d in got] == ["c0", "c1", "c2"]
        assert broker.queue_size(queue.name) == 0  # the acks were taken
    finally:
        broker.delete_queue(queue.name)
        broker.close()
