"""The offset-walking frame decoder (``celeriac_amqp.fastread``) yields exactly the frames, byte
counts and errors of pika's own decoder, however the stream is cut into reads (pure logic:
pika's original is the reference), and consumers still receive over a real connection."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
import pytest
from celeriac.protocol import Message
from celeriac.routing import Queue

from celeriac_amqp import AMQPBroker, fastread

fastread.install()
ORIGINAL = fastread._installed["_on_data_available"]


class _Sink:
    """What ``_on_data_available`` touches on a pika connection."""

    def __init__(self) -> None:
        self._frame_buffer = b""
        self.bytes_received = 0
        self.frames: list[tuple[str, Any]] = []

    def _trim_frame_buffer(self, byte_count: int) -> None:
        pika.connection.Connection._trim_frame_buffer(self, byte_count)  # type: ignore[arg-type]

    def _read_frame(self) -> Any:
        return pika.frame.decode_frame(self._frame_buffer)

    def _process_frame(self, value: Any) -> None:
        self.frames.append((type(value).__name__, _describe(value)))


def _describe(value: Any) -> Any:
    if isinstance(value, pika.frame.Method):
        return value.channel_number, type(value.method).__name__, vars(value.method)
    if isinstance(value, pika.frame.Header):
        return value.channel_number, value.body_size, vars(value.properties)
    if isinstance(value, pika.frame.Body):
        return value.channel_number, value.fragment
    if isinstance(value, pika.frame.ProtocolHeader):
        return value.major, value.minor, value.revision
    return None


def _stream(rng: random.Random) -> bytes:
    frames: list[bytes] = [pika.frame.ProtocolHeader().marshal()]
    for n in range(rng.randrange(1, 60)):
        channel = rng.randrange(1, 4)
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 3000)))
        deliver = pika.spec.Basic.Deliver(consumer_tag=f"ctag{n}", delivery_tag=n + 1,
                                          redelivered=rng.random() < 0.3, exchange="",
                                          routing_key=f"q{n}")
        props = pika.BasicProperties(content_type="application/json", headers={"id": str(n), "x": [1, None]},
                                     delivery_mode=2, correlation_id=str(uuid.UUID(int=n)))
        frames.append(pika.frame.Method(channel, deliver).marshal())
        frames.append(pika.frame.Header(channel, len(body), props).marshal())
        if body:
            frames.append(pika.frame.Body(channel, body).marshal())
        if rng.random() < 0.2:
            frames.append(pika.frame.Heartbeat().marshal())
    return b"".join(frames)


def _feed(handler: Any, data: bytes, cuts: list[int]) -> _Sink:
    sink = _Sink()
    last = 0
    for cut in [*cuts, len(data)]:
        handler(sink, data[last:cut])
        last = cut
    return sink


@pytest.mark.parametrize("seed", range(30))
def test_frames_and_counts_are_pikas_however_the_reads_are_cut(seed: int) -> None:
    rng = random.Random(seed)
    data = _stream(rng)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 40))))
    ours, theirs = _feed(fastread._on_data_available, data, cuts), _feed(ORIGINAL, data, cuts)
    assert ours.frames == theirs.frames
    assert ours.bytes_received == theirs.bytes_received == len(data)
    assert ours._frame_buffer == theirs._frame_buffer == b""


def test_an_incomplete_tail_waits_and_a_bad_frame_end_raises_as_in_pika() -> None:
    frame = pika.frame.Heartbeat().marshal()
    sink = _Sink()
    fastread._on_data_available(sink, frame + frame[:3])
    assert len(sink.frames) == 1 and sink._frame_buffer == frame[:3]
    fastread._on_data_available(sink, frame[3:])
    assert len(sink.frames) == 2 and sink._frame_buffer == b""
    bad = frame[:-1] + b"\x00"
    for handler in (fastread._on_data_available, ORIGINAL):
        with pytest.raises(pika.exceptions.InvalidFrameError):
            handler(_Sink(), bad)


def test_a_reset_during_processing_drops_the_rest_as_pika_does() -> None:
    frame = pika.frame.Heartbeat().marshal()

    class _Closing(_Sink):
        def _process_frame(self, value: Any) -> None:
            super()._process_frame(value)
            self._frame_buffer = b""  # what pika's connection reset does

    for handler in (fastread._on_data_available, ORIGINAL):
        sink = _Closing()
        handler(sink, frame * 3)
        assert len(sink.frames) == 1 and sink._frame_buffer == b""


def test_deliveries_cross_rabbitmq_intact(broker: AMQPBroker) -> None:
    queue = Queue(f"celeriac-test-fastread-{uuid.uuid4().hex[:8]}")
    broker.declare(queue)
    try:
        for i in range(500):
            broker.publish(Message({"n": i}, {}, bytes([i % 256]) * (i * 7), "application/octet-stream",
                                   "binary"), "", queue.name, queue=queue)
        broker.flush()
        consumer = broker.consumer([queue], 200)
        got: list[int] = []
        try:
            while len(got) < 500:
                batch = consumer.fetch(200, 10)
                assert batch, f"only {len(got)} of 500 arrived"
                for delivery in batch:
                    n = delivery.message.headers["n"]
                    assert delivery.message.body == bytes([n % 256]) * (n * 7)
                    got.append(n)
                    consumer.ack(delivery)
        finally:
            consumer.close()
        assert got == list(range(500))
    finally:
        broker.delete_queue(queue.name)
