"""The result backend conformance kit: the SPI contract of :mod:`celeriac.backends.base`.

A backend package subclasses :class:`BackendConformance` and provides a ``backend`` fixture::

    from celeriac.testing.backend_kit import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend(self):
            b = MyBackend("my://localhost", {})
            yield b
            b.close()

        @pytest.fixture
        def make_backend(self):          # optional: another client of the same store
            return lambda: MyBackend("my://localhost", {})

Required behaviour is tested for every backend; ``chords``, ``groups`` and ``persistent`` checks
run only where the backend declares the capability. Ids are uuids, so the kit can share a server.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from celeriac import states
from celeriac.backends.base import (
    CHORDS,
    GROUPS,
    PERSISTENT,
    ChordEntry,
    ResultBackend,
    decode_exception,
    make_meta,
)
from celeriac.exceptions import RemoteTaskError, TimeoutError

__all__ = ["BackendConformance", "KitError"]

MakeBackend = Callable[[], ResultBackend]


class KitError(Exception):
    """An importable custom exception type the kit sends through the backend."""


def _id() -> str:
    return str(uuid.uuid4())


class BackendConformance:
    """Subclass in a test module and provide a ``backend`` fixture (see the module docstring)."""

    wait_timeout: ClassVar[float] = 10.0

    @pytest.fixture
    def backend(self) -> ResultBackend:
        """Override: yield a ready backend."""
        raise NotImplementedError("Subclasses of BackendConformance must define a `backend` fixture.")

    @pytest.fixture
    def make_backend(self) -> MakeBackend | None:
        """Override to return a factory of new clients of the same store (optional)."""
        return None

    def _require(self, backend: ResultBackend, capability: str) -> None:
        if not backend.has(capability):
            pytest.skip(f"{type(backend).__name__} does not declare the {capability!r} capability")

    # -- results -----------------------------------------------------------------------------

    def test_store_and_get_round_trip(self, backend: ResultBackend) -> None:
        task_id = _id()
        result = {"text": "héllo ✓ 日本", "numbers": [1, 2.5, None], "ok": True, "empty": {}}
        meta = make_meta(task_id, states.SUCCESS, result, children=[], group_id="g-" + task_id,
                         parent_id="p-" + task_id)
        backend.store(task_id, meta)
        got = backend.get(task_id)
        assert got is not None
        for key in ("status", "result", "traceback", "children", "date_done", "task_id",
                    "group_id", "parent_id"):
            assert got.get(key) == meta[key], f"meta field {key!r} changed"

    def test_unknown_id_is_none(self, backend: ResultBackend) -> None:
        assert backend.get(_id()) is None
        assert backend.get_many([_id(), _id()]) == {}

    def test_states_progress_and_success_is_final(self, backend: ResultBackend) -> None:
        task_id = _id()
        backend.store(task_id, make_meta(task_id, states.STARTED, {"pid": 1}))
        got = backend.get(task_id)
        assert got is not None and got["status"] == states.STARTED
        backend.store(task_id, make_meta(task_id, states.SUCCESS, 42))
        backend.store(task_id, make_meta(task_id, states.FAILURE, ValueError("late")))
        backend.store(task_id, make_meta(task_id, states.STARTED, None))
        got = backend.get(task_id)
        assert got is not None
        assert got["status"] == states.SUCCESS
        assert got["result"] == 42

    def test_forget(self, backend: ResultBackend) -> None:
        task_id = _id()
        backend.store(task_id, make_meta(task_id, states.SUCCESS, "x"))
        assert backend.get(task_id) is not None
        backend.forget(task_id)
        assert backend.get(task_id) is None
        backend.forget(task_id)  # forgetting twice is harmless

    def test_get_many(self, backend: ResultBackend) -> None:
        ids = [_id() for _ in range(3)]
        for n, task_id in enumerate(ids):
            backend.store(task_id, make_meta(task_id, states.SUCCESS, n))
        missing = _id()
        got = backend.get_many([*ids, missing])
        assert set(got) == set(ids)
        assert [got[t]["result"] for t in ids] == [0, 1, 2]

    def test_exception_round_trip(self, backend: ResultBackend) -> None:
        cases: list[tuple[BaseException | dict[str, Any], type[BaseException], tuple[Any, ...]]] = [
            (KeyError("missing"), KeyError, ("missing",)),
            (KitError("custom", 3), KitError, ("custom", 3)),
        ]
        for raised, expected_type, expected_args in cases:
            task_id = _id()
            backend.store(task_id, make_meta(task_id, states.FAILURE, raised,
                                             traceback="Traceback (most recent call last): ..."))
            got = backend.get(task_id)
            assert got is not None and got["status"] == states.FAILURE
            assert got["traceback"].startswith("Traceback")
            exc = decode_exception(got["result"])
            assert type(exc) is expected_type
            assert exc.args == expected_args
        task_id = _id()
        unknown = {"exc_type": "NoSuchError", "exc_module": "no_such_module.sub",
                   "exc_message": ["gone"]}
        backend.store(task_id, make_meta(task_id, states.FAILURE, unknown))
        got = backend.get(task_id)
        assert got is not None
        exc = decode_exception(got["result"])
        assert isinstance(exc, RemoteTaskError)
        assert exc.exc_type == "NoSuchError"

    def test_concurrent_stores(self, backend: ResultBackend) -> None:
        ids = [[_id() for _ in range(25)] for _ in range(8)]
        errors: list[BaseException] = []

        def work(chunk: list[str]) -> None:
            try:
                for task_id in chunk:
                    backend.store(task_id, make_meta(task_id, states.SUCCESS, task_id))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(chunk,)) for chunk in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        flat = [t for chunk in ids for t in chunk]
        got = backend.get_many(flat)
        assert {t: m["result"] for t, m in got.items()} == {t: t for t in flat}

    # -- waiting -----------------------------------------------------------------------------

    def test_wait_returns_when_ready(self, backend: ResultBackend) -> None:
        first, second = _id(), _id()
        backend.store(first, make_meta(first, states.SUCCESS, 1))
        backend.store(second, make_meta(second, states.STARTED, None))

        def finish() -> None:
            backend.store(second, make_meta(second, states.FAILURE, ValueError("no")))

        timer = threading.Timer(0.2, finish)
        timer.start()
        try:
            got = backend.wait([first, second], timeout=self.wait_timeout)
        finally:
            timer.join()
        assert set(got) == {first, second}
        assert got[first]["result"] == 1
        assert got[second]["status"] == states.FAILURE

    def test_wait_times_out(self, backend: ResultBackend) -> None:
        started = _id()
        backend.store(started, make_meta(started, states.STARTED, None))
        for ids in ([_id()], [started]):
            begin = time.monotonic()
            with pytest.raises(TimeoutError):
                backend.wait(ids, timeout=0.3)
            assert time.monotonic() - begin < 0.3 + 5.0

    # -- capabilities ------------------------------------------------------------------------

    def test_persistent_results_survive_a_new_client(self, backend: ResultBackend,
                                                     make_backend: MakeBackend | None) -> None:
        self._require(backend, PERSISTENT)
        if make_backend is None:
            pytest.skip("no make_backend fixture")
        task_id = _id()
        backend.store(task_id, make_meta(task_id, states.SUCCESS, [1, "two"]))
        other = make_backend()
        try:
            got = other.get(task_id)
            assert got is not None and got["result"] == [1, "two"]
            other.forget(task_id)
        finally:
            other.close()
        assert backend.get(task_id) is None

    def test_groups_save_restore_forget(self, backend: ResultBackend) -> None:
        self._require(backend, GROUPS)
        group_id = _id()
        members = [_id(), _id()]
        saved = [[group_id, None], [[[m, None], None] for m in members]]
        assert backend.restore_group(group_id) is None
        backend.save_group(group_id, saved)
        assert backend.restore_group(group_id) == saved
        backend.forget_group(group_id)
        assert backend.restore_group(group_id) is None

    def test_chord_join_is_exactly_once_and_ordered(self, backend: ResultBackend) -> None:
        self._require(backend, CHORDS)
        group_id = _id()
        threads_n, per_thread = 8, 50
        size = threads_n * per_thread
        members = [(index, _id()) for index in range(size)]
        backend.set_chord_size(group_id, size)
        shuffled = members[:]
        random.shuffle(shuffled)
        barrier = threading.Barrier(threads_n)
        winners: list[list[ChordEntry]] = []
        nones: list[int] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work(part: list[tuple[int, str]]) -> None:
            try:
                barrier.wait()
                for index, task_id in part:
                    state = states.FAILURE if index == 7 else states.SUCCESS
                    result: Any = ({"exc_type": "ValueError", "exc_message": ["x"],
                                    "exc_module": "builtins"} if index == 7 else index * 2)
                    found = backend.chord_part_return(group_id, index, task_id, state, result)
                    with lock:
                        if found is None:
                            nones.append(index)
                        else:
                            winners.append(found)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(shuffled[i::threads_n],))
                   for i in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert len(winners) == 1, f"{len(winners)} callers completed the chord"
        assert len(nones) == size - 1
        entries = winners[0]
        assert [e[0] for e in entries] == [task_id for _, task_id in members]
        assert entries[7][1] == states.FAILURE
        assert entries[7][2]["exc_type"] == "ValueError"
        assert [e[2] for i, e in enumerate(entries) if i != 7] == [
            i * 2 for i in range(size) if i != 7]
        assert all(e[1] == states.SUCCESS for i, e in enumerate(entries) if i != 7)

    def test_chord_separate_groups_do_not_mix(self, backend: ResultBackend) -> None:
        self._require(backend, CHORDS)
        first, second = _id(), _id()
        backend.set_chord_size(first, 2)
        backend.set_chord_size(second, 1)
        assert backend.chord_part_return(first, 0, _id(), states.SUCCESS, "a") is None
        done_second = backend.chord_part_return(second, 0, "only", states.SUCCESS, "b")
        assert done_second is not None
        assert [tuple(e) for e in done_second] == [("only", states.SUCCESS, "b")]
        done_first = backend.chord_part_return(first, 1, "last", states.SUCCESS, "c")
        assert done_first is not None
        assert [e[2] for e in done_first] == ["a", "c"]
