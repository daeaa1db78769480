"""Canvas cases of issue 10 (items 1-4): errors and callbacks travelling through compositions.

Each test ran against a worker on the in-memory and the embedded SQLite broker; each failed on
0bedaec (hang, wrong value, callback run 0 or 2 times, missing ``on_error``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import chord, group
from celeriac.canvas import _chain
from celeriac.exceptions import ChordError
from celeriac.testing.plugin import start_worker


class Calls:
    """Thread-safe record of callback calls."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.lock = threading.Lock()

    def add(self, item: Any) -> None:
        with self.lock:
            self.items.append(item)

    def settled(self, count: int, timeout: float = 10.0, quiet: float = 0.5) -> list[Any]:
        """Wait for at least ``count`` calls, then ``quiet`` seconds more for extra ones."""
        deadline = time.monotonic() + timeout
        while len(self.items) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(quiet)
        with self.lock:
            return list(self.items)


@pytest.fixture
def canvas(celeriac_app: Any) -> Iterator[Any]:
    app = celeriac_app
    calls = Calls()

    class Tasks:
        pass

    tasks = Tasks()
    tasks.calls = calls  # type: ignore[attr-defined]

    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="t.tsum")
    def tsum(numbers: list[int]) -> int:
        return sum(numbers)

    @app.task(name="t.fail")
    def fail(*args: Any) -> None:
        raise ValueError(f"failed with {args!r}")

    @app.task(name="t.on_error_id")
    def on_error_id(task_id: str) -> None:
        calls.add(("id", task_id))

    @app.task(name="t.on_error_request")
    def on_error_request(request: Any, exc: BaseException, traceback: Any) -> None:
        calls.add(("request", request.id, type(exc).__name__))

    for fn in (add, mul, tsum, fail, on_error_id, on_error_request):
        setattr(tasks, fn.name.split(".")[1], fn)
    worker = start_worker(app, concurrency=4)
    try:
        yield tasks
    finally:
        worker.stop()


def test_chord_header_chain_whose_first_step_fails_fails_the_chord(canvas: Any) -> None:
    """Item 1: the chain's failed first step reports for its never-run last step."""
    body = canvas.tsum.s()
    body.link_error(canvas.on_error_id.s())
    started = time.monotonic()
    result = chord([canvas.add.s(1, 1), canvas.fail.s(1) | canvas.add.s(1)], body).apply_async()
    # get() raises the header's own error first (it follows parents, as Celery); the body
    # itself failed with ChordError
    with pytest.raises(ValueError, match="failed with"):
        result.get(timeout=10)
    with pytest.raises(ChordError, match="ValueError"):
        result.get(timeout=10, follow_parents=False)
    assert time.monotonic() - started < 8
    assert canvas.calls.settled(1) == [("id", result.id)]


def test_chord_header_chain_failing_in_the_middle(canvas: Any) -> None:
    result = chord([canvas.add.s(1, 1) | canvas.fail.s() | canvas.add.s(1) | canvas.add.s(2),
                    canvas.add.s(2, 2)], canvas.tsum.s()).apply_async()
    with pytest.raises(ChordError):
        result.get(timeout=10, follow_parents=False)


def test_chord_body_chain_returns_the_last_step(canvas: Any) -> None:
    """Item 2: a chain as the body returns its last step's value (30, not 3)."""
    result = chord([canvas.add.s(1, 0), canvas.add.s(1, 1)], canvas.tsum.s() | canvas.mul.s(10))()
    assert result.get(timeout=10) == 30


def test_chord_body_group_containing_a_chain_resolves(canvas: Any) -> None:
    """Item 2: a group body (one member a chain) resolves to the list of its members' values."""
    body = group(canvas.tsum.s(), canvas.tsum.s() | canvas.mul.s(10))
    result = chord([canvas.add.s(1, 0), canvas.add.s(1, 1)], body)()
    assert result.get(timeout=10) == [3, 30]


def test_chord_link_error_runs_once_when_the_body_fails(canvas: Any) -> None:
    """Item 3: the chord's errback goes to the body; one body failure, one call."""
    sig = chord([canvas.add.s(1, 1), canvas.add.s(2, 2)], canvas.fail.s())
    sig.link_error(canvas.on_error_id.s())
    result = sig.apply_async()
    with pytest.raises(ValueError):
        result.get(timeout=10)
    assert canvas.calls.settled(1) == [("id", result.id)]


def test_chord_link_error_runs_once_when_two_header_tasks_fail(canvas: Any) -> None:
    """Item 3: two failed header members fail the chord once, so the errback runs once."""
    sig = chord([canvas.fail.si(1), canvas.fail.si(2), canvas.add.s(1, 1)], canvas.tsum.s())
    sig.link_error(canvas.on_error_request.s())
    result = sig.apply_async()
    with pytest.raises(ChordError):
        result.get(timeout=10, follow_parents=False)
    assert canvas.calls.settled(1) == [("request", result.id, "ChordError")]


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_chain_link_error_survives_extending_the_chain(canvas: Any, failing: int) -> None:
    """Item 4: a chain's errback stays when the chain is extended, and fires whichever of its
    steps fails; a step added afterwards is not covered (as in Celery)."""
    steps = [canvas.add.s(1, 1), canvas.add.s(1), canvas.add.s(2)]
    steps[failing] = canvas.fail.s() if failing else canvas.fail.s(0)
    partial = steps[0] | steps[1]
    partial.link_error(canvas.on_error_id.s())
    workflow = partial | steps[2]
    result = workflow.apply_async()
    with pytest.raises(ValueError):
        result.get(timeout=10)
    if failing == 2:
        assert canvas.calls.settled(0, quiet=1.0) == []
        return
    calls = canvas.calls.settled(1)
    assert len(calls) == 1 and calls[0][0] == "id"


def test_on_error_returns_the_signature_itself(canvas: Any) -> None:
    """Item 4: ``Signature.on_error`` (Celery's spelling) chains the original signature."""
    sig = canvas.fail.s("x")
    assert sig.on_error(canvas.on_error_id.s()) is sig
    result = sig.delay()
    with pytest.raises(ValueError):
        result.get(timeout=10)
    assert canvas.calls.settled(1) == [("id", result.id)]
    chained = (canvas.add.s(1, 1) | canvas.fail.s()).on_error(canvas.on_error_request.s())
    assert isinstance(chained, _chain)
    failed = chained.delay()
    with pytest.raises(ValueError):
        failed.get(timeout=10)
    assert canvas.calls.settled(2)[1][0] == "request"
