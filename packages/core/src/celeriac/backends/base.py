"""The result backend SPI, and the helpers that give results Celery's stored shape.

A backend stores one *meta* dict per task id, in Celery's format (``status``, ``result``,
``traceback``, ``children``, ``date_done``, ``task_id`` and optionally ``group_id``,
``parent_id``), serialized with ``result_serializer`` (JSON). Exceptions are stored as
``{"exc_type", "exc_message", "exc_module"}`` and rebuilt client-side by :func:`decode_exception`.

Required: :meth:`ResultBackend.store`, :meth:`ResultBackend.get`, :meth:`ResultBackend.forget`,
:meth:`ResultBackend.chord_part_return`. Waiting polls with backoff unless the backend overrides
:meth:`ResultBackend.wait` with a push channel.

Capabilities (``ResultBackend.capabilities``): ``persistent`` (any process can read a result by
id later), ``chords`` (an atomic chord join), ``groups`` (``save_group``), ``push`` (``wait`` is
woken by the backend instead of polling).
"""

from __future__ import annotations

import abc
import builtins
import datetime as dt
import importlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from celeriac import states
from celeriac.exceptions import RemoteTaskError, TimeoutError
from celeriac.serialization import get_serializer

__all__ = [
    "CHORDS",
    "GROUPS",
    "PERSISTENT",
    "PUSH",
    "ChordEntry",
    "ResultBackend",
    "decode_exception",
    "encode_exception",
    "make_meta",
]

PERSISTENT = "persistent"
CHORDS = "chords"
GROUPS = "groups"
PUSH = "push"

#: One finished chord member: ``(task_id, state, result)`` with ``result`` as stored in meta.
ChordEntry = tuple[str, str, Any]


def encode_exception(exc: BaseException) -> dict[str, Any]:
    """Celery's JSON form of an exception: type name, module and its args as a list."""
    cls = type(exc)
    message: list[Any] = []
    for arg in exc.args:
        if isinstance(arg, (str, int, float, bool, type(None), list, dict)):
            message.append(arg)
        else:
            message.append(repr(arg))
    return {"exc_type": cls.__qualname__, "exc_message": message, "exc_module": cls.__module__}


def decode_exception(data: Any) -> BaseException:
    """Rebuild an exception from :func:`encode_exception`'s form.

    The type is imported only when it is a ``BaseException`` subclass; an unknown type becomes a
    :class:`RemoteTaskError` that carries the original type and module names.
    """
    if isinstance(data, BaseException):
        return data
    if not isinstance(data, Mapping) or "exc_type" not in data:
        return RemoteTaskError("Exception", None, data)
    type_name = str(data["exc_type"])
    module_name = data.get("exc_module")
    message = data.get("exc_message", [])
    cls: Any = None
    try:
        if module_name in (None, "builtins", "exceptions"):
            cls = getattr(builtins, type_name, None)
        else:
            obj: Any = importlib.import_module(str(module_name))
            for part in type_name.split("."):
                obj = getattr(obj, part)
            cls = obj
    except Exception:
        cls = None
    if isinstance(module_name, str) and module_name.startswith("celery.") and cls is None:
        from celeriac import exceptions as celeriac_exceptions

        cls = getattr(celeriac_exceptions, type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return RemoteTaskError(type_name, module_name, message)
    try:
        if isinstance(message, list):
            return cls(*message)  # type: ignore[no-any-return]
        return cls(message)  # type: ignore[no-any-return]
    except Exception:
        return RemoteTaskError(type_name, module_name, message)


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def make_meta(task_id: str, status: str, result: Any, *, traceback: str | None = None,
              children: list[Any] | None = None, group_id: str | None = None,
              parent_id: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build Celery's stored meta dict. Exceptions in ``result`` are encoded."""
    if isinstance(result, BaseException):
        result = encode_exception(result)
    meta: dict[str, Any] = {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": children or [],
        "date_done": _now_iso() if status in states.READY_STATES else None,
    }
    if group_id is not None:
        meta["group_id"] = group_id
    if parent_id is not None:
        meta["parent_id"] = parent_id
    if extra:
        meta.update(extra)
    meta["task_id"] = task_id
    return meta


class ResultBackend(abc.ABC):
    """Where task states and results are kept. Created by ``factory(url, conf)``.

    All methods are thread-safe (the worker stores results from pool threads).
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({PERSISTENT, CHORDS, GROUPS})
    description: ClassVar[str] = ""

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        self.url = url
        self.conf = conf
        self.serializer = get_serializer(str(conf.get("result_serializer") or "json"))
        expires = conf.get("result_expires")
        if isinstance(expires, dt.timedelta):
            expires = expires.total_seconds()
        self.expires: float | None = float(expires) if expires else None

    def has(self, capability: str) -> bool:
        """True when this backend declares ``capability``."""
        return capability in self.capabilities

    # -- encoding helpers ---------------------------------------------------------------------

    def encode(self, meta: Any) -> bytes:
        """Serialize a meta dict (or any stored value) with ``result_serializer``."""
        return self.serializer.dumps(meta)

    def decode(self, data: bytes | str) -> Any:
        """Inverse of :meth:`encode`."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return self.serializer.loads(data)

    # -- required -----------------------------------------------------------------------------

    @abc.abstractmethod
    def store(self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None,
              correlation_id: str | None = None) -> None:
        """Store ``meta`` (from :func:`make_meta`) for ``task_id``.

        A stored SUCCESS is never overwritten by a later write. Expires after
        ``result_expires`` where the backend can expire keys. ``reply_to`` and
        ``correlation_id`` are the task message's properties (the ``rpc`` backend sends the
        result there; other backends ignore them).
        """

    @abc.abstractmethod
    def get(self, task_id: str) -> dict[str, Any] | None:
        """Return the stored meta of ``task_id``, or None when nothing is stored (PENDING)."""

    @abc.abstractmethod
    def forget(self, task_id: str) -> None:
        """Delete what is stored for ``task_id``."""

    @abc.abstractmethod
    def chord_part_return(self, group_id: str, group_index: int | None, task_id: str,
                          state: str, result: Any) -> list[ChordEntry] | None:
        """Record that one chord header member finished; atomic across processes.

        Returns the ordered entries of all members (by ``group_index``) to exactly one caller:
        the one whose call completed the chord (count == size set by :meth:`set_chord_size`).
        Every other call returns None. The backend then drops its chord bookkeeping.
        """

    # -- optional -----------------------------------------------------------------------------

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Record the number of header members of chord ``group_id`` (called by the client
        before it publishes the header)."""
        raise NotImplementedError(f"{type(self).__name__} does not support chords.")

    def add_to_chord(self, group_id: str, count: int = 1) -> None:
        """Raise the size of the running chord ``group_id`` by ``count`` members
        (``Task.add_to_chord``; called before the new member is sent). Raises
        ``NotImplementedError`` where the backend cannot (the default)."""
        raise NotImplementedError(f"{type(self).__name__} cannot add members to a running chord: use the "
                                  "Redis, SQLite or in-memory result backend for Task.add_to_chord.")

    def get_many(self, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Return the stored meta of each id that has one."""
        found: dict[str, dict[str, Any]] = {}
        for task_id in task_ids:
            meta = self.get(task_id)
            if meta is not None:
                found[task_id] = meta
        return found

    def wait(self, task_ids: Sequence[str], timeout: float | None = None,
             interval: float = 0.5) -> dict[str, dict[str, Any]]:
        """Block until every id in ``task_ids`` is in a ready state; return their metas.

        This default polls :meth:`get_many` with a backoff from 1 ms up to ``interval``. Raises
        :class:`celeriac.exceptions.TimeoutError` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(task_ids))
        done: dict[str, dict[str, Any]] = {}
        delay = 0.001
        while True:
            for task_id, meta in self.get_many(pending).items():
                if meta.get("status") in states.READY_STATES:
                    done[task_id] = meta
            pending = [t for t in pending if t not in done]
            if not pending:
                return done
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"The operation timed out after {timeout} s waiting for "
                    f"{len(pending)} result(s), first {pending[0]}."
                )
            sleep_for = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(sleep_for)
            delay = min(delay * 2, interval)

    def save_group(self, group_id: str, result: Any) -> None:
        """Store a group's result tuple (``GroupResult.save``) (capability ``groups``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot save group results.")

    def restore_group(self, group_id: str) -> Any | None:
        """Return a saved group's result tuple or None (capability ``groups``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore group results.")

    def forget_group(self, group_id: str) -> None:
        """Delete a saved group."""

    def on_task_call(self, task_id: str, reply_to: str | None) -> None:
        """Called by the client just before it publishes a task whose result it will read.

        Push backends subscribe here so no state is missed; the default does nothing.
        """

    def close(self) -> None:
        """Release connections. Idempotent."""
