"""The fast field-table and properties codecs give exactly what pika's own give (pure logic:
pika's originals are the reference), and a message still crosses RabbitMQ intact."""

from __future__ import annotations

import datetime as dt
import decimal
import random
import uuid

import pika
import pika.compat
import pika.exceptions
import pytest
from celeriac.protocol import Message
from celeriac.routing import Queue

from celeriac_amqp import AMQPBroker, fastcodec

fastcodec.install()
ORIGINAL = fastcodec._installed
CELERY_HEADERS = {
    "lang": "py", "task": "proj.tasks.add", "id": str(uuid.uuid4()), "shadow": None,
    "eta": "2026-11-30T10:00:00.000001+00:00", "expires": None, "group": None, "group_index": None,
    "retries": 0, "timelimit": [10.5, None], "root_id": str(uuid.uuid4()), "parent_id": None,
    "argsrepr": "(2, 2)", "kwargsrepr": "{}", "origin": "gen1@host", "ignore_result": False,
    "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
}


def _values(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(12 if depth < 2 else 9)
    return [
        lambda: rng.randrange(-2**31, 2**31),
        lambda: rng.randrange(-2**63, 2**63),
        lambda: rng.random() * 10**rng.randrange(-5, 5),
        lambda: "".join(rng.choice("abcé✓ \x00") for _ in range(rng.randrange(40))),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(20))),
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: decimal.Decimal(rng.randrange(-10**6, 10**6)) / 1000,
        lambda: dt.datetime.fromtimestamp(rng.randrange(2**31), dt.timezone.utc),
        lambda: [_values(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {f"k{i}": _values(rng, depth + 1) for i in range(rng.randrange(4))},
        lambda: pika.compat.long(rng.randrange(100)),
    ][kind]()


def _encode_with(encode: object, table: dict) -> bytes:
    pieces: list[bytes] = []
    size = encode(pieces, table)  # type: ignore[operator]
    raw = b"".join(pieces)
    assert size == len(raw)
    return raw


@pytest.mark.parametrize("seed", range(40))
def test_tables_encode_and_decode_exactly_as_pika_does(seed: int) -> None:
    rng = random.Random(seed)
    table = {f"h{i}": _values(rng) for i in range(rng.randrange(1, 25))}
    if seed == 0:
        table = dict(CELERY_HEADERS)
    ours = _encode_with(fastcodec.encode_table, table)
    assert ours == _encode_with(ORIGINAL["encode_table"], table)
    assert fastcodec.decode_table(ours + b"tail", 0) == ORIGINAL["decode_table"](ours + b"tail", 0)


def test_every_wire_type_decodes_as_pika_does() -> None:
    items = [b"t\x01", b"b\xff", b"B\xff", b"s\xff\xfe", b"U\xff\xfe", b"u\xff\xfe",
             b"I\xff\xff\xff\xfe", b"i\xff\xff\xff\xfe", b"l" + b"\xff" * 8, b"L" + b"\xff" * 8,
             b"f\x3f\xc0\x00\x00", b"d\x3f\xf8" + b"\x00" * 6, b"D\x02\x00\x00\x01\x00",
             b"S\x00\x00\x00\x02\xff\xfe", b"x\x00\x00\x00\x01z", b"T\x00\x00\x00\x00\x65\x00\x00\x00",
             b"V", b"A\x00\x00\x00\x02t\x00", b"F\x00\x00\x00\x00"]
    body = b"".join(bytes([1]) + bytes([65 + i]) + item for i, item in enumerate(items))
    raw = len(body).to_bytes(4, "big") + body
    assert fastcodec.decode_table(raw, 0) == ORIGINAL["decode_table"](raw, 0)
    with pytest.raises(pika.exceptions.InvalidFieldTypeException):
        fastcodec.decode_table(b"\x00\x00\x00\x03\x01kZ", 0)


@pytest.mark.parametrize("seed", range(10))
def test_properties_decode_as_pika_does(seed: int) -> None:
    rng = random.Random(seed)
    fields = {"content_type": "application/json", "content_encoding": "utf-8",
              "headers": dict(CELERY_HEADERS), "delivery_mode": 2, "priority": 7,
              "correlation_id": str(uuid.uuid4()), "reply_to": "r.q", "expiration": "1000",
              "message_id": "m", "timestamp": 1700000000, "type": "t", "user_id": "guest",
              "app_id": "a", "cluster_id": "c"}
    chosen = {k: v for k, v in fields.items() if rng.random() < 0.6}
    encoded = b"".join(pika.BasicProperties(**chosen).encode())
    ours = fastcodec.decode_properties(pika.BasicProperties(), encoded)
    theirs = ORIGINAL["decode_properties"](pika.BasicProperties(), encoded)
    assert vars(ours) == vars(theirs)


@pytest.mark.parametrize("seed", range(20))
def test_properties_encode_as_pika_does(seed: int) -> None:
    rng = random.Random(seed)
    fields = {"content_type": "application/json", "content_encoding": b"utf-8",
              "headers": dict(CELERY_HEADERS) if seed % 2 else {"é": [1, "x"], b"raw": None},
              "delivery_mode": 2, "priority": 7, "correlation_id": str(uuid.uuid4()),
              "reply_to": "r.q", "expiration": "1000", "message_id": "m",
              "timestamp": 1700000000, "type": "t", "user_id": "guest", "app_id": "a",
              "cluster_id": "c"}
    chosen = {k: v for k, v in fields.items() if rng.random() < 0.6}
    properties = pika.BasicProperties(**chosen)
    assert b"".join(fastcodec.encode_properties(properties)) == b"".join(ORIGINAL["encode_properties"](properties))


def test_property_and_key_limits_are_kept() -> None:
    with pytest.raises(pika.exceptions.ShortStringTooLong):
        fastcodec.encode_properties(pika.BasicProperties(reply_to="r" * 256))
    with pytest.raises(ValueError, match="255 bytes"):
        fastcodec.encode_table([], {"k" * 256: 1})
    assert fastcodec.encode_table(pieces := [], {}) == 4 and b"".join(pieces) == b"\x00\x00\x00\x00"


def test_a_celery_message_crosses_rabbitmq_intact(broker: AMQPBroker) -> None:
    queue = Queue(f"celeriac-test-codec-{uuid.uuid4().hex[:8]}")
    broker.declare(queue)
    try:
        sent = Message(dict(CELERY_HEADERS), {"delivery_mode": 2, "priority": 3, "correlation_id": "c1",
                                              "reply_to": "back"}, b'[[2, 2], {}, {}]',
                       "application/json", "utf-8")
        broker.publish(sent, "", queue.name, queue=queue)
        consumer = broker.consumer([queue], 1)
        try:
            got = consumer.fetch(1, 10)
            assert got and got[0].message.headers == sent.headers
            assert got[0].message.properties["priority"] == 3
            assert got[0].message.properties["reply_to"] == "back"
            consumer.ack(got[0])
        finally:
            consumer.close()
    finally:
        broker.delete_queue(queue.name)
