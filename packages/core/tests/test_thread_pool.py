"""The ``threads`` pool's hand-off: a job sent with ``wait_taken`` to an idle pool is running in a
pool thread when ``apply_async`` returns; one sent while the pool is busy, or without
``wait_taken``, is queued without any wait."""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import pytest

from celeriac.exceptions import SoftTimeLimitExceeded
from celeriac.worker import pool as pool_module
from celeriac.worker.pool import ThreadPool


def test_a_job_sent_to_an_idle_pool_is_taken_before_apply_async_returns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "HAND_OFF_WAIT", 10.0)  # a loaded machine may wake threads late
    pool = ThreadPool(4)
    pool.start()
    try:
        for _ in range(20):
            done = threading.Event()
            handle = pool.apply_async(time.sleep, (0.01,), lambda _result, done=done: done.set(),
                                      wait_taken=True)
            assert handle.thread_id not in (None, threading.get_ident())
            assert done.wait(5)
    finally:
        pool.stop()


def test_a_job_sent_while_the_pool_is_busy_is_queued_without_waiting() -> None:
    pool = ThreadPool(1)
    pool.start()
    release = threading.Event()
    results: list[object] = []
    try:
        pool.apply_async(release.wait, (10,), results.append)
        queued = pool.apply_async(lambda: "second", (), results.append, wait_taken=True)
        assert queued.thread_id is None  # the only thread still runs the first job
        release.set()
        deadline = time.monotonic() + 5
        while len(results) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert results == [True, "second"]
    finally:
        release.set()
        pool.stop()


def test_without_wait_taken_apply_async_does_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "HAND_OFF_WAIT", 10.0)
    pool = ThreadPool(1)
    pool.start()
    release = threading.Event()
    try:
        handle = pool.apply_async(release.wait, (10,), lambda _result: None)
        assert handle.taken is None
    finally:
        release.set()
        pool.stop()


def test_a_soft_time_limit_landing_as_its_job_ends_leaves_the_pool_thread_alive() -> None:
    # The timer's raise_soft_timeout holds the pool's lock while it checks that the job still
    # runs and raises into its thread; the job may have returned meanwhile, its thread waiting
    # for that lock to mark it done. The exception then lands after the job: the pool thread
    # must report the job once and go on serving (it used to die: the worker lost a slot).
    pool = ThreadPool(1)
    pool.start()
    reported: list[object] = []
    started, go = threading.Event(), threading.Event()

    def job() -> str:
        started.set()
        go.wait(5)
        return "finished"

    try:
        handle = pool.apply_async(job, (), reported.append)
        assert started.wait(5)
        with pool._lock:  # as raise_soft_timeout does
            go.set()
            time.sleep(0.2)  # the job returns; its thread waits for the lock
            assert not handle.done
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(handle.thread_id),
                                                       ctypes.py_object(SoftTimeLimitExceeded))
        after: list[object] = []
        pool.apply_async(lambda: "next", (), after.append)
        deadline = time.monotonic() + 5
        while not after and time.monotonic() < deadline:
            time.sleep(0.01)
        assert after == ["next"]
        assert len(reported) == 1
        # The job is over: a limit meant for it must not interrupt the thread's next job.
        assert handle.done
        assert not pool.raise_soft_timeout(handle, SoftTimeLimitExceeded)
    finally:
        pool.stop(wait=False)


def test_a_job_reported_as_an_exception_still_leaves_the_worker_s_books(celeriac_app: Any) -> None:
    # What the pool reports when a soft time limit lands as a job ends is the exception, not
    # the request: the worker must still count the task done (inspect active, reserved slots).
    from celeriac.testing.plugin import start_worker

    @celeriac_app.task
    def add(x: int, y: int) -> int:
        return x + y

    worker = start_worker(celeriac_app, concurrency=2)
    try:
        pool = worker.pool
        original = pool.apply_async

        def reporting_an_exception(target: Any, args: Any, callback: Any, *rest: Any, **options: Any) -> Any:
            return original(target, args, lambda _result: callback(SoftTimeLimitExceeded()), *rest, **options)

        pool.apply_async = reporting_an_exception
        assert add.delay(2, 2).get(timeout=10) == 4
        consumer = worker.task_consumer
        deadline = time.monotonic() + 5
        while consumer.reserved and time.monotonic() < deadline:
            time.sleep(0.01)
        assert consumer.reserved == 0
        assert consumer.active == {}
        assert consumer.totals.get(add.name) == 1
    finally:
        worker.stop()
        worker._thread.join(10)


def test_an_idle_worker_runs_its_only_task_where_it_fetched_it_and_goes_on_fetching(
        celeriac_app: Any, tmp_path: Any) -> None:
    # No hand-off on an idle worker: the pool thread that fetched the only task runs it (a
    # round trip's latency); when it runs on, the watchdog has another pool thread go on
    # fetching, so a task sent while the first one blocks still runs at once.
    from celeriac.testing.plugin import start_worker

    release = tmp_path / "release"

    @celeriac_app.task(name="lf.blocker")
    def blocker() -> int:
        deadline = time.monotonic() + 20
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return threading.get_ident()

    @celeriac_app.task(name="lf.ident")
    def ident() -> int:
        return threading.get_ident()

    worker = start_worker(celeriac_app, concurrency=2)
    try:
        first = blocker.delay()
        deadline = time.monotonic() + 10
        while not worker.task_consumer.active:
            assert time.monotonic() < deadline, "the first task never started"
            time.sleep(0.01)
        second = ident.delay().get(timeout=10)  # runs although the first blocks its thread
        release.touch()
        assert first.get(timeout=10) not in (second, worker._thread.ident)
        # and the worker goes on: round trips, a group
        assert [ident.delay().get(timeout=10) for _ in range(5)]
    finally:
        release.touch()
        worker.stop()
        worker._thread.join(10)
