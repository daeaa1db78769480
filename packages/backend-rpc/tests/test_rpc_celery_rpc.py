"""Celery's rpc:// and ours read each other's result messages over one RabbitMQ."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celeriac import states
from celeriac.backends.base import decode_exception, make_meta
from celeriac.plugins import create_broker
from celeriac.protocol import encode_task
from celeriac.routing import Queue

from celeriac_rpc import RPCBackend


@pytest.fixture
def celery_app(amqp_url: str) -> Iterator[object]:
    from celery import Celery

    app = Celery("rpcwire", broker=amqp_url.replace("amqp://", "pyamqp://", 1), backend="rpc://")
    app.conf.task_default_queue = f"celeriac-test-rpc-{uuid.uuid4().hex[:10]}"
    yield app
    app.close()


@pytest.fixture
def backend(amqp_url: str) -> Iterator[RPCBackend]:
    b = RPCBackend("rpc://", {"broker_url": amqp_url})
    yield b
    b.close()


def test_celery_client_gets_our_results(celery_app: object, backend: RPCBackend) -> None:
    app = celery_app
    queue = Queue(app.conf.task_default_queue)  # type: ignore[attr-defined]
    ok = app.send_task("proj.add", args=[2, 3])  # type: ignore[attr-defined]
    bad = app.send_task("proj.fail", args=[])  # type: ignore[attr-defined]
    broker = backend.broker
    consumer = broker.consumer([queue], 10)
    try:
        got = []
        for _ in range(40):
            got.extend(consumer.fetch(10, 0.25))
            if len(got) == 2:
                break
        assert len(got) == 2
        for delivery in got:  # act as the worker: store what the task returned
            props = delivery.message.properties
            task_id = delivery.message.headers["id"]
            backend.store(task_id, make_meta(task_id, states.STARTED, {"pid": 1}),
                          reply_to=props["reply_to"], correlation_id=props["correlation_id"])
            if task_id == ok.id:
                meta = make_meta(task_id, states.SUCCESS, 5)
            else:
                meta = make_meta(task_id, states.FAILURE, KeyError("nope"),
                                 traceback="Traceback (most recent call last):\n  ...\nKeyError: 'nope'\n")
            backend.store(task_id, meta, reply_to=props["reply_to"],
                          correlation_id=props["correlation_id"])
            consumer.ack(delivery)
    finally:
        consumer.close()
        broker.delete_queue(queue.name)
    assert ok.get(timeout=10) == 5
    assert ok.state == "SUCCESS"
    with pytest.raises(KeyError):
        bad.get(timeout=10)
    assert bad.state == "FAILURE"


def test_we_read_results_a_celery_worker_sends(celery_app: object, backend: RPCBackend) -> None:
    from celery.app.task import Context

    app = celery_app
    reply_to = str(uuid.uuid4())
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for task_id in ids:
        backend.on_task_call(task_id, reply_to)
    # Celery's worker stores through its RPC backend with the task's request context.
    celery_backend = app.backend  # type: ignore[attr-defined]
    for n, task_id in enumerate(ids[:2]):
        request = Context(id=task_id, reply_to=reply_to, correlation_id=task_id)
        celery_backend.store_result(task_id, None, states.STARTED, request=request)
        celery_backend.store_result(task_id, n * 10, states.SUCCESS, request=request)
    failed = Context(id=ids[2], reply_to=reply_to, correlation_id=ids[2])
    celery_backend.mark_as_failure(ids[2], ValueError("bad", 42), request=failed)
    got = backend.wait(ids, timeout=10)
    assert got[ids[0]]["result"] == 0 and got[ids[1]]["result"] == 10
    assert got[ids[0]]["status"] == states.SUCCESS
    assert got[ids[2]]["status"] == states.FAILURE
    exc = decode_exception(got[ids[2]]["result"])
    assert type(exc) is ValueError and exc.args == ("bad", 42)
    backend.broker.delete_queue(reply_to)


def test_message_format_matches_celery(amqp_url: str, backend: RPCBackend) -> None:
    reply_to = str(uuid.uuid4())
    queue = backend.reply_queue(reply_to)
    broker = create_broker(amqp_url, {})
    broker.declare(queue)
    try:
        task_id = str(uuid.uuid4())
        backend.store(task_id, make_meta(task_id, states.SUCCESS, 42), reply_to=reply_to,
                      correlation_id=task_id)
        consumer = broker.consumer([queue], 0, no_ack=True)
        got = []
        for _ in range(40):
            got = consumer.fetch(1, 0.25)
            if got:
                break
        consumer.close()
        assert got
        message = got[0].message
        assert message.properties["correlation_id"] == task_id
        assert message.properties["delivery_mode"] == 1
        assert message.content_type == "application/json"
        body = backend.decode(message.body)
        assert {k: body[k] for k in ("task_id", "status", "result", "traceback", "children")} == {
            "task_id": task_id, "status": "SUCCESS", "result": 42, "traceback": None, "children": []}
    finally:
        broker.delete_queue(reply_to)
        broker.close()


def test_results_of_other_tasks_are_kept(amqp_url: str, backend: RPCBackend) -> None:
    reply_to = str(uuid.uuid4())
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    backend.on_task_call(first, reply_to)
    backend.on_task_call(second, reply_to)
    worker = RPCBackend("rpc://", {"broker_url": amqp_url})
    try:
        worker.store(second, make_meta(second, states.SUCCESS, "b"), reply_to=reply_to)
        worker.store(first, make_meta(first, states.SUCCESS, "a"), reply_to=reply_to)
        assert backend.wait([first], timeout=10)[first]["result"] == "a"
        assert backend.get(second) is not None  # buffered while waiting for the first
        assert backend.wait([second], timeout=1)[second]["result"] == "b"
    finally:
        worker.close()
        backend.broker.delete_queue(reply_to)


def test_task_message_reply_to_round_trip(amqp_url: str, backend: RPCBackend) -> None:
    # what the app does: reply_to = thread oid on the task message, declared before sending
    reply_to = str(uuid.uuid4())
    task_id = str(uuid.uuid4())
    backend.on_task_call(task_id, reply_to)
    message = encode_task("proj.add", task_id, [1, 1], {}, reply_to=reply_to)
    props = message.properties
    worker = RPCBackend("rpc://", {"broker_url": amqp_url, "result_persistent": True})
    try:
        worker.store(task_id, make_meta(task_id, states.SUCCESS, 2), reply_to=props["reply_to"],
                     correlation_id=props["correlation_id"])
        assert backend.wait([task_id], timeout=10)[task_id]["result"] == 2
    finally:
        worker.close()
        backend.broker.delete_queue(reply_to)
