"""Remote control that changes a running worker: queues, pool size, autoscale; bad commands."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from celeriac.control import flatten_reply
from celeriac.testing.plugin import start_worker
from celeriac.worker.autoscale import parse_autoscale


def wait_until(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _stop(worker: Any) -> None:
    worker.stop()
    worker._thread.join(10)


def _call(app: Any, command: str, **arguments: Any) -> Any:
    return flatten_reply(app.control.broadcast(command, arguments, reply=True, timeout=3.0, limit=1))


def test_add_and_cancel_consumer(celeriac_app: Any) -> None:
    @celeriac_app.task
    def where(value: int) -> int:
        return value

    worker = start_worker(celeriac_app, concurrency=2)
    try:
        early = where.apply_async((1,), queue="images")
        assert _call(celeriac_app, "add_consumer", queue="images")[worker.hostname] == {"ok": "add consumer images"}
        assert early.get(timeout=10) == 1  # waited in the queue until the worker consumed it
        queues = _call(celeriac_app, "active_queues")[worker.hostname]
        assert {q["name"] for q in queues} == {"celery", "images"}
        assert _call(celeriac_app, "add_consumer", queue="images")[worker.hostname]["ok"].startswith("already")
        reply = _call(celeriac_app, "cancel_consumer", queue="celery")[worker.hostname]
        assert reply == {"ok": "no longer consuming from celery"}
        wait_until(lambda: [q.name for q in worker.queues] == ["images"])
        ignored = where.apply_async((2,), queue="celery")
        assert where.apply_async((3,), queue="images").get(timeout=10) == 3
        time.sleep(0.5)
        assert ignored.state == "PENDING"
        assert "error" in _call(celeriac_app, "cancel_consumer", queue="images")[worker.hostname]
        assert "error" in _call(celeriac_app, "cancel_consumer", queue="nope")[worker.hostname]
        _call(celeriac_app, "add_consumer", queue="celery")
        assert ignored.get(timeout=10) == 2
    finally:
        _stop(worker)


def test_pool_grow_and_shrink_change_how_many_tasks_run_at_once(celeriac_app: Any) -> None:
    running = []
    lock = threading.Lock()
    release = threading.Event()

    @celeriac_app.task
    def hold() -> int:
        with lock:
            running.append(1)
        release.wait(10)
        with lock:
            running.pop()
        return 1

    worker = start_worker(celeriac_app, concurrency=1, prefetch_multiplier=4)
    try:
        results = [hold.delay() for _ in range(3)]
        wait_until(lambda: len(running) == 1)
        reply = _call(celeriac_app, "pool_grow", n=2)[worker.hostname]
        assert reply == {"ok": "pool will grow"}
        wait_until(lambda: len(running) == 3)
        stats = _call(celeriac_app, "stats")[worker.hostname]
        assert stats["pool"]["max-concurrency"] == 3
        release.set()
        assert [r.get(timeout=10) for r in results] == [1, 1, 1]
        assert _call(celeriac_app, "pool_shrink", n=2)[worker.hostname] == {"ok": "pool will shrink"}
        assert worker.pool.concurrency == 1
        # one task thread left, and the thread that runs the task consumer's loop
        wait_until(lambda: len(worker.pool._threads) == 2)
    finally:
        release.set()
        _stop(worker)


def test_autoscale_grows_with_work_and_shrinks_when_idle(celeriac_app: Any) -> None:
    release = threading.Event()

    @celeriac_app.task
    def hold() -> int:
        release.wait(10)
        return 1

    worker = start_worker(celeriac_app, autoscale=(4, 1), prefetch_multiplier=1)
    try:
        assert worker.pool.concurrency == 1
        worker.autoscaler.keepalive = 0.5
        results = [hold.delay() for _ in range(4)]
        wait_until(lambda: worker.pool.concurrency == 4)
        release.set()
        assert [r.get(timeout=10) for r in results] == [1, 1, 1, 1]
        wait_until(lambda: worker.pool.concurrency == 1)
        reply = _call(celeriac_app, "autoscale", max=6, min=2)[worker.hostname]
        assert reply == {"ok": "autoscale now max=6 min=2"}
        wait_until(lambda: worker.pool.concurrency == 2)
    finally:
        release.set()
        _stop(worker)


def test_autoscale_without_autoscaler_and_unknown_commands_are_error_replies(celeriac_app: Any) -> None:
    worker = start_worker(celeriac_app)
    try:
        assert "error" in _call(celeriac_app, "autoscale", max=3, min=1)[worker.hostname]
        reply = _call(celeriac_app, "no_such_command")[worker.hostname]
        assert reply == {"error": "No such control command: no_such_command"}
        assert _call(celeriac_app, "ping")[worker.hostname] == {"ok": "pong"}  # still answering
    finally:
        _stop(worker)


def test_parse_autoscale() -> None:
    assert parse_autoscale("10,3") == (10, 3)
    assert parse_autoscale("3,10") == (10, 3)
    assert parse_autoscale("5") == (5, 0)
    for bad in ("", "a,b", "0", "-1,2", "1,2,3"):
        with pytest.raises(ValueError, match="--autoscale"):
            parse_autoscale(bad)


def test_scheduled_lists_tasks_parked_in_the_broker_in_the_app_timezone(celeriac_app: Any) -> None:
    import datetime as dt

    celeriac_app.conf.timezone = "Asia/Tokyo"

    @celeriac_app.task
    def add(x: int, y: int) -> int:
        return x + y

    worker = start_worker(celeriac_app)
    try:
        before = time.time()
        result = add.apply_async((1, 2), countdown=40)
        entries = _call(celeriac_app, "scheduled")[worker.hostname]
        assert [e["request"]["id"] for e in entries] == [result.id]
        eta = dt.datetime.fromisoformat(entries[0]["eta"])
        assert eta.utcoffset() == dt.timedelta(hours=9)
        assert before + 39 <= eta.timestamp() <= time.time() + 41
        assert entries[0]["request"]["name"] == add.name
    finally:
        _stop(worker)
    assert celeriac_app.broker.purge("celery") == 1
    assert celeriac_app.broker.scheduled(["celery"]) == []


def test_revoke_terminate_on_the_threads_pool_says_it_cannot_and_the_task_finishes(celeriac_app: Any) -> None:
    """Celery's threads pool refuses as well (``terminate_job`` is not implemented): the reply is an
    error that names the task, the task runs to its end, and its result stands."""
    release = threading.Event()
    started = threading.Event()

    @celeriac_app.task
    def hold() -> str:
        started.set()
        release.wait(10)
        return "finished"

    worker = start_worker(celeriac_app, concurrency=2)
    try:
        running = hold.delay()
        assert started.wait(10)
        reply = _call(celeriac_app, "revoke", task_id=running.id, terminate=True, signal="SIGKILL")[worker.hostname]
        assert "error" in reply and running.id in reply["error"] and "-P prefork" in reply["error"]
        release.set()
        assert running.get(timeout=10) == "finished"
        assert running.state == "SUCCESS"
    finally:
        release.set()
        _stop(worker)
