"""Bad input: one clear error naming the URL (password masked), and the broker goes on."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celeriac.exceptions import BrokerConnectionError, ImproperlyConfigured
from celeriac.routing import Queue
from celeriac.testing.broker_kit import make_message
from proton import Message as AMQPMessage
from proton.utils import BlockingConnection
from qpid_support import unique

from celeriac_qpid import QpidBroker


def test_unknown_address_dialect() -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        QpidBroker("qpid://guest:s3cret@localhost:5672//", {"broker_transport_options": {"address_dialect": "x"}})
    text = str(info.value)
    assert "qpid://guest:**@localhost:5672//" in text and "s3cret" not in text
    assert "address_dialect" in text and "rabbitmq" in text


def test_unreachable_host_fails_fast_and_transient() -> None:
    broker = QpidBroker("qpid://guest:s3cret@127.0.0.1:5679//", {})
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        broker.connect()
    assert time.monotonic() - started < 15
    text = str(info.value)
    assert "qpid://guest:**@127.0.0.1:5679//" in text and "s3cret" not in text
    assert "refused" in text.lower() and "is the broker running" in text
    assert info.value.transient
    broker.close()


def test_wrong_credentials_are_permanent(qpid_url: str) -> None:
    broker = QpidBroker("qpid://guest:wrong-s3cret@localhost:5672//", {"broker_connection_timeout": 15})
    with pytest.raises(BrokerConnectionError) as info:
        broker.connect()
    text = str(info.value)
    assert "wrong user name or password" in text and "wrong-s3cret" not in text
    assert info.value.transient is False
    broker.close()


def test_refused_declaration_is_one_error_and_the_broker_goes_on(broker: QpidBroker) -> None:
    queue = Queue(unique("refused"))
    broker.declare(queue)
    with pytest.raises(BrokerConnectionError) as info:
        broker.declare(Queue(queue.name, durable=False))  # exists durable: RabbitMQ refuses
    assert "PRECONDITION_FAILED" in str(info.value) and queue.name in str(info.value)
    broker.publish(make_message("after"), "", queue.name, queue=queue)
    consumer = broker.consumer([queue], 5)
    got = consumer.fetch(5, 10)
    assert [d.message.headers["kit"] for d in got] == ["after"]
    consumer.ack(got[0])
    consumer.close()


def test_undecodable_message_is_logged_and_rejected(broker: QpidBroker, qpid_url: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    queue = Queue(unique("bad"))
    broker.declare(queue)
    foreign = BlockingConnection("amqp://guest:guest@localhost:5672", timeout=10)
    try:
        sender = foreign.create_sender(f"/amq/queue/{queue.name}")
        sender.send(AMQPMessage(id="foreign-1", body={"a map": "body"}))
        text = AMQPMessage(id="foreign-2", body='[[1, 2], {}, {}]', properties={"task": "t", "id": "foreign-2"})
        sender.send(text)
    finally:
        foreign.close()
    broker.publish(make_message("good"), "", queue.name, queue=queue)
    consumer = broker.consumer([queue], 10)
    with caplog.at_level(logging.ERROR, logger="celeriac.qpid"):
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            got.extend(consumer.fetch(10, 0.5))
    assert [d.message.headers.get("id") for d in got] == ["foreign-2", "good"]
    assert got[0].message.body == b"[[1, 2], {}, {}]"
    assert any("foreign-1" in r.getMessage() and "Rejected" in r.getMessage() for r in caplog.records)
    for delivery in got:
        consumer.ack(delivery)
    consumer.close()


def test_worker_with_wrong_credentials_stops_with_one_line(qpid_url: str, tmp_path: Path) -> None:
    (tmp_path / "badapp.py").write_text("from celeriac import Celeriac\napp = Celeriac('badapp')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "celeriac", "-A", "badapp", "worker", "-P", "threads",
                          "-b", "qpid://guest:wrong-s3cret@localhost:5672//"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "wrong user name or password" in text and "wrong-s3cret" not in text
    assert "Traceback" not in text
