"""``Task.replace`` and ``Task.add_to_chord`` on the built-in brokers and backends (in-memory,
embedded SQLite), in an in-process worker, and eagerly. Their outcomes against Celery's are in
``test_replace_differential.py`` (Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import chord, group
from celeriac.testing.plugin import start_worker


@pytest.fixture
def tasks(celeriac_app: Any) -> Iterator[Any]:
    app = celeriac_app

    @app.task(name="tr.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tr.xsum")
    def xsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="tr.replacer", bind=True)
    def replacer(self: Any, x: int) -> Any:
        return self.replace(add.s(x, 100) | add.s(1000))

    @app.task(name="tr.adder", bind=True)
    def adder(self: Any, lazy: bool) -> int:
        sig = self.add_to_chord(add.si(10, 10), lazy=lazy)
        if lazy:
            sig.delay()
        return 1

    @app.task(name="tr.group_adder", bind=True)
    def group_adder(self: Any) -> int:
        self.add_to_chord(group(add.si(1, 2), add.si(3, 4)))
        return 1

    worker = start_worker(app, concurrency=4)
    try:
        yield app
    finally:
        worker.stop()


def test_replaced_task_gives_the_replacements_result(tasks: Any) -> None:
    replacer = tasks.tasks["tr.replacer"]
    result = replacer.delay(1)
    assert result.get(timeout=10) == 1101
    assert result.state == "SUCCESS"
    # in a chord header, the replacement is counted in the replaced task's place
    joined = chord([replacer.si(2), tasks.tasks["tr.add"].si(0, 0)], tasks.tasks["tr.xsum"].s())()
    assert joined.get(timeout=10) == 1102


def test_replace_run_eagerly_returns_the_value(tasks: Any) -> None:
    assert tasks.tasks["tr.replacer"].apply((3,)).get() == 1103


@pytest.mark.parametrize("lazy", [False, True])
def test_add_to_chord_makes_the_body_wait_for_the_new_member(tasks: Any, lazy: bool) -> None:
    add, xsum, adder = (tasks.tasks[name] for name in ("tr.add", "tr.xsum", "tr.adder"))
    result = chord([adder.si(lazy), add.si(1, 1)], xsum.s())()
    assert result.get(timeout=10) == 1 + 2 + 20


def test_add_to_chord_of_a_group_waits_for_every_member(tasks: Any) -> None:
    """Each member of the added group is one more part of the chord (Celery's body gets only the
    group's results: docs/differences.md)."""
    add, xsum, group_adder = (tasks.tasks[name] for name in ("tr.add", "tr.xsum", "tr.group_adder"))
    result = chord([group_adder.si(), add.si(1, 1)], xsum.s())()
    assert result.get(timeout=10) == 1 + 2 + 3 + 7


def test_add_to_chord_outside_a_chord_fails_the_task(tasks: Any) -> None:
    with pytest.raises(ValueError, match="not a member of any chord"):
        tasks.tasks["tr.adder"].delay(False).get(timeout=10)
