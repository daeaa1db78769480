"""Time limits count from when a pool slot starts a task, and end with it (issue 10, case 7)."""

from __future__ import annotations

import threading
import time
from typing import Any

from celeriac import group, states
from celeriac.testing.plugin import start_worker
from celeriac.worker.timer import Timer


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_queued_time_does_not_count_against_the_time_limit(celeriac_app: Any) -> None:
    """Four 0.6 s tasks, time_limit 0.9 s, one slot and prefetch 4: none is killed."""
    @celeriac_app.task(time_limit=0.9)
    def slow(index: int) -> int:
        time.sleep(0.6)
        return index

    worker = start_worker(celeriac_app, concurrency=1, prefetch_multiplier=4)
    try:
        result = group(slow.s(i) for i in range(4)).apply_async()
        assert result.get(timeout=20) == [0, 1, 2, 3]
        consumer = worker.task_consumer
        assert consumer is not None
        # Every limit of a task that ended in time was cancelled, none is left in memory.
        wait_until(lambda: len(consumer.timer) == 0, timeout=2)
    finally:
        worker.stop()
        worker._thread.join(10)  # type: ignore[attr-defined]


def test_time_limit_still_stops_a_task_that_runs_too_long(celeriac_app: Any) -> None:
    @celeriac_app.task(time_limit=0.3)
    def forever() -> None:
        for _ in range(1000):
            time.sleep(0.01)

    worker = start_worker(celeriac_app, concurrency=1)
    try:
        result = forever.delay()
        wait_until(lambda: result.state == states.FAILURE)
        assert "TimeLimitExceeded" in repr(result.result) or "TimeLimit" in str(result.traceback)
    finally:
        worker.stop()
        worker._thread.join(10)  # type: ignore[attr-defined]


def test_active_lists_running_tasks_with_their_start_time(celeriac_app: Any) -> None:
    release = threading.Event()

    @celeriac_app.task
    def blocked() -> str:
        release.wait(10)
        return "done"

    worker = start_worker(celeriac_app, concurrency=1, events=False)
    try:
        before = time.time()
        running, waiting = blocked.delay(), blocked.delay()
        inspect = celeriac_app.control.inspect(timeout=2)
        wait_until(lambda: (inspect.active() or {}).get(worker.hostname))
        active = inspect.active()[worker.hostname]
        assert [item["id"] for item in active] == [running.id]
        assert before - 1 <= active[0]["time_start"] <= time.time()
        reserved = celeriac_app.control.inspect(timeout=2).reserved()[worker.hostname]
        assert [item["id"] for item in reserved] == [waiting.id]
        assert reserved[0]["time_start"] is None
        release.set()
        assert running.get(timeout=10) == waiting.get(timeout=10) == "done"
    finally:
        release.set()
        worker.stop()
        worker._thread.join(10)  # type: ignore[attr-defined]


def test_timer_cancel_keeps_memory_flat() -> None:
    timer = Timer()
    try:
        fired: list[int] = []
        entries = [timer.call_later(60, lambda: fired.append(1)) for _ in range(1000)]
        for entry in entries:
            timer.cancel(entry)
            timer.cancel(entry)
        assert len(timer) == 0
        assert len(timer._heap) < 10
        timer.call_later(0.01, lambda: fired.append(2))
        wait_until(lambda: fired == [2], timeout=2)
    finally:
        timer.stop()


def test_eta_and_rate_limited_tasks_reach_the_pool_from_the_consumer_thread(celeriac_app: Any) -> None:
    """Issue 10, case 9: with ``-P solo`` a held ETA task or a rate-limited one runs in the
    consumer's thread, never in the timer thread (which would block every other timer)."""
    import datetime as dt
    import uuid

    from celeriac.protocol import encode_task

    threads: list[str] = []

    @celeriac_app.task(name="tl.where")
    def where() -> str:
        threads.append(threading.current_thread().name)
        return "ok"

    @celeriac_app.task(name="tl.limited", rate_limit="5/s")
    def limited() -> str:
        threads.append(threading.current_thread().name)
        return "ok"

    worker = start_worker(celeriac_app, pool="solo")
    try:
        # As a Celery client sends it: straight to the queue with an eta header, so the worker
        # holds it until its ETA (no broker-side delay).
        eta = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.5)).isoformat()
        task_id = str(uuid.uuid4())
        celeriac_app.broker.publish(encode_task("tl.where", task_id, [], {}, eta=eta), "", "celery")
        limited_results = [limited.delay() for _ in range(3)]
        assert celeriac_app.AsyncResult(task_id).get(timeout=10) == "ok"
        assert [r.get(timeout=10) for r in limited_results] == ["ok"] * 3
    finally:
        worker.stop()
        worker._thread.join(10)  # type: ignore[attr-defined]
    assert len(threads) == 4
    assert set(threads) == {f"Worker-{worker.hostname}"}, threads
