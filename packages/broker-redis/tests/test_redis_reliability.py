"""At-least-once delivery: killed consumers, live holders, delayed delivery, Redis restarts."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis_support import REDIS_START, ensure_redis_running, redis_up, wait_for

from celeriac.broker.base import Delivery
from celeriac.protocol import encode_task
from celeriac.routing import Queue
from celeriac_redis import RedisBroker

QUEUE = Queue("work")


@pytest.fixture
def make(redis_url: str, broker_conf: Callable[..., dict[str, Any]]) -> Iterator[Callable[..., RedisBroker]]:
    made: list[RedisBroker] = []

    def factory(**options: Any) -> RedisBroker:
        b = RedisBroker(redis_url, broker_conf(**options))
        made.append(b)
        return b

    yield factory
    for b in made:
        b.close()


def _task() -> Any:
    return encode_task("proj.add", str(uuid.uuid4()), [1, 2], {})


def _collect(consumer: Any, want: int, timeout: float) -> list[Delivery]:
    out: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out.extend(consumer.fetch(100, 0.2))
    return out


CHILD = textwrap.dedent("""
    import sys, time
    from celeriac.routing import Queue
    from celeriac_redis import RedisBroker
    url, prefix = sys.argv[1], sys.argv[2]
    broker = RedisBroker(url, {"broker_transport_options": {
        "global_keyprefix": prefix, "visibility_timeout": 1.5}})
    consumer = broker.consumer([Queue("work")], prefetch=1)
    while not (got := consumer.fetch(1, 1.0)):
        pass
    print("GOT", got[0].message.headers["id"], flush=True)
    time.sleep(600)
""")


def test_message_of_a_killed_consumer_comes_back_after_visibility_timeout(
        make: Callable[..., RedisBroker], redis_url: str, prefix: str) -> None:
    broker = make(visibility_timeout=1.5)
    message = _task()
    broker.publish(message, "", "work", queue=QUEUE)
    child = subprocess.Popen([sys.executable, "-c", CHILD, redis_url, prefix],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line.split() == ["GOT", message.headers["id"]]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        killed_at = time.monotonic()
        consumer = broker.consumer([QUEUE], prefetch=1)
        got = _collect(consumer, 1, 15)
        assert [d.message.headers["id"] for d in got] == [message.headers["id"]]
        assert got[0].redelivered
        assert time.monotonic() - killed_at < 10
        consumer.ack(got[0])
        consumer.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_live_holder_keeps_its_message_past_the_visibility_timeout(
        make: Callable[..., RedisBroker]) -> None:
    holder_broker, other_broker = make(visibility_timeout=1.0), make(visibility_timeout=1.0)
    broker = holder_broker
    message = _task()
    broker.publish(message, "", "work", queue=QUEUE)
    holder = holder_broker.consumer([QUEUE], prefetch=1)
    (held,) = _collect(holder, 1, 5)
    other = other_broker.consumer([QUEUE], prefetch=1)
    assert _collect(other, 1, 3.5) == [], "a live consumer's message was redelivered"
    holder.ack(held)
    holder.flush()
    other.close()
    holder.close()


def test_countdown_runs_once_across_two_consumers_and_on_time(
        make: Callable[..., RedisBroker]) -> None:
    publisher = make(visibility_timeout=2.0, native_delay=True)  # parked at publish time
    consumers = [make(visibility_timeout=2.0).consumer([QUEUE], prefetch=4) for _ in range(2)]
    message = _task()
    due = time.time() + 2.0
    publisher.publish(message, "", "work", queue=QUEUE, not_before=due)
    received: list[tuple[float, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def run(consumer: Any) -> None:
        while not stop.is_set():
            for delivery in consumer.fetch(4, 0.2):
                with lock:
                    received.append((time.time(), delivery.message.headers["id"]))
                consumer.ack(delivery)

    threads = [threading.Thread(target=run, args=(c,)) for c in consumers]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: received, 10, "the delayed message")
        time.sleep(2 * 2.0 + 1)  # past a visibility timeout: no second delivery may appear
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert [r[1] for r in received] == [message.headers["id"]]
    at = received[0][0]
    assert due - 0.05 <= at <= due + 1.0, f"delivered {at - due:+.2f} s from its due time"
    for consumer in consumers:
        consumer.close()


def test_broker_survives_a_redis_restart(make: Callable[..., RedisBroker]) -> None:
    broker = make(visibility_timeout=5.0)
    consumer = broker.consumer([QUEUE], prefetch=10)
    first = _task()
    broker.publish(first, "", "work", queue=QUEUE)
    got = _collect(consumer, 1, 5)
    consumer.ack(got[0])
    consumer.flush()
    try:
        subprocess.run(["redis-cli", "shutdown", "nosave"], check=False, capture_output=True,
                       timeout=10)
        wait_for(lambda: not redis_up(), 10, "Redis to stop")
        assert consumer.fetch(10, 0.3) == []  # no exception while the server is gone
        restarter = threading.Timer(1.0, lambda: subprocess.run(REDIS_START, check=False,
                                                                capture_output=True))
        restarter.start()
        second = _task()
        broker.publish(second, "", "work", queue=QUEUE)  # retried until Redis is back
        restarter.join()
        got = _collect(consumer, 1, 15)
        assert [d.message.headers["id"] for d in got] == [second.headers["id"]]
        consumer.ack(got[0])
        consumer.flush()
        client = redis.Redis.from_url(broker.url)
        assert client.hlen(broker.layout.key("unacked")) == 0
        client.close()
    finally:
        ensure_redis_running()
    consumer.close()


def _eta_task(seconds: float) -> Any:
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return encode_task("proj.add", str(uuid.uuid4()), [1, 2], {}, eta=eta.isoformat())


def test_far_eta_message_from_a_celery_client_is_parked_not_held(
        make: Callable[..., RedisBroker], raw: redis.Redis, prefix: str) -> None:
    broker = make(visibility_timeout=60.0)
    far = _eta_task(3.0)
    broker.publish(far, "", "work", queue=QUEUE)  # no not_before: as a Celery client sends it
    consumer = broker.consumer([QUEUE], prefetch=1)
    assert consumer.fetch(10, 0.5) == []  # parked again, not handed to the worker
    score = raw.zscore(prefix + "unacked_index", raw.hkeys(prefix + "unacked")[0])
    assert abs(score + broker.visibility_timeout - (time.time() + 2.5)) < 2  # due at the ETA
    got = _collect(consumer, 1, 10)
    assert [d.message.headers["id"] for d in got] == [far.headers["id"]]
    consumer.ack(got[0])
    consumer.close()


def test_near_eta_messages_do_not_use_up_the_prefetch(make: Callable[..., RedisBroker]) -> None:
    broker = make()
    near, plain = _eta_task(1.0), _task()
    broker.publish(near, "", "work", queue=QUEUE)
    broker.publish(plain, "", "work", queue=QUEUE)
    consumer = broker.consumer([QUEUE], prefetch=1)
    got = _collect(consumer, 2, 5)  # the held ETA message does not block the next one
    assert [d.message.headers["id"] for d in got] == [near.headers["id"], plain.headers["id"]]
    for delivery in got:
        consumer.ack(delivery)
    consumer.close()
