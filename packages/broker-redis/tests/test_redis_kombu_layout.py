"""Wire compatibility with kombu's Redis transport, checked with kombu's own code and raw keys."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kombu
import pytest
import redis
from redis_support import wait_for

from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol import decode_task, encode_task
from celeriac.routing import Exchange, Queue
from celeriac_redis import RedisBroker


@pytest.fixture
def broker(redis_url: str, broker_conf: Callable[..., dict[str, Any]]) -> Iterator[RedisBroker]:
    b = RedisBroker(redis_url, broker_conf())
    yield b
    b.close()


@pytest.fixture
def kconn(redis_url: str, prefix: str) -> Iterator[kombu.Connection]:
    conn = kombu.Connection(redis_url, transport_options={"global_keyprefix": prefix})
    yield conn
    conn.release()


def _task(name: str = "proj.add", args: list[Any] | None = None, **kw: Any) -> Any:
    return encode_task(name, str(uuid.uuid4()), args or [2, 2], {}, **kw)


def test_kombu_reads_what_we_publish(broker: RedisBroker, kconn: kombu.Connection,
                                     raw: redis.Redis, prefix: str) -> None:
    message = _task(args=[2, 3])
    broker.publish(message, "", "celery", queue=Queue("celery"))
    stored = json.loads(raw.lindex(prefix + "celery", 0))
    assert set(stored) == {"body", "content-encoding", "content-type", "headers", "properties"}
    props = stored["properties"]
    assert props["delivery_info"] == {"exchange": "", "routing_key": "celery"}
    assert props["body_encoding"] == "base64"
    assert props["priority"] == 0 and uuid.UUID(props["delivery_tag"])
    assert raw.sismember(prefix + "_kombu.binding.celery", "celery\x06\x16\x06\x16celery")
    assert raw.sismember(prefix + "_kombu.binding_permanent.celery", "celery\x06\x16\x06\x16celery")
    simple = kconn.SimpleQueue(kombu.Queue("celery", kombu.Exchange("celery"), "celery"))
    got = simple.get(timeout=5)
    assert got.headers["id"] == message.headers["id"]
    assert got.properties["correlation_id"] == message.headers["id"]
    assert got.decode() == [[2, 3], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                         "chord": None}]
    got.ack()
    simple.close()


def test_we_read_what_kombu_publishes_with_priority(broker: RedisBroker, kconn: kombu.Connection,
                                                    raw: redis.Redis, prefix: str) -> None:
    producer = kconn.Producer()
    queue = kombu.Queue("jobs", kombu.Exchange("jobs"), "jobs")
    producer.publish([[1], {}, {}], routing_key="jobs", declare=[queue], priority=5,
                     headers={"task": "proj.t", "id": "k1"}, correlation_id="k1")
    assert raw.llen(prefix + "jobs\x06\x163") == 1
    consumer = broker.consumer([Queue("jobs")], prefetch=10)
    got = wait_for(lambda: consumer.fetch(10, 0.5), 5, "kombu's message")
    assert len(got) == 1
    delivery = got[0]
    assert delivery.queue == "jobs" and delivery.routing_key == "jobs"
    assert decode_task(delivery.message, None).args == [1]
    assert delivery.message.properties["priority"] == 5
    entry = json.loads(raw.hget(prefix + "unacked", delivery.tag))
    assert entry[1:] == ["", "jobs"] and entry[0]["headers"]["id"] == "k1"
    assert abs(raw.zscore(prefix + "unacked_index", delivery.tag) - time.time()) < 5
    consumer.ack(delivery)
    consumer.flush()
    assert raw.hlen(prefix + "unacked") == 0 and raw.zcard(prefix + "unacked_index") == 0
    consumer.close()


def test_kombu_sweep_restores_our_unacked_message(broker: RedisBroker, kconn: kombu.Connection,
                                                  raw: redis.Redis, prefix: str) -> None:
    message = _task()
    broker.publish(message, "", "celery", queue=Queue("celery"))
    consumer = broker.consumer([Queue("celery")], prefetch=1)
    (delivery,) = wait_for(lambda: consumer.fetch(1, 0.5), 5, "our message")
    raw.zadd(prefix + "unacked_index", {delivery.tag: time.time() - 7200})  # as if we died
    kconn.default_channel.qos.restore_visible(num=10, interval=1)
    simple = kconn.SimpleQueue(kombu.Queue("celery", kombu.Exchange("celery"), "celery"))
    got = simple.get(timeout=5)
    assert got.headers["id"] == message.headers["id"]
    assert got.headers["redelivered"] is True
    got.ack()
    simple.close()
    consumer.close()


def test_our_sweep_restores_kombus_unacked_message(broker: RedisBroker, kconn: kombu.Connection,
                                                   raw: redis.Redis, prefix: str) -> None:
    queue = kombu.Queue("celery", kombu.Exchange("celery"), "celery")
    kconn.Producer().publish([[7], {}, {}], routing_key="celery", declare=[queue],
                             headers={"task": "proj.t", "id": "k7"})
    other = kombu.Connection(kconn.as_uri(include_password=True),
                             transport_options={"global_keyprefix": prefix})
    simple = other.SimpleQueue(queue)
    held = simple.get(timeout=5)  # kombu holds it unacked, then "dies"
    tag = held.delivery_tag
    assert raw.hexists(prefix + "unacked", tag)
    raw.zadd(prefix + "unacked_index", {tag: time.time() - 7200})
    moved, _ = broker.sweep()
    assert moved == 1
    consumer = broker.consumer([Queue("celery")], prefetch=1)
    (delivery,) = wait_for(lambda: consumer.fetch(1, 0.5), 5, "the restored message")
    assert delivery.message.headers["id"] == "k7" and delivery.redelivered
    consumer.ack(delivery)
    consumer.close()
    other.release()


def test_parked_delayed_message_is_delivered_by_kombus_sweep(
        redis_url: str, broker_conf: Callable[..., dict[str, Any]], kconn: kombu.Connection,
        raw: redis.Redis, prefix: str) -> None:
    broker = RedisBroker(redis_url, broker_conf(native_delay=True))  # parks at publish time
    message = _task()
    due = time.time() + 0.3
    broker.publish(message, "", "celery", queue=Queue("celery"), not_before=due)
    assert raw.llen(prefix + "celery") == 0
    assert raw.hlen(prefix + "unacked") == 1
    wait_for(lambda: time.time() > due + 0.05, 2, "the due time")
    kconn.default_channel.qos.restore_visible(num=10, interval=1)
    simple = kconn.SimpleQueue(kombu.Queue("celery", kombu.Exchange("celery"), "celery"))
    got = simple.get(timeout=5)
    assert got.headers["id"] == message.headers["id"]
    got.ack()
    simple.close()
    broker.close()


def test_exchange_bindings_are_shared(broker: RedisBroker, kconn: kombu.Connection) -> None:
    topic = kombu.Exchange("tx", type="topic")
    kq = kombu.Queue("kq", topic, routing_key="jobs.#")
    kq(kconn.default_channel).declare()
    broker.declare(Queue("ours", Exchange("dx"), "jobs"))
    broker.publish(_task(), "tx", "jobs.add")
    kconn.Producer().publish([[1], {}, {}], exchange=kombu.Exchange("dx"), routing_key="jobs",
                             headers={"task": "proj.t", "id": "to-ours"})
    simple = kconn.SimpleQueue(kq)
    assert simple.get(timeout=5).headers["task"] == "proj.add"
    simple.close()
    consumer = broker.consumer([Queue("ours", Exchange("dx"), "jobs")], prefetch=1)
    (delivery,) = wait_for(lambda: consumer.fetch(1, 0.5), 5, "kombu's message")
    assert delivery.message.headers["id"] == "to-ours" and delivery.exchange == "dx"
    consumer.ack(delivery)
    consumer.close()


def test_corrupt_envelope_is_dead_lettered(broker: RedisBroker, raw: redis.Redis,
                                           prefix: str) -> None:
    raw.lpush(prefix + "celery", b"\xff not json")
    raw.lpush(prefix + "celery", b'{"body": "!!", "properties": "x", "delivery_tag": "zz"}')
    good = _task()
    broker.publish(good, "", "celery")
    consumer = broker.consumer([Queue("celery")], prefetch=10)
    got = wait_for(lambda: consumer.fetch(10, 0.5), 5, "the good message")
    assert [d.message.headers["id"] for d in got] == [good.headers["id"]]
    assert raw.llen(prefix + "celeriac.dead") == 2
    consumer.ack(got[0])
    consumer.flush()
    assert raw.hlen(prefix + "unacked") == 0
    consumer.close()


def test_broadcasts_use_kombus_fanout_channels(broker: RedisBroker, kconn: kombu.Connection,
                                               raw: redis.Redis, prefix: str) -> None:
    sub = broker.subscribe("celeryev", "worker.#")
    exchange = kombu.Exchange("celeryev", type="fanout")
    exchange(kconn.default_channel).declare()  # kombu picks PUBLISH only for declared fanouts
    kconn.Producer().publish({"type": "worker-heartbeat"}, exchange=exchange,
                             routing_key="worker.heartbeat", serializer="json")
    got = wait_for(lambda: sub.fetch(0.5), 5, "the kombu broadcast")
    assert json.loads(got[0].body) == {"type": "worker-heartbeat"}
    sub.close()
    listener = raw.pubsub()
    listener.subscribe(prefix + "/9.celery.pidbox")
    wait_for(lambda: listener.get_message(timeout=0.2), 5, "the subscription")
    broker.broadcast("celery.pidbox", _task("ping"))
    msg = wait_for(lambda: listener.get_message(timeout=0.2), 5, "our broadcast")
    assert json.loads(msg["data"])["headers"]["task"] == "ping"
    listener.close()


def test_requeue_routes_through_a_topic_exchange_again(broker: RedisBroker, raw: redis.Redis,
                                                       prefix: str) -> None:
    topic = Exchange("tx2", "topic")
    fast, other = Queue("fast", topic, "jobs.*.fast"), Queue("other", topic, "jobs.#")
    broker.declare(fast)
    broker.declare(other)
    broker.publish(_task(), "tx2", "jobs.add.fast")
    assert raw.llen(prefix + "fast") == 1 and raw.llen(prefix + "other") == 1
    consumer = broker.consumer([fast], prefetch=1)
    (delivery,) = wait_for(lambda: consumer.fetch(1, 0.5), 5, "the message")
    consumer.reject(delivery, requeue=True)  # re-routed by the Lua restore through the bindings
    assert raw.llen(prefix + "fast") == 1 and raw.llen(prefix + "other") == 2
    (again,) = wait_for(lambda: consumer.fetch(1, 0.5), 5, "the requeued message")
    assert again.redelivered and again.message.headers["id"] == delivery.message.headers["id"]
    consumer.ack(again)
    consumer.close()


def test_native_delay_off_publishes_straight_to_the_queue(
        redis_url: str, broker_conf: Callable[..., dict[str, Any]], raw: redis.Redis,
        prefix: str) -> None:
    broker = RedisBroker(redis_url, broker_conf(native_delay=False))
    assert not broker.has("delay") and not broker.has("priority")
    broker.publish(_task(), "", "celery", not_before=time.time() + 3600)
    assert raw.llen(prefix + "celery") == 1 and raw.hlen(prefix + "unacked") == 0
    broker.close()
    with pytest.raises(ImproperlyConfigured, match="priority_order"):
        RedisBroker(redis_url, broker_conf(priority_order="upside-down"))
