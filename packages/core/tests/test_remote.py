"""Remote control and events (``multi`` is tested in test_multi.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from celeriac import states
from celeriac.events import EventReceiver
from celeriac.exceptions import TaskRevokedError
from celeriac.testing.plugin import start_worker


def test_inspect_and_control(celeriac_app: Any) -> None:
    release = threading.Event()

    @celeriac_app.task
    def blocker() -> str:
        release.wait(10)
        return "released"

    @celeriac_app.task
    def add(x: int, y: int) -> int:
        return x + y

    worker = start_worker(celeriac_app, hostname="w1@test", concurrency=2)
    other = start_worker(celeriac_app, hostname="w2@test", concurrency=1)
    try:
        inspect = celeriac_app.control.inspect(timeout=1.0)
        assert inspect.ping() == {"w1@test": {"ok": "pong"}, "w2@test": {"ok": "pong"}}
        only = celeriac_app.control.inspect(destination=["w2@test"], timeout=1.0)
        assert list(only.ping() or {}) == ["w2@test"]
        running = blocker.delay()
        deadline = time.monotonic() + 5
        active: dict[str, Any] = {}
        while time.monotonic() < deadline and not any(active.values()):
            active = inspect.active() or {}
        assert [t["id"] for tasks in active.values() for t in tasks] == [running.id]
        assert any(add.name in names for names in (inspect.registered() or {}).values())
        release.set()
        running.get(timeout=5)
        assert add.delay(1, 1).get(timeout=5) == 2
        totals = {node: s["total"] for node, s in (inspect.stats() or {}).items()}
        assert sum(t.get(add.name, 0) for t in totals.values()) == 1
        later = add.apply_async((1, 1), countdown=30)
        celeriac_app.control.revoke(later.id)
        with pytest.raises(TaskRevokedError):
            later.get(timeout=5)
        assert later.state == states.REVOKED
        assert celeriac_app.control.rate_limit(add.name, "100/s", reply=True, timeout=1.0)
        celeriac_app.control.shutdown(destination=["w2@test"])
        other._thread.join(10)  # type: ignore[attr-defined]
        assert not other._thread.is_alive()  # type: ignore[attr-defined]
        assert list(inspect.ping() or {}) == ["w1@test"]
    finally:
        release.set()
        worker.stop()
        other.stop()


def test_task_events_are_sent_with_minus_e(celeriac_app: Any) -> None:
    @celeriac_app.task
    def add(x: int, y: int) -> int:
        return x + y

    receiver = EventReceiver(celeriac_app)
    worker = start_worker(celeriac_app, hostname="ev@test", events=True)
    try:
        result = add.delay(2, 3)
        result.get(timeout=5)
        seen: dict[str, dict[str, Any]] = {}
        for event in receiver.itercapture(timeout=5):
            if event.get("uuid") == result.id or event["type"].startswith("worker-"):
                seen[event["type"]] = event
            if "task-succeeded" in seen and "worker-online" in seen:
                break
        assert {"task-received", "task-started", "task-succeeded", "worker-online"} <= set(seen)
        assert seen["task-succeeded"]["result"] == "5"
        assert seen["task-received"]["name"] == add.name and seen["task-received"]["hostname"] == "ev@test"
    finally:
        worker.stop()
        receiver.close()

