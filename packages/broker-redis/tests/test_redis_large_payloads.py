"""Large bodies and the fetch script's reading of envelopes (issue 13).

The envelope is built and parsed without running a large base64 body through the JSON encoder
and decoder; the bytes on the wire stay those of ``json_dumps`` of kombu's envelope, and large
bodies cross intact both ways with Celery's kombu. The FETCH script finds the delivery tag and
delivery info with plain string searches and stops a batch at a byte budget.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kombu
import pytest
import redis
from redis_support import wait_for

from celeriac.protocol import Message, decode_task, encode_task
from celeriac.routing import Queue
from celeriac.serialization import json_dumps
from celeriac_redis import RedisBroker
from celeriac_redis.layout import CorruptEnvelope, decode_envelope, encode_envelope

#: 5 MB of text that JSON has to escape (quotes, backslashes, new lines) and non-ASCII.
BIG = ('ab"c\\d\né€' * 700_000)[:5_000_000]


@pytest.fixture
def broker(redis_url: str, broker_conf: Callable[..., dict[str, Any]]) -> Iterator[RedisBroker]:
    b = RedisBroker(redis_url, broker_conf())
    yield b
    b.close()


def _task(*args: Any) -> Message:
    return encode_task("proj.digest", str(uuid.uuid4()), list(args), {})


# -- the envelope, without a server ----------------------------------------------------------

@pytest.mark.parametrize("message", [
    Message({"id": "1", "eta": None, "note": 'é"\\/\n\u2028'}, {"correlation_id": "1", "priority": None},
            b"\x00\xffbin", "application/x-python-serialize", "binary"),
    Message({}, {}, b"", "application/json", "utf-8"),
    Message(None, {"priority": 9, "reply_to": "r"}, b'[["x"], {}, {}]'),  # type: ignore[arg-type]
    _task(BIG),
])
def test_envelope_bytes_are_the_json_of_kombus_envelope(message: Message) -> None:
    """The joined-up envelope is byte for byte ``json_dumps`` of the whole document."""
    tag, raw = encode_envelope(message, "ex", "rk", extra_properties={"celeriac_not_before": 1.5})
    props = dict(message.properties)
    props["delivery_info"] = {"exchange": "ex", "routing_key": "rk"}
    props["priority"] = props.get("priority") or 0
    props.update(body_encoding="base64", delivery_tag=tag, celeriac_not_before=1.5)
    assert raw == json_dumps({
        "body": base64.b64encode(message.body).decode("ascii"),
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": message.headers if message.headers is not None else {},
        "properties": props,
    })
    assert decode_envelope(raw)[0].body == message.body


def _kombu_style(body: str, encoding: str = "base64", **dumps: Any) -> bytes:
    env = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
           "headers": {"id": "k", "x": "é"},
           "properties": {"delivery_info": {"exchange": "", "routing_key": "q"}, "priority": 0,
                          "body_encoding": encoding, "delivery_tag": "t1"}}
    return json.dumps(env, **dumps).encode()


@pytest.mark.parametrize("raw", [
    _kombu_style(base64.b64encode(b"[1, 2]").decode()),                   # kombu (ensure_ascii)
    _kombu_style(base64.b64encode(b"[1, 2]").decode(), separators=(",", ":")),  # compact JSON
    _kombu_style('["a\\"b", "\\u00e9"]', encoding="utf-8"),               # a text body with escapes
    _kombu_style('["a", "é"]', encoding="utf-8", ensure_ascii=False),     # raw UTF-8 text body
    _kombu_style(""),                                                     # empty body
    _kombu_style("W1sx\nXV0="),                                           # base64 with a line break
    b'{"body": "W1sxXV0=", "body": "W1syXV0=", "properties": {"body_encoding": "base64"}}',
    b'{"body": "W1sxXV0="}',
])
def test_envelope_parsing_matches_a_full_json_parse(raw: bytes) -> None:
    """Bytes take the fast path (body sliced out); text is parsed whole: same result."""
    assert decode_envelope(raw) == decode_envelope(raw.decode("utf-8"))


@pytest.mark.parametrize("raw", [
    b'{"body": "W1sxXV0=", "properties": ',          # cut short after the body
    b'{"body": "W1sxXV0=" "properties": {}}',         # no comma
    b'{"body": "\xff\xfe", "properties": {}}',        # not UTF-8, not base64
    b'{"body": "abc',                                 # no closing quote
])
def test_broken_envelopes_are_corrupt_not_crashes(raw: bytes) -> None:
    with pytest.raises(CorruptEnvelope):
        decode_envelope(raw)


# -- against Redis ----------------------------------------------------------------------------

def test_big_body_from_us_reaches_kombu_intact(broker: RedisBroker, redis_url: str,
                                               prefix: str) -> None:
    message = _task(BIG)
    broker.publish(message, "", "celery", queue=Queue("celery"))
    conn = kombu.Connection(redis_url, transport_options={"global_keyprefix": prefix})
    try:
        simple = conn.SimpleQueue(kombu.Queue("celery", kombu.Exchange("celery"), "celery"))
        got = simple.get(timeout=10)
        assert got.headers["id"] == message.headers["id"]
        assert got.decode()[0] == [BIG]
        got.ack()
        simple.close()
    finally:
        conn.release()


def test_big_body_from_a_celery_client_reaches_us_intact(broker: RedisBroker, redis_url: str,
                                                         raw: redis.Redis, prefix: str) -> None:
    import celery

    app = celery.Celery("big", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    try:
        sent = app.send_task("proj.digest", args=[BIG])
    finally:
        app.close()
    consumer = broker.consumer([Queue("celery")], prefetch=4)
    (delivery,) = wait_for(lambda: consumer.fetch(4, 0.5), 10, "Celery's message")
    assert delivery.message.headers["id"] == sent.id and not delivery.redelivered
    assert decode_task(delivery.message, None).args == [BIG]
    assert raw.hexists(prefix + "unacked", delivery.tag)
    consumer.ack(delivery)
    consumer.flush()
    assert raw.hlen(prefix + "unacked") == 0 and raw.zcard(prefix + "unacked_index") == 0
    consumer.close()


def test_a_batch_of_large_bodies_stops_at_the_byte_budget(broker: RedisBroker, raw: redis.Redis,
                                                          prefix: str) -> None:
    """Five 2.7 MB envelopes with room for 100: a fetch takes a few; nothing is lost, the order
    is kept and every message taken is recorded as unacked."""
    sent = [_task("x" * 2_000_000) for _ in range(5)]
    for message in sent:
        broker.publish(message, "", "celery", queue=Queue("celery"))
    consumer = broker.consumer([Queue("celery")], prefetch=100)
    got = wait_for(lambda: consumer.fetch(100, 0.5), 10, "the first batch")
    assert 1 <= len(got) < 5
    assert raw.hlen(prefix + "unacked") == len(got)
    while len(got) < 5:
        got += consumer.fetch(100, 0.5)
    assert [d.message.headers["id"] for d in got] == [m.headers["id"] for m in sent]
    assert raw.hlen(prefix + "unacked") == 5 and raw.llen(prefix + "celery") == 0
    for delivery in got:
        consumer.ack(delivery)
    consumer.flush()
    assert raw.hlen(prefix + "unacked") == 0
    consumer.close()


def test_small_messages_are_not_held_back_by_the_budget(broker: RedisBroker) -> None:
    for _ in range(50):
        broker.publish(_task(1), "", "celery", queue=Queue("celery"))
    consumer = broker.consumer([Queue("celery")], prefetch=100)
    got = wait_for(lambda: consumer.fetch(100, 0.5), 10, "the batch")
    assert len(got) == 50
    for delivery in got:
        consumer.ack(delivery)
    consumer.close()


def test_a_header_named_delivery_tag_does_not_mislead_the_fetch(broker: RedisBroker, raw: redis.Redis,
                                                                prefix: str) -> None:
    """The unacked entry is keyed by the properties' tag (the one the ack removes), not by a
    user header of the same name that comes first in the envelope."""
    message = _task(1)
    message.headers["delivery_tag"] = "not-the-tag"
    broker.publish(message, "", "celery", queue=Queue("celery"))
    consumer = broker.consumer([Queue("celery")], prefetch=4)
    (delivery,) = wait_for(lambda: consumer.fetch(4, 0.5), 5, "the message")
    assert delivery.tag != "not-the-tag"
    assert raw.hkeys(prefix + "unacked") == [delivery.tag.encode()]
    consumer.ack(delivery)
    consumer.flush()
    assert raw.hlen(prefix + "unacked") == 0 and raw.zcard(prefix + "unacked_index") == 0
    consumer.close()


def test_compact_json_envelope_is_delivered_not_dead_lettered(broker: RedisBroker, raw: redis.Redis,
                                                              prefix: str) -> None:
    """Another producer's envelope without kombu's spacing is still a kombu envelope."""
    body = base64.b64encode(json_dumps([[3], {}, {}])).decode()
    env = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
           "headers": {"task": "proj.digest", "id": "c1"},
           "properties": {"delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
                          "body_encoding": "base64", "delivery_tag": "compact-1"}}
    raw.lpush(prefix + "celery", json.dumps(env, separators=(",", ":")))
    consumer = broker.consumer([Queue("celery")], prefetch=4)
    (delivery,) = wait_for(lambda: consumer.fetch(4, 0.5), 5, "the message")
    assert delivery.tag == "compact-1" and decode_task(delivery.message, None).args == [3]
    assert raw.hkeys(prefix + "unacked") == [b"compact-1"]
    assert raw.llen(prefix + "celeriac.dead") == 0
    consumer.ack(delivery)
    consumer.flush()
    assert raw.hlen(prefix + "unacked") == 0
    consumer.close()


def test_a_requeued_big_message_comes_back_intact(broker: RedisBroker, raw: redis.Redis,
                                                  prefix: str) -> None:
    message = _task(BIG)
    broker.publish(message, "", "celery", queue=Queue("celery"))
    consumer = broker.consumer([Queue("celery")], prefetch=4)
    (first,) = wait_for(lambda: consumer.fetch(4, 0.5), 10, "the message")
    consumer.reject(first, requeue=True)
    (again,) = wait_for(lambda: consumer.fetch(4, 0.5), 10, "the requeued message")
    assert again.redelivered and again.tag == first.tag
    assert decode_task(again.message, None).args == [BIG]
    consumer.ack(again)
    consumer.flush()
    assert raw.hlen(prefix + "unacked") == 0
    consumer.close()


def test_a_big_parked_message_is_delivered_intact(redis_url: str, raw: redis.Redis, prefix: str,
                                                  broker_conf: Callable[..., dict[str, Any]]) -> None:
    """The restore drops the parked marker from a large envelope and keeps the rest as it was."""
    broker = RedisBroker(redis_url, broker_conf(native_delay=True))
    try:
        message = _task(BIG)
        broker.publish(message, "", "celery", queue=Queue("celery"), not_before=time.time() + 0.2)
        assert raw.hlen(prefix + "unacked") == 1 and raw.llen(prefix + "celery") == 0
        wait_for(lambda: broker.sweep()[0] == 1, 10, "the parked message to be due")
        stored = raw.lindex(prefix + "celery", 0)
        assert stored is not None and b"celeriac_not_before" not in stored
        decoded, exchange, routing_key, _, redelivered = decode_envelope(stored)
        assert (exchange, routing_key, redelivered) == ("", "celery", False)
        assert decoded.headers["id"] == message.headers["id"] and decode_task(decoded, None).args == [BIG]
        assert raw.hlen(prefix + "unacked") == 0
    finally:
        broker.close()
