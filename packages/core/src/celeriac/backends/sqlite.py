"""``sqlite:///results.db``: results in an SQLite file shared by the processes of one machine.

Same file conventions as the embedded broker (WAL, busy timeout, one connection per thread).
Metas are stored encoded with ``result_serializer``. Expired rows (``result_expires``) are
never returned and are deleted lazily by later writes. The chord join is one ``BEGIN
IMMEDIATE`` transaction, so exactly one caller across all processes completes a chord.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from celeriac import states
from celeriac.backends.base import CHORDS, GROUPS, PERSISTENT, ChordEntry, ResultBackend
from celeriac.exceptions import TimeoutError
from celeriac.sqlite_db import connect, retry_busy, sqlite_path, write_lock

__all__ = ["SQLiteBackend"]

_T = TypeVar("_T")
_CHUNK = 500
_SWEEP_EVERY = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS celeriac_results (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    meta BLOB NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS celeriac_results_expiry
    ON celeriac_results (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS celeriac_groups (
    group_id TEXT PRIMARY KEY,
    result BLOB NOT NULL,
    expires_at REAL
);
CREATE TABLE IF NOT EXISTS celeriac_chords (
    group_id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS celeriac_chord_parts (
    seq INTEGER PRIMARY KEY,
    group_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    group_index INTEGER,
    state TEXT NOT NULL,
    result BLOB NOT NULL,
    UNIQUE (group_id, task_id)
);
"""


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables (inside the caller's transaction), and add the chord counter column
    to a database made by an earlier version, counted from the parts already stored."""
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(celeriac_chords)")}
    if "done" not in columns:
        conn.execute("ALTER TABLE celeriac_chords ADD COLUMN done INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE celeriac_chords SET done = (SELECT COUNT(*) FROM celeriac_chord_parts "
                     "WHERE celeriac_chord_parts.group_id = celeriac_chords.group_id)")


def _chunks(ids: Sequence[str]) -> Iterator[tuple[str, Sequence[str]]]:
    for start in range(0, len(ids), _CHUNK):
        part = ids[start:start + _CHUNK]
        yield ",".join("?" * len(part)), part


def _connection_state() -> Any:
    """Where a thread keeps its connection: a ``threading.local``, except in a process that
    gevent or eventlet patched, whose ``threading.local`` is per greenlet (a new connection for
    every task, each kept open in ``_connections``): all greenlets run in one OS thread there
    and share one connection."""
    import socket
    import types

    if socket.socket.__module__.partition(".")[0] in ("gevent", "eventlet"):
        return types.SimpleNamespace()
    return threading.local()


class SQLiteBackend(ResultBackend):
    """Result backend in an SQLite file; thread- and process-safe.

    ``result_backend_transport_options`` may set ``busy_timeout`` (s, default 30).
    """

    capabilities = frozenset({PERSISTENT, CHORDS, GROUPS})
    description = "SQLite file"
    default_file = "celeriac-results.db"

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        options = conf.get("result_backend_transport_options") or {}
        self.busy_timeout = float(options.get("busy_timeout", 30))
        self.path = sqlite_path(url, self.default_file)
        self._local = _connection_state()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._ready = False
        self._last_sweep = 0.0

    # -- connections ------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = connect(self.path, self.busy_timeout, native_busy=False)
            if not self._ready:
                self._transaction(conn, lambda: _create_schema(conn))
                self._ready = True
            local.conn, local.pid = conn, os.getpid()
            with self._lock:
                self._connections.append(conn)
        return conn

    def _read(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        conn = self._conn()
        return retry_busy(lambda: conn.execute(sql, args), self.busy_timeout)

    def _write(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        conn = self._conn()
        with write_lock(self.path):
            return retry_busy(lambda: conn.execute(sql, args), self.busy_timeout)

    def _transaction(self, conn: sqlite3.Connection, body: Callable[[], _T]) -> _T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction under the process write lock."""
        with write_lock(self.path):
            retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"), self.busy_timeout)
            try:
                result = body()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return result

    def _expiry(self, now: float) -> float | None:
        return now + self.expires if self.expires else None

    # -- results ----------------------------------------------------------------------------

    def store(self, task_id: str, meta: dict[str, Any], *, reply_to: str | None = None,
              correlation_id: str | None = None) -> None:
        """Insert or update the meta of ``task_id``; a live SUCCESS row is never replaced."""
        now = time.time()
        self._write(
            "INSERT INTO celeriac_results (task_id, status, meta, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, meta = excluded.meta, "
            "expires_at = excluded.expires_at WHERE celeriac_results.status != ? OR "
            "(celeriac_results.expires_at IS NOT NULL AND celeriac_results.expires_at <= ?)",
            (task_id, str(meta.get("status")), self.encode(meta), self._expiry(now),
             states.SUCCESS, now))
        if self.expires and now - self._last_sweep > _SWEEP_EVERY:
            self._last_sweep = now
            self._write("DELETE FROM celeriac_results WHERE expires_at <= ?", (now,))
            self._write("DELETE FROM celeriac_groups WHERE expires_at <= ?", (now,))

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The stored meta of ``task_id`` or None (missing or expired)."""
        row = self._read(
            "SELECT meta FROM celeriac_results WHERE task_id = ? AND "
            "(expires_at IS NULL OR expires_at > ?)", (task_id, time.time())).fetchone()
        if row is None:
            return None
        meta: dict[str, Any] = self.decode(bytes(row[0]))
        return meta

    def get_many(self, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored metas of the ids that have one, in one query per 500 ids."""
        ids = list(dict.fromkeys(task_ids))
        out: dict[str, dict[str, Any]] = {}
        now = time.time()
        for marks, part in _chunks(ids):
            for task_id, meta in self._read(
                    f"SELECT task_id, meta FROM celeriac_results WHERE task_id IN ({marks}) "
                    "AND (expires_at IS NULL OR expires_at > ?)", (*part, now)):
                out[task_id] = self.decode(bytes(meta))
        return out

    def forget(self, task_id: str) -> None:
        """Delete the result of ``task_id``."""
        self._write("DELETE FROM celeriac_results WHERE task_id = ?", (task_id,))

    def wait(self, task_ids: Sequence[str], timeout: float | None = None,
             interval: float = 0.5) -> dict[str, dict[str, Any]]:
        """Poll until every id is ready, re-reading only when the database changed
        (``PRAGMA data_version``), sleeping 1 ms doubling up to 20 ms. Raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(task_ids))
        done: dict[str, dict[str, Any]] = {}
        conn = self._conn()
        last_version: int | None = None
        delay = 0.001
        max_delay = min(interval, 0.02) if interval > 0 else 0.02
        while True:
            version = retry_busy(lambda: conn.execute("PRAGMA data_version").fetchone()[0],
                                 self.busy_timeout)
            if version != last_version:
                last_version = version
                for task_id, meta in self.get_many(pending).items():
                    if meta.get("status") in states.READY_STATES:
                        done[task_id] = meta
                pending = [t for t in pending if t not in done]
                if not pending:
                    return done
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"The operation timed out after {timeout} s waiting for "
                        f"{len(pending)} result(s), first {pending[0]}.")
                time.sleep(min(delay, left))
            else:
                time.sleep(delay)
            delay = min(delay * 2, max_delay)

    # -- groups -----------------------------------------------------------------------------

    def save_group(self, group_id: str, result: Any) -> None:
        """Store a group's result tuple."""
        self._write(
            "INSERT OR REPLACE INTO celeriac_groups (group_id, result, expires_at) VALUES (?, ?, ?)",
            (group_id, self.encode(result), self._expiry(time.time())))

    def restore_group(self, group_id: str) -> Any | None:
        """The saved group result or None."""
        row = self._read(
            "SELECT result FROM celeriac_groups WHERE group_id = ? AND "
            "(expires_at IS NULL OR expires_at > ?)", (group_id, time.time())).fetchone()
        return None if row is None else self.decode(bytes(row[0]))

    def forget_group(self, group_id: str) -> None:
        """Delete a saved group."""
        self._write("DELETE FROM celeriac_groups WHERE group_id = ?", (group_id,))

    # -- chords -----------------------------------------------------------------------------

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Record the number of header members of chord ``group_id``."""
        self._write(
            "INSERT OR REPLACE INTO celeriac_chords (group_id, size, done) VALUES (?, ?, "
            "(SELECT COUNT(*) FROM celeriac_chord_parts WHERE group_id = ?))",
            (group_id, int(size), group_id))

    def add_to_chord(self, group_id: str, count: int = 1) -> None:
        """Raise the size of the running chord ``group_id`` by ``count`` members (a chord
        unknown here gets a row of that size)."""
        conn = self._conn()

        def grow() -> None:
            # No upsert: SQLite before 3.24 lacks ON CONFLICT ... DO UPDATE.
            cur = conn.execute("UPDATE celeriac_chords SET size = size + ? WHERE group_id = ?",
                               (int(count), group_id))
            if cur.rowcount <= 0:
                conn.execute("INSERT INTO celeriac_chords (group_id, size, done) VALUES (?, ?, 0)",
                             (group_id, int(count)))

        self._transaction(conn, grow)

    def chord_part_return(self, group_id: str, group_index: int | None, task_id: str,
                          state: str, result: Any) -> list[ChordEntry] | None:
        """Record one finished member in one IMMEDIATE transaction; the call that completes the
        chord gets the entries ordered by ``group_index``. A member reported twice counts once.

        The members are counted in the chord's row (not by counting its parts, which made each
        call cost as much as the parts stored so far: a chord of 10,000 joined in quadratic
        time)."""
        encoded = self.encode(result)
        conn = self._conn()

        def join() -> list[Any] | None:
            cur = conn.execute(
                "INSERT OR IGNORE INTO celeriac_chord_parts (group_id, task_id, group_index, "
                "state, result) VALUES (?, ?, ?, ?, ?)",
                (group_id, task_id, group_index, state, encoded))
            if cur.rowcount <= 0:
                return None
            # No RETURNING: SQLite before 3.35 (still shipped by some systems) lacks it.
            conn.execute("UPDATE celeriac_chords SET done = done + 1 WHERE group_id = ?", (group_id,))
            row = conn.execute("SELECT size, done FROM celeriac_chords WHERE group_id = ?",
                               (group_id,)).fetchone()
            if row is None or row[1] < row[0]:
                return None
            found = conn.execute(
                "SELECT task_id, state, result FROM celeriac_chord_parts WHERE group_id = ? "
                "ORDER BY group_index IS NULL, group_index, seq", (group_id,)).fetchall()
            conn.execute("DELETE FROM celeriac_chord_parts WHERE group_id = ?", (group_id,))
            conn.execute("DELETE FROM celeriac_chords WHERE group_id = ?", (group_id,))
            return found

        rows = self._transaction(conn, join)
        if rows is None:
            return None
        return [(tid, st, self.decode(bytes(res))) for tid, st, res in rows]

    def close(self) -> None:
        """Close every connection this backend opened. Idempotent."""
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = _connection_state()
