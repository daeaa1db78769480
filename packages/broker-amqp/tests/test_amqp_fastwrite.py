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
