"""SQLite plumbing shared by the embedded broker and result backend: paths, connections, busy
retries, per-file write locks and transactions."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from celeriac.exceptions import BrokerConnectionError
from celeriac.serialization import json_dumps

__all__ = ["Tx", "chunks", "connect", "dumps", "is_busy", "retry_busy", "sqlite_path", "write_lock"]

CHUNK = 500  # ids per ``IN (...)`` list, below SQLite's host-parameter limit


def sqlite_path(url: str, default: str) -> str:
    """The absolute file path of a ``sqlite://`` URL (``default`` when the URL has none).

    ``sqlite:///rel.db`` is relative to the current directory, ``sqlite:////abs.db`` absolute.
    """
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    path = path.removeprefix("/")
    if not path:
        path = default
    if path == ":memory:":
        raise BrokerConnectionError(
            f"{url!r}: an in-memory SQLite database cannot be shared between connections; "
            "use memory:// or a file path."
        )
    return os.path.abspath(path)


def connect(path: str, busy_timeout: float, native_busy: bool = True) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL and ``synchronous=NORMAL``.

    With ``native_busy`` SQLite itself waits up to ``busy_timeout`` for a lock (sleeping at least
    1 ms per try); without it a busy lock raises at once and the caller retries with
    :func:`retry_busy`, which backs off from 0.1 ms and so keeps write latency low.
    """
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        raise BrokerConnectionError(f"Cannot open SQLite database {path!r}: directory missing.")
    try:
        native = busy_timeout if native_busy else 0.0
        conn = sqlite3.connect(path, timeout=native, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(native * 1000)}")
        for attempt in range(50):  # switching to WAL needs a moment alone with the file
            try:
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.01 * (attempt + 1))
        conn.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.Error as exc:
        raise BrokerConnectionError(f"Cannot open SQLite database {path!r}: {exc}") from exc
    return conn


def is_busy(exc: BaseException) -> bool:
    """True when ``exc`` is SQLite's "database is locked" (another writer holds the lock)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED and their extended codes
    return "locked" in str(exc) or "busy" in str(exc)


_T = TypeVar("_T")


def retry_busy(fn: Callable[[], _T], budget: float) -> _T:
    """Call ``fn`` until it does not fail with a busy lock, backing off 0.1 ms .. 2 ms, for at
    most ``budget`` seconds (then the last error is raised)."""
    try:
        return fn()
    except sqlite3.OperationalError as exc:
        if not is_busy(exc):
            raise
    deadline = time.monotonic() + budget
    delay = 0.0001
    while True:
        time.sleep(delay)
        delay = min(delay * 2, 0.002)
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() > deadline:
                raise


_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def write_lock(path: str) -> threading.Lock:
    """The in-process lock of database ``path``: threads of one process take turns writing on
    it instead of colliding on SQLite's file lock (whose busy handler sleeps 1 ms or more)."""
    lock = _WRITE_LOCKS.get(path)
    if lock is None:
        with _WRITE_LOCKS_GUARD:
            lock = _WRITE_LOCKS.setdefault(path, threading.Lock())
    return lock


def _reset_write_locks() -> None:
    global _WRITE_LOCKS_GUARD
    _WRITE_LOCKS.clear()  # a lock held by another thread at fork time would never be released
    _WRITE_LOCKS_GUARD = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_write_locks)


class Tx:
    """``with Tx(conn, budget, lock):`` runs the block in one ``BEGIN IMMEDIATE`` transaction,
    holding the in-process ``lock`` and waiting up to ``budget`` seconds for the file lock."""

    __slots__ = ("budget", "conn", "lock")

    def __init__(self, conn: sqlite3.Connection, budget: float, lock: threading.Lock) -> None:
        self.conn = conn
        self.budget = budget
        self.lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            retry_busy(lambda: self.conn.execute("BEGIN IMMEDIATE"), self.budget)
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self.conn.execute("COMMIT")
            elif self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            self.lock.release()


def chunks(ids: Sequence[int]) -> Iterator[tuple[str, Sequence[int]]]:
    for start in range(0, len(ids), CHUNK):
        part = ids[start:start + CHUNK]
        yield ",".join("?" * len(part)), part


def dumps(value: Any) -> str:
    return json_dumps(value).decode("utf-8")
