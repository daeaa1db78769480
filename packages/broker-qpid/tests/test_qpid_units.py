"""Pure logic without a server: URLs, dialects, the message codec."""

from __future__ import annotations

import pytest
from celeriac.exceptions import DecodeError, ImproperlyConfigured
from celeriac.protocol import Message
from proton import Message as AMQPMessage

from celeriac_qpid import codec
from celeriac_qpid.address import (
    PlainDialect,
    RabbitMQDialect,
    parse_url,
    topic_matches,
)


def test_urls() -> None:
    (one,) = parse_url("qpid://guest:guest@localhost:5672//")
    assert (one.host, one.port, one.user, one.password, one.vhost, one.tls) == (
        "localhost", 5672, "guest", "guest", "/", False)
    (tls,) = parse_url("amqps10://u:p%40ss@broker.example.com/prod")
    assert (tls.port, tls.password, tls.vhost, tls.tls, tls.url) == (
        5671, "p@ss", "prod", True, "amqps://broker.example.com:5671")
    assert len(parse_url("qpid://a:5672//;amqp10://b:5672//")) == 2
    with pytest.raises(ImproperlyConfigured, match=r"amqp://u:\*\*@h"):
        parse_url("amqp://u:secret@h//")


def test_dialects() -> None:
    rabbit, plain = RabbitMQDialect(), PlainDialect()
    assert rabbit.queue("celery") == "/queue/celery"
    assert rabbit.existing_queue("a/b") == "/amq/queue/a%2Fb"
    assert rabbit.broadcast("celery.pidbox", "")[0] == "/topic/celery_pidbox"
    assert rabbit.subscription("celeryev", "worker.*")[0] == "/topic/celeryev.worker.*"
    assert plain.queue("celery") == "celery"
    assert plain.broadcast("celeryev", "task.sent") == ("celeryev", "task.sent", ("topic",))
    assert plain.subscription("celeryev", "task.#") == ("celeryev", "task.#", ("topic",))
    assert topic_matches("task.#", "task.sent") and not topic_matches("worker.*", "task.sent")


def test_codec_round_trip_keeps_every_header_and_property() -> None:
    headers = {"id": "x", "eta": None, "retries": 3, "timelimit": [None, 10], "stamps": {"a": [1]},
               "big": 1 << 70, "flag": False, "ratio": 0.5, "text": "héllo"}
    props = {"correlation_id": "x", "reply_to": "r", "delivery_mode": 2, "priority": 0,
             "expiration": "60000", "app_id": "me"}
    message = Message(headers, props, b"\x00\x01body", "application/x-test", "binary")
    raw = AMQPMessage()
    raw.decode(codec.encode(message))
    back = codec.decode(raw)
    assert back.headers == headers
    assert back.properties == props
    assert (back.body, back.content_type, back.content_encoding) == (b"\x00\x01body", "application/x-test", "binary")


def test_codec_refuses_a_map_body() -> None:
    with pytest.raises(DecodeError, match="AMQP value of type dict"):
        codec.decode(AMQPMessage(body={"a": 1}))
