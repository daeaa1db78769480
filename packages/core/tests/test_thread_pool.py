"""The ``threads`` pool's hand-off: a job sent with ``wait_taken`` to an idle pool is running in a
pool thread when ``apply_async`` returns; one sent while the pool is busy, or without
``wait_taken``, is queued without any wait."""

from __future__ import annotations

import threading
import time

import pytest

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
