"""The broker conformance kit: the SPI contract of :mod:`celeriac.broker.base` as pytest tests.

A broker package subclasses :class:`BrokerConformance` in its tests and provides a ``broker``
fixture (a connected broker; the kit closes nothing it did not open)::

    from celeriac.testing.broker_kit import BrokerConformance

    class TestMyBroker(BrokerConformance):
        @pytest.fixture
        def broker(self):
            b = MyBroker("my://localhost", {})
            yield b
            b.close()

        @pytest.fixture
        def make_broker(self):           # optional: a second connection to the same broker
            return lambda: MyBroker("my://localhost", {})

Required behaviour is tested for every broker; capabilities (``delay``, ``priority``,
``queue_size``, ``broadcast``, ``reply_queues``, ``batch``) only where the broker declares them.
Every test uses its own uuid-named queues and exchanges and deletes its queues at the end, so the
kit can run against a shared server. ``receive_timeout`` bounds how long a test waits for
messages that must arrive; raise it for slow brokers.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from celeriac.broker.base import (
    BATCH,
    BROADCAST,
    DELAY,
    PRIORITY,
    QUEUE_SIZE,
    REPLY_QUEUES,
    Broker,
    Consumer,
    Delivery,
    Subscription,
)
from celeriac.protocol import Message
from celeriac.routing import Exchange, Queue

__all__ = ["KNOWN_CAPABILITIES", "BrokerConformance", "BrokerKit", "make_message"]

KNOWN_CAPABILITIES = frozenset({DELAY, PRIORITY, QUEUE_SIZE, BROADCAST, REPLY_QUEUES, BATCH})

MakeBroker = Callable[[], Broker]


def _unique(prefix: str = "q") -> str:
    return f"celeriac-kit-{prefix}-{uuid.uuid4().hex[:12]}"


def make_message(tag: str, body: bytes | None = None, **headers: Any) -> Message:
    """A small message whose ``headers["kit"]`` is ``tag`` (used to identify it on receipt)."""
    all_headers: dict[str, Any] = {"kit": tag, "task": "kit.task", "id": tag}
    all_headers.update(headers)
    return Message(all_headers, {"correlation_id": tag, "delivery_mode": 2},
                   body if body is not None else f'[["{tag}"], {{}}, {{}}]'.encode())


class BrokerKit:
    """Per-test helper: creates uuid-named queues and consumers, and removes them afterwards."""

    def __init__(self, broker: Broker, receive_timeout: float) -> None:
        self.broker = broker
        self.receive_timeout = receive_timeout
        self.queues: list[Queue] = []
        self.consumers: list[Consumer] = []
        self.subscriptions: list[Subscription] = []
        self.extra_brokers: list[Broker] = []

    def queue(self, **kwargs: Any) -> Queue:
        """Declare a new uniquely named queue (kwargs go to :class:`Queue`)."""
        queue = Queue(kwargs.pop("name", None) or _unique(), **kwargs)
        self.broker.declare(queue)
        self.queues.append(queue)
        return queue

    def consumer(self, *queues: Queue, prefetch: int = 0, no_ack: bool = False,
                 broker: Broker | None = None) -> Consumer:
        """Start a consumer that is closed at the end of the test."""
        consumer = (broker or self.broker).consumer(list(queues), prefetch, no_ack=no_ack)
        self.consumers.append(consumer)
        return consumer

    def subscribe(self, exchange: str, pattern: str = "#") -> Subscription:
        """Subscribe to broadcasts; closed at the end of the test."""
        sub = self.broker.subscribe(exchange, pattern)
        self.subscriptions.append(sub)
        return sub

    def publish(self, queue: Queue, message: Message, not_before: float | None = None) -> None:
        """Publish ``message`` to ``queue`` through the default exchange."""
        self.broker.publish(message, "", queue.name, queue=queue, not_before=not_before)

    def wait_queued(self, queue: Queue, count: int) -> None:
        """Wait until ``queue`` holds ``count`` ready messages (only with ``queue_size``)."""
        if not self.broker.has(QUEUE_SIZE):
            return
        deadline = time.monotonic() + self.receive_timeout
        while (self.broker.queue_size(queue.name) or 0) < count:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)

    def drain(self, consumer: Consumer, count: int, max_count: int = 100,
              timeout: float | None = None) -> list[Delivery]:
        """Fetch until ``count`` deliveries arrived or ``timeout`` (default receive_timeout)."""
        deadline = time.monotonic() + (self.receive_timeout if timeout is None else timeout)
        out: list[Delivery] = []
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            batch = consumer.fetch(max_count, min(left, 0.5))
            assert len(batch) <= max_count, f"fetch({max_count}) returned {len(batch)} deliveries"
            out.extend(batch)
        return out

    def nothing_more(self, consumer: Consumer, wait: float = 0.5) -> list[Delivery]:
        """Deliveries that still arrive within ``wait`` seconds (expected: none)."""
        return self.drain(consumer, 1, timeout=wait)

    def cleanup(self) -> None:
        """Close consumers, subscriptions and extra brokers, then delete the queues."""
        for consumer in self.consumers:
            with contextlib.suppress(Exception):
                consumer.close()
        for sub in self.subscriptions:
            with contextlib.suppress(Exception):
                sub.close()
        for other in self.extra_brokers:
            with contextlib.suppress(Exception):
                other.close()
        for queue in self.queues:
            with contextlib.suppress(Exception):
                self.broker.delete_queue(queue.name)


def _tags(deliveries: list[Delivery]) -> list[str]:
    return [str(d.message.headers["kit"]) for d in deliveries]


class BrokerConformance:
    """Subclass in a test module and provide a ``broker`` fixture (see the module docstring)."""

    receive_timeout: ClassVar[float] = 10.0

    # -- fixtures the subclass provides ------------------------------------------------------

    @pytest.fixture
    def broker(self) -> Broker:
        """Override: yield a connected broker."""
        raise NotImplementedError("Subclasses of BrokerConformance must define a `broker` fixture.")

    @pytest.fixture
    def make_broker(self) -> MakeBroker | None:
        """Override to return a factory of new connections to the same broker (optional)."""
        return None

    @pytest.fixture
    def kit(self, broker: Broker) -> Iterator[BrokerKit]:
        """Per-test helper that cleans up its queues and consumers."""
        helper = BrokerKit(broker, self.receive_timeout)
        yield helper
        helper.cleanup()

    def _require(self, broker: Broker, capability: str) -> None:
        if not broker.has(capability):
            pytest.skip(f"{type(broker).__name__} does not declare the {capability!r} capability")

    # -- required behaviour ------------------------------------------------------------------

    def test_capabilities_are_known_names(self, broker: Broker) -> None:
        assert isinstance(broker.capabilities, frozenset)
        unknown = broker.capabilities - KNOWN_CAPABILITIES
        assert not unknown, f"unknown capability names: {sorted(unknown)}"

    def test_round_trip_keeps_headers_properties_and_body(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        tag = uuid.uuid4().hex
        headers = {"kit": tag, "eta": None, "parent_id": None, "retries": 3, "ignore_result": False,
                   "argsrepr": "('héllo ✓ 日本', 🐍)", "timelimit": [None, 10],
                   "stamps": {"a": ["x", None, True]}, "empty": ""}
        properties = {"correlation_id": tag, "reply_to": "reply-" + tag, "delivery_mode": 2}
        body = '[["héllo ✓ 日本"], {}, {"callbacks": null}]'.encode()
        kit.publish(queue, Message(headers, properties, body, "application/json", "utf-8"))
        consumer = kit.consumer(queue)
        got = kit.drain(consumer, 1)
        assert len(got) == 1
        delivery = got[0]
        message = delivery.message
        assert delivery.queue == queue.name
        assert message.body == body
        assert isinstance(message.body, bytes)
        assert message.content_type == "application/json"
        assert message.content_encoding == "utf-8"
        for key, value in headers.items():
            assert key in message.headers, f"header {key!r} lost"
            assert message.headers[key] == value, f"header {key!r} changed"
        for key, prop in properties.items():
            assert message.properties.get(key) == prop, f"property {key!r} changed"
        consumer.ack(delivery)

    def test_large_binary_body(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        body = os.urandom(1024 * 1024)
        kit.publish(queue, Message({"kit": "big"}, {}, body, "application/octet-stream", "binary"))
        consumer = kit.consumer(queue)
        got = kit.drain(consumer, 1)
        assert len(got) == 1
        assert got[0].message.body == body
        assert got[0].message.content_type == "application/octet-stream"
        consumer.ack(got[0])

    def test_fifo_order_within_a_queue(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        tags = [f"m{i:03d}" for i in range(100)]
        for tag in tags:
            kit.publish(queue, make_message(tag))
        consumer = kit.consumer(queue, prefetch=0)
        got = kit.drain(consumer, len(tags))
        assert _tags(got) == tags
        for delivery in got:
            consumer.ack(delivery)

    def test_acked_messages_are_not_redelivered(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        for i in range(5):
            kit.publish(queue, make_message(f"a{i}"))
        consumer = kit.consumer(queue, prefetch=10)
        got = kit.drain(consumer, 5)
        assert len(got) == 5
        threads = [threading.Thread(target=consumer.ack, args=(d,)) for d in got]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        consumer.flush()
        consumer.close()
        again = kit.consumer(queue)
        assert kit.nothing_more(again, 1.0) == []

    def test_close_without_ack_redelivers(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        kit.publish(queue, make_message("r1"))
        first = kit.consumer(queue, prefetch=1)
        got = kit.drain(first, 1)
        assert _tags(got) == ["r1"]
        first.close()
        second = kit.consumer(queue, prefetch=1)
        again = kit.drain(second, 1)
        assert _tags(again) == ["r1"], "an unacked delivery must come back after close()"
        second.ack(again[0])

    def test_dropped_connection_redelivers(self, kit: BrokerKit,
                                           make_broker: MakeBroker | None) -> None:
        if make_broker is None:
            pytest.skip("no make_broker fixture: cannot open a second connection")
        queue = kit.queue()
        other = make_broker()
        kit.extra_brokers.append(other)
        kit.publish(queue, make_message("d1"))
        doomed = other.consumer([queue], 1)
        got = kit.drain(doomed, 1)
        assert _tags(got) == ["d1"]
        other.close()  # the connection goes away with the delivery unacked
        survivor = kit.consumer(queue, prefetch=1)
        again = kit.drain(survivor, 1)
        assert _tags(again) == ["d1"], "an unacked delivery must come back when its connection drops"
        survivor.ack(again[0])

    def test_reject_with_requeue_from_another_thread(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        kit.publish(queue, make_message("rq"))
        consumer = kit.consumer(queue, prefetch=1)
        got = kit.drain(consumer, 1)
        assert _tags(got) == ["rq"]
        thread = threading.Thread(target=consumer.reject, args=(got[0],), kwargs={"requeue": True})
        thread.start()
        thread.join()
        again = kit.drain(consumer, 1)
        assert _tags(again) == ["rq"]
        consumer.ack(again[0])

    def test_reject_without_requeue_drops(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        kit.publish(queue, make_message("rd"))
        consumer = kit.consumer(queue, prefetch=1)
        got = kit.drain(consumer, 1)
        assert _tags(got) == ["rd"]
        consumer.reject(got[0], requeue=False)
        consumer.flush()
        assert kit.nothing_more(consumer, 1.0) == []
        consumer.close()
        assert kit.nothing_more(kit.consumer(queue), 0.5) == []

    def test_fetch_never_exceeds_max_count(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        for i in range(30):
            kit.publish(queue, make_message(f"b{i}"))
        kit.wait_queued(queue, 30)
        consumer = kit.consumer(queue, prefetch=0)
        got = kit.drain(consumer, 30, max_count=7)  # drain asserts each fetch is <= 7
        assert sorted(_tags(got)) == sorted(f"b{i}" for i in range(30))
        for delivery in got:
            consumer.ack(delivery)

    def test_prefetch_limits_unacked_deliveries(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        for i in range(10):
            kit.publish(queue, make_message(f"p{i}"))
        kit.wait_queued(queue, 10)
        consumer = kit.consumer(queue, prefetch=3)
        got = kit.drain(consumer, 3)
        assert len(got) == 3
        assert kit.nothing_more(consumer, 0.5) == [], "prefetch=3 allows 3 unacked deliveries"
        consumer.ack(got[0])
        more = kit.drain(consumer, 1)
        assert len(more) == 1
        assert kit.nothing_more(consumer, 0.3) == []

    def test_fetch_timeout_returns_empty_promptly(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        consumer = kit.consumer(queue)
        start = time.monotonic()
        assert consumer.fetch(10, 0.3) == []
        assert time.monotonic() - start < 0.3 + 3.0
        start = time.monotonic()
        assert consumer.fetch(10, 0) == []
        assert time.monotonic() - start < 3.0

    def test_concurrent_producers_deliver_each_message_once(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        errors: list[BaseException] = []

        def produce(worker: int) -> None:
            try:
                for i in range(50):
                    kit.publish(queue, make_message(f"t{worker}-{i}"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        consumer = kit.consumer(queue, prefetch=0)
        got = kit.drain(consumer, 400)
        for thread in threads:
            thread.join()
        got.extend(kit.nothing_more(consumer, 0.5))
        assert not errors, errors
        tags = _tags(got)
        assert len(tags) == len(set(tags)) == 400
        assert set(tags) == {f"t{w}-{i}" for w in range(8) for i in range(50)}
        def ack_all(chunk: list[Delivery]) -> None:
            for delivery in chunk:
                consumer.ack(delivery)

        acks = [threading.Thread(target=ack_all, args=(got[k::4],)) for k in range(4)]
        for thread in acks:
            thread.start()
        for thread in acks:
            thread.join()

    def test_consume_from_several_queues(self, kit: BrokerKit) -> None:
        first, second = kit.queue(), kit.queue()
        kit.publish(first, make_message("one"))
        kit.publish(second, make_message("two"))
        consumer = kit.consumer(first, second)
        got = kit.drain(consumer, 2)
        assert sorted(_tags(got)) == ["one", "two"]
        assert {d.queue for d in got} == {first.name, second.name}
        for delivery in got:
            assert delivery.queue == (first.name if delivery.message.headers["kit"] == "one"
                                      else second.name)
            consumer.ack(delivery)

    def test_direct_and_topic_exchange_bindings(self, kit: BrokerKit) -> None:
        direct = Exchange(_unique("dx"), "direct")
        topic = Exchange(_unique("tx"), "topic")
        dq = kit.queue(exchange=direct, routing_key="jobs")
        tq = kit.queue(exchange=topic, routing_key="jobs.#")
        kit.broker.publish(make_message("direct"), direct.name, "jobs")
        kit.broker.publish(make_message("topic"), topic.name, "jobs.add.fast")
        kit.broker.publish(make_message("nowhere"), topic.name, "other.add")
        got = kit.drain(kit.consumer(dq), 1) + kit.drain(kit.consumer(tq), 1)
        assert sorted(_tags(got)) == ["direct", "topic"]
        for consumer in kit.consumers:
            assert kit.nothing_more(consumer, 0.3) == []

    def test_purge(self, kit: BrokerKit) -> None:
        queue = kit.queue()
        for i in range(5):
            kit.publish(queue, make_message(f"x{i}"))
        kit.wait_queued(queue, 5)
        purged = kit.broker.purge(queue.name)
        assert purged == 5 or not kit.broker.has(QUEUE_SIZE)
        assert kit.nothing_more(kit.consumer(queue), 0.5) == []

    # -- capabilities ------------------------------------------------------------------------

    def test_queue_size(self, kit: BrokerKit) -> None:
        self._require(kit.broker, QUEUE_SIZE)
        queue = kit.queue()
        assert kit.broker.queue_size(queue.name) == 0
        for i in range(3):
            kit.publish(queue, make_message(f"s{i}"))
        deadline = time.monotonic() + kit.receive_timeout
        while kit.broker.queue_size(queue.name) != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert kit.broker.queue_size(queue.name) == 3
        assert kit.broker.purge(queue.name) == 3
        assert kit.broker.queue_size(queue.name) == 0

    def test_priority_higher_first_then_fifo(self, kit: BrokerKit) -> None:
        self._require(kit.broker, PRIORITY)
        queue = kit.queue(max_priority=9)
        sent = [("low-a", 0), ("mid-a", 3), ("high", 9), ("low-b", 0), ("mid-b", 6), ("mid-c", 3)]
        for tag, priority in sent:
            message = make_message(tag)
            message.properties["priority"] = priority
            kit.publish(queue, message)
        kit.wait_queued(queue, len(sent))
        consumer = kit.consumer(queue, prefetch=1)
        got: list[Delivery] = []
        for _ in sent:  # one at a time, so the broker's choice is what is tested
            one = kit.drain(consumer, 1, max_count=1)
            assert len(one) == 1
            got.extend(one)
            consumer.ack(one[0])
        assert _tags(got) == ["high", "mid-b", "mid-a", "mid-c", "low-a", "low-b"]

    def test_delay_not_delivered_before_not_before(self, kit: BrokerKit) -> None:
        self._require(kit.broker, DELAY)
        queue = kit.queue()
        not_before = time.time() + 1.5
        kit.publish(queue, make_message("later"), not_before=not_before)
        kit.publish(queue, make_message("now"))
        consumer = kit.consumer(queue)
        first = kit.drain(consumer, 1)
        assert _tags(first) == ["now"]
        consumer.ack(first[0])
        got = kit.drain(consumer, 1, timeout=kit.receive_timeout + 1.5)
        received_at = time.time()
        assert _tags(got) == ["later"]
        assert received_at >= not_before - 0.05, "delivered before its not_before time"
        consumer.ack(got[0])

    def test_broadcast_reaches_every_matching_subscriber(self, kit: BrokerKit) -> None:
        self._require(kit.broker, BROADCAST)
        exchange = _unique("bx")
        everything = kit.subscribe(exchange)
        workers = kit.subscribe(exchange, "worker.*")
        kit.broker.broadcast(exchange, make_message("hb"), "worker.heartbeat")
        kit.broker.broadcast(exchange, make_message("sent"), "task.sent")

        def collect(sub: Subscription, count: int, wait: float) -> list[str]:
            deadline = time.monotonic() + wait
            out: list[str] = []
            while len(out) < count and time.monotonic() < deadline:
                out.extend(str(m.headers["kit"]) for m in sub.fetch(0.2))
            return out

        assert collect(everything, 2, kit.receive_timeout) == ["hb", "sent"]
        assert collect(workers, 1, kit.receive_timeout) == ["hb"]
        assert collect(workers, 1, 0.5) == []
        late = kit.subscribe(exchange)
        assert collect(late, 1, 0.5) == [], "a new subscriber must not see older broadcasts"

    def test_reply_queue_no_ack(self, kit: BrokerKit) -> None:
        self._require(kit.broker, REPLY_QUEUES)
        queue = kit.queue(durable=False, auto_delete=True)
        kit.broker.publish(make_message("reply"), "", queue.name)
        consumer = kit.consumer(queue, no_ack=True)
        got = kit.drain(consumer, 1)
        assert _tags(got) == ["reply"]
        consumer.close()
        assert kit.nothing_more(kit.consumer(queue, no_ack=True), 0.5) == []
        kit.broker.delete_queue(queue.name)

    def test_batch_fetch_returns_many(self, kit: BrokerKit) -> None:
        self._require(kit.broker, BATCH)
        queue = kit.queue()
        for i in range(20):
            kit.publish(queue, make_message(f"k{i}"))
        kit.wait_queued(queue, 20)
        consumer = kit.consumer(queue, prefetch=0)
        deadline = time.monotonic() + kit.receive_timeout
        biggest = 0
        got: list[Delivery] = []
        while len(got) < 20 and time.monotonic() < deadline:
            batch = consumer.fetch(10, 0.5)
            assert len(batch) <= 10
            biggest = max(biggest, len(batch))
            got.extend(batch)
        assert len(got) == 20
        assert biggest > 1, "a broker declaring 'batch' returns several deliveries per fetch"
        for delivery in got:
            consumer.ack(delivery)
