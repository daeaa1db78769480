"""Lifecycle hooks: a hook that raises is logged with the task id and the task goes on;
postrun runs whatever the outcome (issue 10, worker bullet)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import states
from celeriac.exceptions import Ignore
from celeriac.plugins import hookimpl
from celeriac.plugins.manager import get_manager
from celeriac.testing.plugin import start_worker


class BrokenPlugin:
    """Every hook raises; postrun also records what it saw."""

    def __init__(self) -> None:
        self.postrun: list[tuple[str, str]] = []

    @hookimpl
    def celeriac_task_prerun(self, task: Any, task_id: str, args: Any, kwargs: Any) -> None:
        raise RuntimeError("prerun hook is broken")

    @hookimpl
    def celeriac_task_success(self, task: Any, task_id: str, result: Any) -> None:
        raise RuntimeError("success hook is broken")

    @hookimpl
    def celeriac_task_failure(self, task: Any, task_id: str, exc: BaseException, traceback: str) -> None:
        raise RuntimeError("failure hook is broken")

    @hookimpl
    def celeriac_task_postrun(self, task: Any, task_id: str, state: str, retval: Any) -> None:
        self.postrun.append((task_id, state))
        raise RuntimeError("postrun hook is broken")


@pytest.fixture
def broken() -> Iterator[BrokenPlugin]:
    plugin = BrokenPlugin()
    manager = get_manager()
    manager.register(plugin, name="broken-test-plugin")
    try:
        yield plugin
    finally:
        manager.unregister(plugin)


def test_raising_hooks_are_logged_and_tasks_go_on(celeriac_app: Any, broken: BrokenPlugin,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    @celeriac_app.task
    def add(x: int, y: int) -> int:
        return x + y

    @celeriac_app.task
    def boom() -> None:
        raise ValueError("boom")

    @celeriac_app.task
    def skip() -> None:
        raise Ignore()

    worker = start_worker(celeriac_app)
    try:
        with caplog.at_level(logging.ERROR, logger="celeriac.plugins"):
            ok = add.delay(2, 3)
            assert ok.get(timeout=10) == 5
            failed = boom.delay()
            with pytest.raises(ValueError):
                failed.get(timeout=10)
            ignored = skip.delay()
            deadline = time.monotonic() + 10
            while len(broken.postrun) < 3:
                assert time.monotonic() < deadline, broken.postrun
                time.sleep(0.02)
    finally:
        worker.stop()
        worker._thread.join(10)  # type: ignore[attr-defined]
    assert dict(broken.postrun) == {ok.id: states.SUCCESS, failed.id: states.FAILURE, ignored.id: states.IGNORED}
    logged = caplog.text
    assert f"celeriac_task_prerun hook raised for task {add.name}[{ok.id}]" in logged
    assert "celeriac_task_success hook raised" in logged and "celeriac_task_failure hook raised" in logged
