"""Pure layout logic, checked against kombu's own implementation where kombu has one."""

from __future__ import annotations

import json

import pytest
from kombu.transport.virtual.exchange import TopicExchange

from celeriac.protocol import Message
from celeriac_redis.layout import (
    CorruptEnvelope,
    Layout,
    decode_envelope,
    encode_envelope,
    topic_matches,
    topic_pattern,
)


@pytest.mark.parametrize("priority, key", [
    (None, "q"), (0, "q"), (2, "q"), (3, "q\x06\x163"), (5, "q\x06\x163"), (6, "q\x06\x166"),
    (8, "q\x06\x166"), (9, "q\x06\x169"), (42, "q\x06\x169"), (-1, "q"), ("7", "q\x06\x166"),
    ("junk", "q"),
])
def test_priority_buckets_match_kombu(priority: object, key: str) -> None:
    assert Layout().queue_key("q", priority) == key


def test_prefix_and_names() -> None:
    layout = Layout.from_options({"global_keyprefix": "p_", "priority_steps": [3, 0]}, db=4)
    assert layout.priority_steps == (0, 3)
    assert layout.queue_keys("q") == ["p_q", "p_q\x06\x163"]
    assert layout.binding_key("celery") == "p__kombu.binding.celery"
    assert layout.fanout_channel("celeryev", "worker.heartbeat") == "p_/4.celeryev/worker.heartbeat"
    assert layout.fanout_channel("celery.pidbox") == "p_/4.celery.pidbox"
    assert layout.binding_member("celery", "", "celery") == "celery\x06\x16\x06\x16celery"


@pytest.mark.parametrize("binding", ["a.#", "a.*.c", "#", "*", "x-y.#.z", "usa.news"])
def test_topic_pattern_is_kombus(binding: str) -> None:
    assert topic_pattern(binding) == TopicExchange(None).key_to_pattern(binding)


def test_topic_matching() -> None:
    assert topic_matches(topic_pattern("jobs.#"), "jobs.add.fast")
    assert not topic_matches(topic_pattern("jobs.#"), "other.add")
    assert topic_matches(topic_pattern("a.*"), "a.b")
    assert not topic_matches("(", "x")


def test_envelope_round_trip_and_errors() -> None:
    message = Message({"id": "1", "eta": None}, {"correlation_id": "1", "priority": None},
                      b"\x00\xffbin", "application/x-python-serialize", "binary")
    tag, raw = encode_envelope(message, "ex", "rk")
    env = json.loads(raw)
    assert env["properties"]["priority"] == 0 and env["properties"]["delivery_tag"] == tag
    back, exchange, routing_key, got_tag, redelivered = decode_envelope(raw)
    assert (back.body, back.headers, exchange, routing_key, got_tag, redelivered) == \
        (message.body, message.headers, "ex", "rk", tag, False)
    assert "delivery_info" not in back.properties
    plain = json.dumps({"body": "[1]", "headers": {"redelivered": True}, "properties": {}})
    assert decode_envelope(plain)[0].body == b"[1]" and decode_envelope(plain)[4]
    for bad in (b"\xff", b"[]", b'{"no": "body"}'):
        with pytest.raises(CorruptEnvelope):
            decode_envelope(bad)
