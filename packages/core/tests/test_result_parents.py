"""``AsyncResult.get()`` and the parents of a chain or chord: one bulk read, failures in order."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from celeriac import states
from celeriac.backends.base import make_meta
from celeriac.backends.memory import MemoryBackend
from celeriac.exceptions import ChordError
from celeriac.result import AsyncResult, GroupResult


class CountingBackend(MemoryBackend):
    """The in-memory backend, counting single and bulk reads."""

    def __init__(self) -> None:
        super().__init__(f"memory://{uuid.uuid4().hex}", {})
        self.gets = 0
        self.bulk_reads: list[int] = []

    def get(self, task_id: str) -> dict[str, Any] | None:
        self.gets += 1
        return super().get(task_id)

    def get_many(self, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        self.bulk_reads.append(len(task_ids))
        return super().get_many(task_ids)


def _chord(backend: CountingBackend, size: int, failed: Sequence[int] = ()) -> AsyncResult:
    members = [AsyncResult(f"m{i}", backend=backend) for i in range(size)]
    for i, member in enumerate(members):
        if i in failed:
            backend.store(member.id, make_meta(member.id, states.FAILURE, ValueError(f"member {i}")))
        else:
            backend.store(member.id, make_meta(member.id, states.SUCCESS, 2 * i))
    header = GroupResult("g", members)
    body = AsyncResult("body", backend=backend, parent=header)
    if failed:
        backend.store(body.id, make_meta(body.id, states.FAILURE, ChordError("a member failed")))
    else:
        backend.store(body.id, make_meta(body.id, states.SUCCESS, sum(2 * i for i in range(size))))
    return body


def test_a_chord_header_is_read_in_one_bulk_read_and_not_again_after_success() -> None:
    backend = CountingBackend()
    body = _chord(backend, 300)
    assert body.get(timeout=5) == 300 * 299
    assert backend.bulk_reads == [300]  # the header, once, before waiting
    assert backend.gets == 0


def test_the_earliest_failed_member_is_raised() -> None:
    backend = CountingBackend()
    body = _chord(backend, 50, failed=(7, 3))
    with pytest.raises(ValueError, match="member 3"):
        body.get(timeout=5)
    assert backend.gets == 0


def test_without_propagation_the_body_error_is_returned() -> None:
    backend = CountingBackend()
    body = _chord(backend, 5, failed=(1,))
    assert isinstance(body.get(timeout=5, propagate=False), ChordError)


def test_a_chain_step_failure_is_raised_for_the_unrun_step() -> None:
    backend = CountingBackend()
    first = AsyncResult("first", backend=backend)
    second = AsyncResult("second", backend=backend, parent=first)
    third = AsyncResult("third", backend=backend, parent=second)
    backend.store("first", make_meta("first", states.SUCCESS, 1))
    backend.store("second", make_meta("second", states.FAILURE, KeyError("step two")))
    backend.store("third", make_meta("third", states.FAILURE, KeyError("step two")))
    with pytest.raises(KeyError, match="step two"):
        third.get(timeout=5)


def test_revoked_state_stored_by_a_celery_worker_keeps_its_reason(tmp_path: Any) -> None:
    """A Celery worker stores REVOKED with Celery's ``TaskRevokedError('terminated')`` (in a mixed
    fleet); a Celeriac client raises Celeriac's ``TaskRevokedError`` with that reason."""
    import celery.exceptions

    from celeriac import Celeriac
    from celeriac.exceptions import TaskRevokedError

    app = Celeriac("mixed", broker=f"sqlite:///{tmp_path}/b.db", backend=f"sqlite:///{tmp_path}/r.db")
    try:
        app.backend.store("t-1", make_meta("t-1", "REVOKED", celery.exceptions.TaskRevokedError("terminated")))
        with pytest.raises(TaskRevokedError, match="^terminated$"):
            app.AsyncResult("t-1").get(timeout=5)
    finally:
        app.close()
