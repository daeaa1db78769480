"""kombu's filesystem transport read safely: files being written by kombu's own publisher (what
Celery's client and worker use) are left until complete, a corrupt file is set aside, and a
delivery already settled never goes back to its queue when the consumer reconnects."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer
from kombu import Queue as KombuQueue

from celeriac.protocol import Message
from celeriac.routing import Queue
from celeriac_kombu import KombuBroker, KombuConsumer


def _folders(spool: Path) -> dict[str, str]:
    return {"data_folder_in": str(spool / "data"), "data_folder_out": str(spool / "data"),
            "control_folder": str(spool / "control")}


def _kombu_publish(spool: Path, queue: str, bodies: list[str]) -> None:
    """Publish like Celery does: kombu's own filesystem transport, writing in place."""
    for folder in _folders(spool).values():
        os.makedirs(folder, exist_ok=True)
    with Connection("filesystem://", transport_options=_folders(spool)) as conn:
        channel = conn.channel()
        KombuQueue(queue, Exchange(queue, "direct"), queue).bind(channel).declare()
        producer = Producer(channel)
        for body in bodies:
            producer.publish(body, exchange=queue, routing_key=queue, headers={"id": body},
                             serializer="json")


def _take_kombu_file(spool: Path, queue: str, body: str) -> bytes:
    """What kombu's publisher writes for ``body``: published, then taken out of the data folder
    (the consumer does not read while the test is not fetching)."""
    _kombu_publish(spool, queue, [body])
    (name,) = [n for n in os.listdir(spool / "data") if n.endswith(f".{queue}.msg")]
    path = spool / "data" / name
    payload = path.read_bytes()
    path.unlink()
    return payload


def _ids(consumer: KombuConsumer, timeout: float = 0.5) -> list[str]:
    return [d.message.headers["id"] for d in consumer.fetch(10, timeout)]


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def broker(spool: Path) -> KombuBroker:
    broker = KombuBroker(f"kombu+filesystem://{spool}", {})
    yield broker
    broker.close()


def _publish(broker: KombuBroker, queue: Queue, task_id: str) -> None:
    broker.publish(Message({"id": task_id}, {}, b'"x"', "application/json", "utf-8"), "", queue.name,
                   queue=queue)


def test_a_file_being_written_is_taken_only_once_complete(broker: KombuBroker, spool: Path) -> None:
    queue = Queue("fs-writing")
    _publish(broker, queue, "A")
    consumer = broker.consumer([queue], 10)
    try:
        (held,) = consumer.fetch(10, 2.0)  # unacked while the next file is written
        payload = _take_kombu_file(spool, queue.name, "B")
        path = spool / "data" / f"{int(time.monotonic() * 1000)}_writing.{queue.name}.msg"
        with open(path, "wb", buffering=0) as handle:  # kombu's publisher: create, lock, write, unlock
            assert _ids(consumer) == []  # created, not written yet
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            handle.write(payload[: len(payload) // 2])
            assert _ids(consumer) == []  # half written, locked
            handle.write(payload[len(payload) // 2:])
            assert _ids(consumer) == []  # written, still locked
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        assert _ids(consumer, 2.0) == ["B"]  # and A was not handed back meanwhile
        consumer.ack(held)
        assert _ids(consumer) == []
    finally:
        consumer.close()


def test_a_corrupt_file_is_set_aside_and_the_others_still_flow(broker: KombuBroker, spool: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    queue = Queue("fs-corrupt")
    _publish(broker, queue, "A")
    consumer = broker.consumer([queue], 10)
    try:
        (held,) = consumer.fetch(10, 2.0)
        bad = spool / "data" / f"{int(time.monotonic() * 1000)}_corrupt.{queue.name}.msg"
        bad.write_bytes(b"this is not a kombu message")
        _publish(broker, queue, "C")
        with caplog.at_level(logging.ERROR, logger="celeriac.kombu"):
            assert _ids(consumer, 2.0) == ["C"]  # A is not delivered again
        assert not bad.exists()
        assert Path(f"{bad}.bad").read_bytes() == b"this is not a kombu message"
        assert f"{bad} is not a kombu message" in caplog.text
        consumer.ack(held)
    finally:
        consumer.close()


def test_acks_queued_before_a_reconnection_are_applied_first(broker: KombuBroker) -> None:
    queue = Queue("fs-reconnect")
    _publish(broker, queue, "A")
    _publish(broker, queue, "B")
    consumer = broker.consumer([queue], 10)
    try:
        first = consumer.fetch(10, 2.0)
        first += consumer.fetch(10 - len(first), 0.5)
        assert sorted(d.message.headers["id"] for d in first) == ["A", "B"]
        with consumer.lock:  # the fetching thread is inside kombu: the ack is queued
            acker = threading.Thread(target=consumer.ack, args=(first[0],))
            acker.start()
            acker.join()
            consumer.drop()  # the connection is lost before the fetching thread applied it
        redelivered = _ids(consumer, 2.0)
        assert redelivered == [first[1].message.headers["id"]]  # only the unsettled one comes back
    finally:
        consumer.close()


def test_celerys_publisher_writing_while_celeriac_reads_delivers_each_message_once(
        broker: KombuBroker, spool: Path) -> None:
    """kombu's publisher in one thread (files written in place), a Celeriac consumer draining
    at the same time: every message arrives, none twice."""
    queue = Queue("fs-race")
    broker.declare(queue)
    bodies = [f"m{i}" for i in range(300)]
    consumer = broker.consumer([queue], 50)
    seen: list[str] = []
    writer = threading.Thread(target=_kombu_publish, args=(spool, queue.name, bodies))
    try:
        writer.start()
        deadline = time.monotonic() + 60
        while len(seen) < len(bodies) and time.monotonic() < deadline:
            for delivery in consumer.fetch(50, 0.2):
                seen.append(delivery.message.headers["id"])
                consumer.ack(delivery)
        writer.join()
        seen += _ids(consumer, 0.5)
    finally:
        consumer.close()
    assert sorted(seen) == sorted(bodies)
