"""Small behaviours where Celeriac follows Celery 5.6, each found by running the same scenario on
both (the eager paths run in-process; the stored states in an in-process worker)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from celeriac import Celeriac, chain, group
from celeriac.protocol import Message
from celeriac.testing.plugin import start_worker


def test_a_per_call_ignore_result_still_stores_a_failure(celeriac_app: Any) -> None:
    """Celery keeps a failure unless the task itself ignores results; ``get()`` returns None at
    once for the caller that asked to ignore it, and a success is not stored."""

    @celeriac_app.task(name="cp.fail")
    def fail() -> None:
        raise ValueError("boom")

    @celeriac_app.task(name="cp.add")
    def add(x: int, y: int) -> int:
        return x + y

    worker = start_worker(celeriac_app, concurrency=2)
    try:
        failed = fail.apply_async(ignore_result=True)
        succeeded = add.apply_async((1, 1), ignore_result=True)
        assert failed.ignored and failed.get(timeout=1) is None
        deadline = time.monotonic() + 10
        while celeriac_app.AsyncResult(failed.id).state != "FAILURE" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert celeriac_app.AsyncResult(failed.id).state == "FAILURE"
        assert add.delay(2, 2).get(timeout=10) == 4  # the worker is past the first two
        assert celeriac_app.AsyncResult(succeeded.id).state == "PENDING"
    finally:
        worker.stop()


def test_date_done_is_an_aware_datetime(celeriac_app: Any) -> None:
    @celeriac_app.task(name="cp.one")
    def one() -> int:
        return 1

    worker = start_worker(celeriac_app, concurrency=1)
    try:
        result = one.delay()
        assert result.get(timeout=10) == 1
        done = celeriac_app.AsyncResult(result.id).date_done
        assert isinstance(done, dt.datetime) and done.tzinfo is not None
        assert abs((dt.datetime.now(dt.timezone.utc) - done).total_seconds()) < 60
        assert celeriac_app.AsyncResult("never-sent").date_done is None
    finally:
        worker.stop()


def test_the_task_compression_option_compresses_its_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    app = Celeriac("cp", broker="memory://parity-compression")
    sent: list[Message] = []
    monkeypatch.setattr(app.broker, "publish", lambda message, *a, **k: sent.append(message))

    @app.task(name="cp.packed", compression="bzip2")
    def packed(x: int) -> int:
        return x

    packed.delay(1)
    packed.s(2).apply_async()
    packed.apply_async((3,), compression="gzip")
    assert [m.headers.get("compression") for m in sent] == ["application/x-bz2", "application/x-bz2",
                                                            "application/x-gzip"]


def test_eager_chain_errbacks_cover_every_step() -> None:
    app = Celeriac("cp", broker="memory://parity-eager-chain", task_always_eager=True)
    seen: list[str] = []

    @app.task(name="cp.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="cp.fail")
    def fail(x: int) -> None:
        raise ValueError("boom")

    @app.task(name="cp.errback")
    def errback(task_id: str) -> None:
        seen.append("errback")

    @app.task(name="cp.callback")
    def callback(value: Any) -> None:
        seen.append(f"callback {value}")

    assert chain(add.s(1, 1), fail.s()).apply_async(link_error=errback.s()).state == "FAILURE"
    assert seen == ["errback"]
    assert chain(add.s(1, 1), fail.s()).on_error(errback.s()).delay().state == "FAILURE"
    assert seen == ["errback", "errback"]
    assert chain(add.s(1, 1), add.s(10)).apply_async(link=callback.s()).get() == 12
    assert seen == ["errback", "errback", "callback 12"]  # the callback runs once, after the last step


def test_eager_group_refuses_links_as_when_sent() -> None:
    app = Celeriac("cp", broker="memory://parity-eager-group", task_always_eager=True)

    @app.task(name="cp.add")
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match="Cannot add links to a group"):
        group(add.s(1, 1), add.s(2, 2)).apply_async(link_error=add.s(0))


def test_a_chord_body_has_the_completing_member_as_parent(celeriac_app: Any) -> None:
    """Celery stores the body's ``parent_id``: the header member whose result completed it."""
    from celeriac import chord

    @celeriac_app.task(name="cp.double")
    def double(x: int) -> int:
        return 2 * x

    @celeriac_app.task(name="cp.total")
    def total(values: list[int]) -> int:
        return sum(values)

    worker = start_worker(celeriac_app, concurrency=2)
    try:
        result = chord([double.s(1), double.s(2)], total.s())()
        assert result.get(timeout=10) == 6
        members = [r.id for r in result.parent.results]
        meta = celeriac_app.backend.get(result.id)
        assert meta["parent_id"] in members
    finally:
        worker.stop()
