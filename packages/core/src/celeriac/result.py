"""Result handles: ``AsyncResult``, ``GroupResult``/``ResultSet`` and ``EagerResult``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.backends.base import ResultBackend, decode_exception
from celeriac.exceptions import ResultsDisabled, TaskRevokedError

if TYPE_CHECKING:
    from celeriac.app import Celeriac

__all__ = ["AsyncResult", "EagerResult", "GroupResult", "ResultSet", "result_from_tuple"]

_NO_BACKEND = (
    "No result backend is configured, so results cannot be read. Configure one on the app, "
    "e.g. Celeriac('proj', backend='sqlite:///results.db'), backend='redis://localhost:6379/0' "
    "or backend='rpc://' (or set CELERIAC_RESULT_BACKEND)."
)


def _assert_will_not_block() -> None:
    from celeriac.task import current_request

    request = current_request()
    if request is not None and not request.is_eager:
        raise RuntimeError(
            "Never call result.get() within a task: it can deadlock the worker. Chain the tasks "
            "instead (a.s() | b.s()), or pass disable_sync_subtasks=False if you accept the risk."
        )


class AsyncResult:
    """The state and return value of a task sent to a worker."""

    #: True when the task was sent with ``ignore_result`` (as Celery sets it): :meth:`get`
    #: then returns None at once instead of waiting for a result that is never stored.
    ignored: bool = False

    def __init__(self, id: str, backend: ResultBackend | None = None,  # noqa: A002 - Celery API
                 task_name: str | None = None, app: Celeriac | None = None,
                 parent: Any = None) -> None:
        self.id = str(id)
        self._backend = backend
        self.task_name = task_name
        self._app = app
        self.parent = parent
        self._meta: dict[str, Any] | None = None

    @property
    def task_id(self) -> str:
        """Alias of ``id``."""
        return self.id

    @property
    def app(self) -> Celeriac:
        """The app the result belongs to."""
        if self._app is None:
            from celeriac.canvas import _default_app

            self._app = _default_app()
        return self._app

    @property
    def backend(self) -> ResultBackend:
        """The result backend, or a ``ResultsDisabled`` error saying how to configure one."""
        backend = self._backend or self.app.backend
        if backend is None:
            raise ResultsDisabled(_NO_BACKEND)
        return backend

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return self.id == other.id
        if isinstance(other, str):
            return self.id == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    # -- state --------------------------------------------------------------------------------

    def _get_meta(self) -> dict[str, Any]:
        if self._meta is not None:
            return self._meta
        meta = self.backend.get(self.id)
        if meta is None:
            return {"status": states.PENDING, "result": None, "traceback": None, "task_id": self.id}
        if meta.get("status") in states.READY_STATES:
            self._meta = meta
        return meta

    @property
    def state(self) -> str:
        """PENDING, RECEIVED, STARTED, SUCCESS, FAILURE, RETRY, REVOKED (unknown ids: PENDING)."""
        return str(self._get_meta()["status"])

    status = state

    @property
    def result(self) -> Any:
        """The return value, or the exception instance when the task failed."""
        meta = self._get_meta()
        if meta["status"] in states.EXCEPTION_STATES:
            return decode_exception(meta["result"])
        return meta.get("result")

    info = result

    @property
    def traceback(self) -> str | None:
        """The formatted traceback of a failure."""
        return self._get_meta().get("traceback")

    @property
    def date_done(self) -> dt.datetime | None:
        """When the task finished: a timezone-aware ``datetime`` (stored as ISO 8601), as Celery
        gives it; None while it has not."""
        value = self._get_meta().get("date_done")
        if not value:
            return None
        if isinstance(value, dt.datetime):
            return value
        from celeriac.protocol import parse_iso8601

        return parse_iso8601(str(value))

    @property
    def name(self) -> str | None:
        """The task's name, stored with ``result_extended`` (else None)."""
        return self._get_meta().get("name")

    @property
    def args(self) -> list[Any] | None:
        """The task's positional arguments, stored with ``result_extended`` (else None)."""
        return self._get_meta().get("args")

    @property
    def kwargs(self) -> dict[str, Any] | None:
        """The task's keyword arguments, stored with ``result_extended`` (else None)."""
        return self._get_meta().get("kwargs")

    @property
    def worker(self) -> str | None:
        """The node name of the worker that ran it, stored with ``result_extended``."""
        return self._get_meta().get("worker")

    @property
    def retries(self) -> int | None:
        """How many times it was retried, stored with ``result_extended``."""
        return self._get_meta().get("retries")

    @property
    def queue(self) -> str | None:
        """The queue (routing key) it was delivered from, stored with ``result_extended``."""
        return self._get_meta().get("queue")

    @property
    def children(self) -> list[Any]:
        """Result handles of tasks this task sent."""
        return [result_from_tuple(c, self._app) for c in self._get_meta().get("children") or []]

    def ready(self) -> bool:
        """True when the task finished (SUCCESS, FAILURE or REVOKED)."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        """True when the task succeeded."""
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        """True when the task failed."""
        return self.state == states.FAILURE

    # -- waiting ------------------------------------------------------------------------------

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            no_ack: bool = True, follow_parents: bool = True, disable_sync_subtasks: bool = True,
            callback: Any = None) -> Any:
        """Wait for the task to finish and return its result.

        Raises the task's exception when it failed and ``propagate`` is true, and
        :class:`celeriac.exceptions.TimeoutError` after ``timeout`` seconds. Returns None at once
        for a task sent with ``ignore_result`` (:attr:`ignored`), as Celery does.
        """
        if self.ignored:
            return None
        if disable_sync_subtasks:
            _assert_will_not_block()
        if follow_parents and propagate:
            self._raise_parent_failure()
        if self._meta is None:
            self._meta = self.backend.wait([self.id], timeout=timeout, interval=interval)[self.id]
        # A parent's failure matters now only when this task failed too (a chain's unrun step,
        # a chord body after a failed member): a task that succeeded had parents that did.
        if follow_parents and propagate and self._meta.get("status") in states.PROPAGATE_STATES:
            self._raise_parent_failure()
        return self._finish(self._meta, propagate)

    wait = get

    def _raise_parent_failure(self) -> None:
        """Raise the failure of the earliest failed parent (a chain's first failed step, a
        chord header's first failed member), as Celery does."""
        parents: list[Any] = []
        node = self.parent
        while node is not None and len(parents) < 10_000:
            parents.append(node)
            node = getattr(node, "parent", None)
        for parent in reversed(parents):
            _maybe_throw(parent)

    def _finish(self, meta: dict[str, Any], propagate: bool) -> Any:
        status = meta["status"]
        if status in states.PROPAGATE_STATES:
            exc = decode_exception(meta["result"])
            if status == states.REVOKED and not isinstance(exc, TaskRevokedError):
                # Celery's own TaskRevokedError (a Celery worker stored it) keeps its reason.
                reason = exc.args[0] if type(exc).__name__ == "TaskRevokedError" and exc.args else None
                exc = TaskRevokedError(reason or f"Task {self.id} was revoked.")
            if propagate:
                raise exc
            return exc
        return meta.get("result")

    def forget(self) -> None:
        """Delete the stored result."""
        self._meta = None
        self.backend.forget(self.id)

    def revoke(self, terminate: bool = False, signal: str = "SIGTERM") -> None:
        """Ask workers not to run this task (and to stop it with ``terminate``)."""
        self.app.control.revoke(self.id, terminate=terminate, signal=signal)

    def as_tuple(self) -> list[Any]:
        """Celery's serializable form: ``[[id, parent], None]``."""
        parent = self.parent.as_tuple() if isinstance(self.parent, AsyncResult) else None
        return [[self.id, parent], None]


class ResultSet:
    """Several results handled together."""

    def __init__(self, results: list[AsyncResult], app: Celeriac | None = None) -> None:
        self.results = list(results)
        self._app = app

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[AsyncResult]:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult:
        return self.results[index]

    def add(self, result: AsyncResult) -> None:
        """Add one result."""
        self.results.append(result)

    def _leaves(self) -> list[AsyncResult]:
        leaves: list[AsyncResult] = []
        for result in self.results:
            if isinstance(result, ResultSet):
                leaves.extend(result._leaves())
            else:
                leaves.append(result)
        return leaves

    def _backend(self) -> ResultBackend | None:
        for result in self._leaves():
            if not isinstance(result, EagerResult):
                return result.backend
        return None

    def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(1 for r in self._leaves() if r.successful())

    def ready(self) -> bool:
        """True when every member finished."""
        return all(r.ready() for r in self._leaves())

    def successful(self) -> bool:
        """True when every member succeeded."""
        return all(r.successful() for r in self._leaves())

    def failed(self) -> bool:
        """True when any member failed."""
        return any(r.failed() for r in self._leaves())

    def waiting(self) -> bool:
        """True when any member is not finished."""
        return not self.ready()

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            disable_sync_subtasks: bool = True, **kwargs: Any) -> list[Any]:
        """Wait for all members; return their results in order."""
        return self.join(timeout=timeout, propagate=propagate, interval=interval,
                         disable_sync_subtasks=disable_sync_subtasks)

    def join(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
             disable_sync_subtasks: bool = True, **kwargs: Any) -> list[Any]:
        """Wait for all members with one backend wait; return their results in order."""
        if disable_sync_subtasks:
            _assert_will_not_block()
        leaves = [r for r in self._leaves() if r._meta is None and not isinstance(r, EagerResult)]
        backend = self._backend() if leaves else None
        if leaves and backend is not None:
            metas = backend.wait([r.id for r in leaves], timeout=timeout, interval=interval)
            for leaf in leaves:
                leaf._meta = metas[leaf.id]
        values = []
        for result in self.results:
            if isinstance(result, ResultSet):
                values.append(result.join(timeout=timeout, propagate=propagate, interval=interval,
                                          disable_sync_subtasks=disable_sync_subtasks))
            else:
                # Members' own states only (Celery's native join does not follow parents).
                values.append(result.get(propagate=propagate, disable_sync_subtasks=False,
                                         follow_parents=False))
        return values

    join_native = join

    def forget(self) -> None:
        """Delete every member's stored result."""
        for result in self._leaves():
            result.forget()

    def revoke(self, terminate: bool = False, signal: str = "SIGTERM") -> None:
        """Revoke every member."""
        for result in self._leaves():
            result.revoke(terminate=terminate, signal=signal)


class GroupResult(ResultSet):
    """The results of a group, with the group's id."""

    def __init__(self, id: str, results: list[Any], app: Celeriac | None = None,  # noqa: A002
                 parent: Any = None) -> None:
        super().__init__(results, app)
        self.id = id
        self.parent = parent

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return self.id == other.id and self.results == other.results
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def children(self) -> list[Any]:
        """The member results."""
        return self.results

    def as_tuple(self) -> list[Any]:
        """Celery's serializable form: ``[[id, parent], [member tuples]]``."""
        parent = self.parent.as_tuple() if self.parent is not None else None
        return [[self.id, parent], [r.as_tuple() for r in self.results]]

    def _app_backend(self) -> ResultBackend:
        backend = self._backend()
        if backend is None:
            from celeriac.canvas import _default_app

            backend = (self._app or _default_app()).backend
        if backend is None:
            raise ResultsDisabled(_NO_BACKEND)
        return backend

    def save(self, backend: ResultBackend | None = None) -> None:
        """Store the group so :meth:`restore` can rebuild it by id."""
        (backend or self._app_backend()).save_group(self.id, self.as_tuple())

    def delete(self, backend: ResultBackend | None = None) -> None:
        """Remove the saved group."""
        (backend or self._app_backend()).forget_group(self.id)

    @classmethod
    def restore(cls, id: str, backend: ResultBackend | None = None,  # noqa: A002
                app: Celeriac | None = None) -> GroupResult | None:
        """Load a saved group, or None."""
        if backend is None:
            from celeriac.canvas import _default_app

            backend = (app or _default_app()).backend
            if backend is None:
                raise ResultsDisabled(_NO_BACKEND)
        data = backend.restore_group(id)
        if data is None:
            return None
        restored = result_from_tuple(data, app)
        return restored if isinstance(restored, GroupResult) else None


class EagerResult(AsyncResult):
    """The result of a task run in-process with ``apply()`` or ``task_always_eager``."""

    def __init__(self, id: str, retval: Any, state: str, traceback: str | None = None,  # noqa: A002
                 app: Celeriac | None = None, name: str | None = None) -> None:
        super().__init__(id, app=app, task_name=name)
        self._retval = retval
        self._state = state
        self._traceback = traceback

    def _get_meta(self) -> dict[str, Any]:
        return {"status": self._state, "result": self._retval, "traceback": self._traceback}

    @property
    def result(self) -> Any:
        return self._retval

    info = result

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            no_ack: bool = True, follow_parents: bool = True, disable_sync_subtasks: bool = True,
            callback: Any = None) -> Any:
        if self._state in states.PROPAGATE_STATES and propagate:
            raise self._retval
        return self._retval

    wait = get

    def forget(self) -> None:
        """Nothing is stored for eager results."""


def _maybe_throw(result: Any, fetched: dict[str, dict[str, Any]] | None = None) -> None:
    """Raise ``result``'s exception if it (or, for a set, any member in order) failed.

    The members of a set are read with one ``get_many`` (one ``MGET`` on Redis) when they share
    a backend, not one read each; ``fetched`` holds what that read found.
    """
    if isinstance(result, ResultSet):
        unread = [m for m in result.results if _pending_meta(m)]
        found: dict[str, dict[str, Any]] | None = None
        if len(unread) > 1:
            try:
                backend = unread[0].backend
                if all(m.backend is backend for m in unread):
                    found = backend.get_many([m.id for m in unread])
            except ResultsDisabled:
                found = None  # each member raises it in its turn, as before
        for member in result.results:
            _maybe_throw(member, found)
        return
    if not isinstance(result, AsyncResult) or isinstance(result, EagerResult):
        return
    meta: dict[str, Any] | None
    if result._meta:
        meta = result._meta
    elif fetched is not None:
        meta = fetched.get(result.id)
    else:
        meta = result.backend.get(result.id)
    if meta and meta.get("status") in states.PROPAGATE_STATES:
        result._finish(meta, True)


def _pending_meta(result: Any) -> bool:
    """True for a stored (not eager) result whose meta this process has not read yet."""
    return isinstance(result, AsyncResult) and not isinstance(result, EagerResult) and not result._meta


def result_from_tuple(data: Any, app: Celeriac | None = None) -> Any:
    """Rebuild an ``AsyncResult``/``GroupResult`` from :meth:`as_tuple` output."""
    if isinstance(data, (AsyncResult, ResultSet)):
        return data
    (task_id, parent), members = data
    parent_result = result_from_tuple(parent, app) if parent else None
    if members is not None:
        return GroupResult(task_id, [result_from_tuple(m, app) for m in members], app=app,
                           parent=parent_result)
    return AsyncResult(task_id, app=app, parent=parent_result)
