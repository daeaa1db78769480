"""Pure logic without a server: URLs, dialects, the message codec."""

from __future__ import annotations

import pytest
from celeriac.broker.base import BATCH, BROADCAST, REPLY_QUEUES
from celeriac.exceptions import DecodeError, ImproperlyConfigured
from celeriac.protocol import Message
from celeriac.routing import Exchange, Queue
from proton import Message as AMQPMessage

from celeriac_qpid import QpidBroker, codec
from celeriac_qpid.address import (
    PlainDialect,
    RabbitMQDialect,
    Target,
    parse_url,
    topic_matches,
)
from celeriac_qpid.consumer import Source


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


# -- the plain dialect (Qpid Broker-J, ActiveMQ Artemis, Azure Service Bus): address mapping ----

PLAIN = {"broker_transport_options": {"address_dialect": "plain"}}


def _plain(url: str = "qpid://admin:admin@localhost:5672/default") -> QpidBroker:
    return QpidBroker(url, PLAIN)  # no connection until first use


def test_plain_queues_are_bare_names() -> None:
    broker = _plain()
    celery = Queue("celery")
    assert broker._targets("", "celery", celery) == [Target("celery", durable=True)]
    assert broker._source(celery) == Source("celery", "celery", True)
    assert broker._targets("", "not-declared-here", None) == [Target("not-declared-here")]
    # a priority queue is the same bare name (it must exist: see the README)
    assert broker._source(Queue("urgent", max_priority=9)).address == "urgent"
    assert broker._queue_target(Queue("transient", durable=False)) == Target("transient")


def test_plain_named_exchanges_route_to_the_queues_bound_here() -> None:
    broker = _plain()
    tasks = Exchange("tasks", type="topic")
    high = Queue("high", exchange=tasks, routing_key="task.high.#")
    low = Queue("low", exchange=tasks, routing_key="task.*")
    broker._remember(high)
    broker._remember(low)
    assert broker._targets("tasks", "task.high.x", None) == [Target("high", durable=True)]
    assert broker._targets("tasks", "task.add", None) == [Target("low", durable=True)]
    assert broker._targets("tasks", "other", None) == []  # unroutable: dropped, as on RabbitMQ
    broker._remember(Queue("all", exchange=Exchange("fan", type="fanout")))
    assert broker._targets("fan", "anything", None) == [Target("all", durable=True)]


def test_plain_unknown_exchanges_and_broadcasts_are_addresses_with_a_subject() -> None:
    broker = _plain()
    # an exchange no queue here is bound to (a remote-control reply): address X, subject K
    (reply,) = broker._targets("reply.celery.pidbox", "client-oid", None)
    assert (reply.address, reply.subject, reply.ttl) == ("reply.celery.pidbox", "client-oid", 300.0)
    (event,) = broker._targets("celeryev", "task.succeeded", None)
    assert (event.address, event.subject, event.ttl) == ("celeryev", "task.succeeded", 5.0)
    # broadcasts carry the topic (multicast) capability; subscribers match the subject
    assert broker.dialect.broadcast("celery.pidbox", "") == ("celery.pidbox", None, ("topic",))
    assert broker.dialect.subscription("celeryev", "") == ("celeryev", "#", ("topic",))
    replies = Queue("oid.reply.celery.pidbox", exchange=Exchange("reply.celery.pidbox"), routing_key="oid",
                    durable=False, auto_delete=True)
    assert broker._source(replies) == Source("oid.reply.celery.pidbox", "reply.celery.pidbox", False,
                                             ("topic",), "oid")
    assert broker._queue_target(replies).address == "reply.celery.pidbox"


def test_broadcast_can_be_declared_off() -> None:
    """For a broker with no multicast for the dialect's addresses (RabbitMQ's bare addresses,
    Service Bus): remote control and events then say they are not available."""
    assert QpidBroker("qpid://localhost//", {}).has(BROADCAST)
    broker = QpidBroker("qpid://localhost//", {"broker_transport_options": {"address_dialect": "plain",
                                                                            "broadcast": False}})
    assert not broker.has(BROADCAST) and broker.has(REPLY_QUEUES) and broker.has(BATCH)
    assert QpidBroker.capabilities == frozenset({BROADCAST, REPLY_QUEUES, BATCH})  # the class keeps it
    with pytest.raises(NotImplementedError, match="does not support broadcast"):
        broker.broadcast("celeryev", Message({}, {}, b""), "task.sent")
    with pytest.raises(NotImplementedError, match="does not support broadcast"):
        broker.subscribe("celery.pidbox")
    assert broker._reactor is None  # refused before connecting


def test_plain_virtual_host_is_the_url_path_or_the_host() -> None:
    plain, rabbit = PlainDialect(), RabbitMQDialect()
    (broker_j,) = parse_url("qpid://admin:admin@localhost:5672/default")
    (artemis,) = parse_url("qpid://artemis:artemis@localhost:5672//")
    (service_bus,) = parse_url("amqps10://RootManageSharedAccessKey:KEY@ns.servicebus.windows.net")
    assert plain.virtual_host(broker_j) == "default"
    assert plain.virtual_host(artemis) is None and plain.virtual_host(service_bus) is None
    assert (service_bus.tls, service_bus.port, service_bus.url) == (True, 5671, "amqps://ns.servicebus.windows.net:5671")
    assert rabbit.virtual_host(artemis) == "vhost:/"


def test_rabbitmq_priority_queues_are_addressed_as_existing_queues() -> None:
    broker = QpidBroker("qpid://guest:guest@localhost:5672//", {})
    assert broker._source(Queue("celery")).address == "/queue/celery"
    assert broker._source(Queue("urgent", max_priority=9)).address == "/amq/queue/urgent"


def test_wire_codec_reads_what_proton_writes_and_back() -> None:
    foreign = AMQPMessage(body=b"x" * 300, properties={"k": 1, "f": 1.5, "b": True, "s": "t"}, id="m-1",
                          correlation_id="c", annotations={"x-opt-a": "v"}, ttl=3, priority=7, durable=True,
                          subject="sub", reply_to="r", content_type="application/json")
    parsed = codec.parse(foreign.encode())
    for name in ("body", "properties", "id", "correlation_id", "ttl", "priority", "durable", "subject",
                 "reply_to", "content_type"):
        assert getattr(parsed, name) == getattr(foreign, name), name
    message = Message({"id": "x", "task": "t", "retries": 2}, {"correlation_id": "x", "priority": 3,
                                                              "delivery_mode": 2}, b"body" * 100)
    raw = AMQPMessage()
    raw.decode(codec.encode(message, subject="s", ttl=5.0))
    assert (raw.body, raw.priority, raw.durable, raw.subject, raw.ttl) == (b"body" * 100, 3, True, "s", 5.0)
    assert codec.decode(raw).headers == codec.decode(codec.parse(codec.encode(message))).headers


def test_wire_codec_refuses_garbage() -> None:
    with pytest.raises(DecodeError):
        codec.parse(b"\x00\x53\x75\xb0\xff\xff")
