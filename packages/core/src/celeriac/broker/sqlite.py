"""``sqlite:///path.db``: the embedded broker, shared by the processes of one machine.

``sqlite:///relative/path.db`` is relative to the current directory, ``sqlite:////abs/path.db``
absolute. The database runs in WAL mode so readers never block the single writer, with a busy
timeout so processes queue for the write lock instead of failing.

One table holds the messages. A row is *ready* (``ready = 1``) or waiting (``ready = 0``) until
``visible_at``: either delayed by an ETA or leased to a consumer (``owner``). A fetch claims up to
``max_count`` ready rows in one transaction and leases them for ``visibility_timeout`` seconds
(``broker_transport_options``, default 3600); acks delete them in batches. A lease that expires
(its worker was killed) makes the row ready again, which is how an ``acks_late`` task survives a
SIGKILL. A live consumer renews the leases of the deliveries it still holds from a small thread.
``reject(requeue=False)`` moves the row to ``celeriac_dead_letters``.

Broadcasts (remote control, events) go to their own table; subscribers read rows newer than the
last one they saw, and rows older than a minute are pruned.

Latency and throughput: a waiting consumer polls with a backoff from 1 ms to
``polling_interval`` (20 ms), and each poll first reads ``PRAGMA data_version``, so an idle poll
costs no query; a publish in the same process wakes local consumers at once. Acks are applied
in the transaction of the next claim. Threads of one process take turns on a process-wide write
lock, and a lock held by another process is retried from 0.1 ms instead of SQLite's 1 ms busy
sleeps. Durability is ``synchronous=NORMAL``: nothing is lost when a process dies; a power cut
may lose the last transactions.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celeriac.broker.base import (
    BATCH,
    BROADCAST,
    DELAY,
    PRIORITY,
    QUEUE_SIZE,
    REPLY_QUEUES,
    Broker,
    BrokerConnectionError,
    Consumer,
    Delivery,
    Subscription,
)
from celeriac.broker.memory import Binding, message_priority, route, topic_matches
from celeriac.protocol import Message
from celeriac.routing import Queue
from celeriac.serialization import json_loads
from celeriac.sqlite_db import Tx as _Tx
from celeriac.sqlite_db import chunks as _chunks
from celeriac.sqlite_db import connect, is_busy, retry_busy, sqlite_path, write_lock
from celeriac.sqlite_db import dumps as _dumps

__all__ = ["DeadLetter", "SQLiteBroker", "connect", "is_busy", "retry_busy", "sqlite_path",
           "write_lock"]

logger = logging.getLogger(__name__)

_BROADCAST_TTL = 60.0
_MAX_POLL = 0.02

_SCHEMA = """
CREATE TABLE IF NOT EXISTS celeriac_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    ready INTEGER NOT NULL,
    visible_at REAL NOT NULL,
    owner TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    headers TEXT NOT NULL,
    properties TEXT NOT NULL,
    content_type TEXT NOT NULL,
    content_encoding TEXT NOT NULL,
    body BLOB NOT NULL,
    published_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS celeriac_messages_ready
    ON celeriac_messages (queue, priority DESC, id) WHERE ready = 1;
CREATE INDEX IF NOT EXISTS celeriac_messages_waiting
    ON celeriac_messages (visible_at) WHERE ready = 0;
CREATE TABLE IF NOT EXISTS celeriac_dead_letters (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    headers TEXT NOT NULL,
    properties TEXT NOT NULL,
    content_type TEXT NOT NULL,
    content_encoding TEXT NOT NULL,
    body BLOB NOT NULL,
    published_at REAL NOT NULL,
    rejected_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS celeriac_queues (
    name TEXT PRIMARY KEY,
    durable INTEGER NOT NULL,
    max_priority INTEGER,
    declared_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS celeriac_bindings (
    exchange TEXT NOT NULL,
    exchange_type TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    queue TEXT NOT NULL,
    PRIMARY KEY (exchange, routing_key, queue)
);
CREATE TABLE IF NOT EXISTS celeriac_broadcasts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    created REAL NOT NULL,
    headers TEXT NOT NULL,
    properties TEXT NOT NULL,
    content_type TEXT NOT NULL,
    content_encoding TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS celeriac_broadcasts_exchange ON celeriac_broadcasts (exchange, id);
"""

_COLUMNS = ("id, queue, priority, deliveries, exchange, routing_key, headers, properties, "
            "content_type, content_encoding, body")

_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A row of ``celeriac_dead_letters``: why it is there and the raw stored message."""

    id: int
    queue: str
    reason: str
    rejected_at: float
    headers: str
    properties: str
    content_type: str
    content_encoding: str
    body: bytes

    def message(self) -> Message:
        """Decode the stored message; raises ``ValueError`` for rows stored as undecodable."""
        return Message(json_loads(self.headers), json_loads(self.properties), self.body,
                       self.content_type, self.content_encoding)


# -- consumer ---------------------------------------------------------------------------------


class _SQLiteConsumer(Consumer):
    """Fetches on its own connection; ack/reject from any thread are queued and flushed in one
    transaction by :meth:`fetch`, :meth:`flush` or :meth:`close`."""

    def __init__(self, broker: SQLiteBroker, queues: Sequence[str], prefetch: int,
                 no_ack: bool) -> None:
        self.broker = broker
        self.queues = list(dict.fromkeys(queues))
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.owner = uuid.uuid4().hex
        self.conn = broker._new_connection()
        self.io_lock = threading.Lock()  # the consumer connection
        self.ops_lock = threading.Lock()  # held / pending op lists
        self.held: set[int] = set()
        self.acks: list[int] = []
        self.requeues: list[int] = []
        self.dead: list[int] = []
        self.wake = threading.Event()
        self.closed = False
        self.last_version: int | None = None
        self.next_due = 0.0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        if not no_ack:
            self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                             name=f"celeriac-sqlite-lease-{self.owner[:8]}")
            self._renewer.start()

    # -- any thread -------------------------------------------------------------------------

    def ack(self, delivery: Delivery) -> None:
        """Queue an ack of ``delivery``; it is deleted at the next flush. Thread-safe."""
        if self.no_ack:
            return
        with self.ops_lock:
            if delivery.tag in self.held:
                self.held.discard(delivery.tag)
                self.acks.append(delivery.tag)
        self.wake.set()

    def reject(self, delivery: Delivery, requeue: bool = False) -> None:
        """Queue a reject: back to the queue with ``requeue``, else to the dead-letter table."""
        if self.no_ack:
            return
        with self.ops_lock:
            if delivery.tag in self.held:
                self.held.discard(delivery.tag)
                (self.requeues if requeue else self.dead).append(delivery.tag)
        self.wake.set()

    def flush(self) -> None:
        """Apply queued acks and rejects in one transaction; free when there are none."""
        if not (self.acks or self.requeues or self.dead):
            return
        with self.io_lock:
            self._flush_locked()

    def close(self) -> None:
        """Flush pending acks, then make every delivery still held ready again. Idempotent."""
        with self.io_lock:
            if self.closed:
                return
            self.closed = True
            self._stop.set()
            self.wake.set()
            with self.ops_lock:
                self.requeues.extend(self.held)
                self.held.clear()
            try:
                self._flush_locked()
            finally:
                self.conn.close()
                self.broker._forget_consumer(self)

    # -- the fetching thread ----------------------------------------------------------------

    def _take_ops(self) -> tuple[list[int], list[int], list[int]]:
        with self.ops_lock:
            ops = (self.acks, self.requeues, self.dead)
            self.acks, self.requeues, self.dead = [], [], []
        return ops

    def _restore_ops(self, ops: tuple[list[int], list[int], list[int]]) -> None:
        with self.ops_lock:  # keep them for the next flush
            self.acks[:0] = ops[0]
            self.requeues[:0] = ops[1]
            self.dead[:0] = ops[2]

    def _apply_ops(self, conn: sqlite3.Connection,
                   ops: tuple[list[int], list[int], list[int]]) -> None:
        """Apply acks, requeues and dead-letterings inside the caller's transaction."""
        acks, requeues, dead = ops
        for marks, part in _chunks(acks):
            conn.execute(f"DELETE FROM celeriac_messages WHERE id IN ({marks})", part)
        for marks, part in _chunks(requeues):
            conn.execute(
                "UPDATE celeriac_messages SET ready = 1, owner = NULL, visible_at = 0 "
                f"WHERE id IN ({marks}) AND owner = ?", (*part, self.owner))
        if dead:
            self.broker._dead_letter(conn, dead, "rejected")
        if requeues:
            self.last_version = None  # our own commit does not move data_version

    def _flush_locked(self) -> None:
        ops = self._take_ops()
        if not (ops[0] or ops[1] or ops[2]):
            return
        try:
            with _Tx(self.conn, self.broker.busy_timeout, self.broker.write_lock) as conn:
                self._apply_ops(conn, ops)
        except sqlite3.Error:
            self._restore_ops(ops)
            raise

    def _room(self, max_count: int) -> int:
        if self.prefetch > 0 and not self.no_ack:
            return min(max_count, self.prefetch - len(self.held))
        return max_count

    def _may_have_work(self) -> bool:
        """Cheap check before claiming: skip the query when nothing changed since last time."""
        conn = self.conn
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        now = time.time()
        if version == self.last_version and now < self.next_due:
            return False
        self.last_version = version
        due = conn.execute(
            "SELECT MIN(visible_at) FROM celeriac_messages WHERE ready = 0").fetchone()[0]
        self.next_due = float(due) if due is not None else float("inf")
        if self.next_due <= now:
            return True
        marks = ",".join("?" * len(self.queues))
        row = conn.execute(
            f"SELECT 1 FROM celeriac_messages WHERE ready = 1 AND queue IN ({marks}) LIMIT 1",
            self.queues).fetchone()
        return row is not None

    def _claim(self, count: int) -> list[Delivery]:
        """Apply queued acks and claim up to ``count`` rows, in one transaction."""
        ops = self._take_ops()
        try:
            return self._claim_tx(count, ops)
        except sqlite3.Error:
            self._restore_ops(ops)
            raise

    def _claim_tx(self, count: int, ops: tuple[list[int], list[int], list[int]]) -> list[Delivery]:
        conn = self.conn
        with _Tx(conn, self.broker.busy_timeout, self.broker.write_lock):
            self._apply_ops(conn, ops)
            now = time.time()
            lease = now + self.broker.visibility_timeout
            conn.execute("UPDATE celeriac_messages SET ready = 1, owner = NULL "
                         "WHERE ready = 0 AND visible_at <= ?", (now,))
            if len(self.queues) == 1:
                ids = [r[0] for r in conn.execute(
                    "SELECT id FROM celeriac_messages WHERE ready = 1 AND queue = ? "
                    "ORDER BY priority DESC, id LIMIT ?", (self.queues[0], count))]
            else:
                found: list[tuple[int, int]] = []
                for name in self.queues:
                    found.extend(conn.execute(
                        "SELECT -priority, id FROM celeriac_messages WHERE ready = 1 "
                        "AND queue = ? ORDER BY priority DESC, id LIMIT ?", (name, count)))
                found.sort()
                ids = [row[1] for row in found[:count]]
            if not ids:
                return []
            rows: list[Any] = []
            for marks, part in _chunks(ids):
                if self.no_ack:
                    rows.extend(self._take_rows(conn, marks, part))
                else:
                    if _RETURNING:
                        rows.extend(conn.execute(
                            "UPDATE celeriac_messages SET ready = 0, owner = ?, visible_at = ?, "
                            f"deliveries = deliveries + 1 WHERE id IN ({marks}) "
                            f"RETURNING {_COLUMNS}", (self.owner, lease, *part)))
                    else:
                        conn.execute(
                            "UPDATE celeriac_messages SET ready = 0, owner = ?, visible_at = ?, "
                            f"deliveries = deliveries + 1 WHERE id IN ({marks})",
                            (self.owner, lease, *part))
                        rows.extend(conn.execute(
                            f"SELECT {_COLUMNS} FROM celeriac_messages WHERE id IN ({marks})",
                            part))
            rows.sort(key=lambda r: (-r[2], r[0]))
            out, bad = self._deliveries(rows)
            if bad:
                self.broker._dead_letter(conn, bad, "undecodable")
        if not self.no_ack:
            with self.ops_lock:
                self.held.update(d.tag for d in out)
        self.last_version = None
        return out

    def _take_rows(self, conn: sqlite3.Connection, marks: str, part: Sequence[int]) -> list[Any]:
        if _RETURNING:
            return list(conn.execute(
                f"DELETE FROM celeriac_messages WHERE id IN ({marks}) RETURNING {_COLUMNS}", part))
        rows = list(conn.execute(
            f"SELECT {_COLUMNS} FROM celeriac_messages WHERE id IN ({marks})", part))
        conn.execute(f"DELETE FROM celeriac_messages WHERE id IN ({marks})", part)
        return [(*r[:3], r[3] + 1, *r[4:]) for r in rows]

    def _deliveries(self, rows: Iterable[Any]) -> tuple[list[Delivery], list[int]]:
        out: list[Delivery] = []
        bad: list[int] = []
        for (row_id, queue, _prio, deliveries, exchange, routing_key, headers, properties,
             content_type, content_encoding, body) in rows:
            try:
                message = Message(json_loads(headers), json_loads(properties), bytes(body),
                                  content_type, content_encoding)
            except (ValueError, TypeError):
                logger.error("Moving undecodable message %s of queue %r to the dead letters.",
                             row_id, queue)
                bad.append(row_id)
                continue
            out.append(Delivery(message, queue, row_id, exchange, routing_key, deliveries > 1))
        return out, bad

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Claim up to ``max_count`` deliveries, polling (1 ms .. 20 ms backoff) up to ``timeout``.

        Queued acks and rejects are flushed first. Raises ``BrokerConnectionError`` on a
        database error that is not a busy lock.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        delay = 0.001
        with self.io_lock:
            while not self.closed:
                self.wake.clear()
                try:
                    if self.requeues or self.dead:
                        self._flush_locked()  # first, so the check below sees requeued rows
                    room = self._room(max_count)
                    if room > 0 and self._may_have_work():
                        out = self._claim(room)  # also applies the queued acks
                        if out:
                            return out
                    else:
                        self._flush_locked()
                except sqlite3.Error as exc:
                    if not is_busy(exc):
                        raise BrokerConnectionError(f"SQLite broker error: {exc}") from exc
                    self.last_version = None
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.io_lock.release()
                try:
                    self.wake.wait(min(delay, left))
                finally:
                    self.io_lock.acquire()
                delay = min(delay * 2, self.broker.poll_interval)
        return []

    # -- lease renewal ----------------------------------------------------------------------

    def _renew_loop(self) -> None:
        interval = max(0.05, self.broker.visibility_timeout / 3)
        conn: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(interval):
                with self.ops_lock:
                    held = sorted(self.held)
                if held:
                    try:
                        conn = conn or self.broker._new_connection()
                        self._renew(conn, held)
                    except (sqlite3.Error, BrokerConnectionError) as exc:  # next tick retries
                        logger.warning("Could not renew SQLite broker leases: %s", exc)
        finally:
            if conn is not None:
                conn.close()

    def _renew(self, conn: sqlite3.Connection, held: Sequence[int]) -> None:
        """Push the lease of the rows this consumer still holds to now + visibility_timeout."""
        lease = time.time() + self.broker.visibility_timeout
        with _Tx(conn, self.broker.busy_timeout, self.broker.write_lock):
            for marks, part in _chunks(held):
                conn.execute("UPDATE celeriac_messages SET visible_at = ? "
                             f"WHERE id IN ({marks}) AND owner = ? AND ready = 0",
                             (lease, *part, self.owner))


# -- broadcast subscription -------------------------------------------------------------------


class _SQLiteSubscription(Subscription):
    """Reads broadcast rows newer than the last one seen, on its own connection."""

    def __init__(self, broker: SQLiteBroker, exchange: str, pattern: str) -> None:
        self.broker = broker
        self.exchange = exchange
        self.pattern = pattern
        self.conn = broker._new_connection()
        self.lock = threading.Lock()
        row = retry_busy(lambda: self.conn.execute(
            "SELECT COALESCE(MAX(id), 0) FROM celeriac_broadcasts").fetchone(), broker.busy_timeout)
        self.last_id: int = row[0]
        self.last_version: int | None = None
        self.closed = False

    def fetch(self, timeout: float) -> list[Message]:
        """Return the new broadcasts that match, polling up to ``timeout`` for the first."""
        deadline = time.monotonic() + max(0.0, timeout)
        delay = 0.001
        with self.lock:
            while not self.closed:
                try:
                    version = self.conn.execute("PRAGMA data_version").fetchone()[0]
                    if version != self.last_version:
                        self.last_version = version
                        out = self._read()
                        if out:
                            return out
                except sqlite3.Error as exc:
                    if not is_busy(exc):
                        raise BrokerConnectionError(f"SQLite broker error: {exc}") from exc
                    self.last_version = None
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(delay, left))
                delay = min(delay * 2, self.broker.poll_interval)
        return []

    def _read(self) -> list[Message]:
        rows = self.conn.execute(
            "SELECT id, routing_key, headers, properties, content_type, content_encoding, body "
            "FROM celeriac_broadcasts WHERE exchange = ? AND id > ? ORDER BY id",
            (self.exchange, self.last_id)).fetchall()
        out: list[Message] = []
        for row_id, key, headers, properties, ctype, cenc, body in rows:
            self.last_id = row_id
            if not topic_matches(self.pattern, key):
                continue
            try:
                out.append(Message(json_loads(headers), json_loads(properties), bytes(body),
                                   ctype, cenc))
            except (ValueError, TypeError):
                logger.error("Skipping undecodable broadcast %s on %r.", row_id, self.exchange)
        return out

    def close(self) -> None:
        """Stop receiving. Idempotent."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self.conn.close()
        self.broker._subscriptions.discard(self)


# -- the broker -------------------------------------------------------------------------------

_LOCAL_CONSUMERS: dict[str, set[_SQLiteConsumer]] = {}
_LOCAL_LOCK = threading.Lock()


class SQLiteBroker(Broker):
    """The embedded broker: a WAL-mode SQLite file shared by the processes of one machine.

    Transport options (``broker_transport_options``): ``visibility_timeout`` (s, default 3600),
    ``busy_timeout`` (s, default 30), ``polling_interval`` (longest poll sleep, default 0.02).
    A closed broker reopens its connections if it is used again.
    Every method is thread-safe.
    """

    capabilities = frozenset({DELAY, PRIORITY, QUEUE_SIZE, BROADCAST, REPLY_QUEUES, BATCH})
    description = "embedded SQLite"
    default_file = "celeriac-broker.db"

    def __init__(self, url: str, conf: Mapping[str, Any]) -> None:
        super().__init__(url, conf)
        options = conf.get("broker_transport_options") or {}
        self.visibility_timeout = float(options.get("visibility_timeout", 3600))
        self.busy_timeout = float(options.get("busy_timeout", 30))
        self.poll_interval = min(float(options.get("polling_interval", _MAX_POLL)), 1.0)
        self.path = sqlite_path(url, self.default_file)
        self._local = threading.local()
        self._conn_lock = threading.Lock()
        self._ready = False
        self._declared: dict[str, Queue] = {}
        self._bindings: dict[str, tuple[float, list[Binding]]] = {}
        self._consumers: set[_SQLiteConsumer] = set()
        self._subscriptions: set[_SQLiteSubscription] = set()
        self._last_prune = 0.0

    # -- connections ------------------------------------------------------------------------

    @property
    def write_lock(self) -> threading.Lock:
        """This process's write lock of the database file (see :func:`write_lock`)."""
        return write_lock(self.path)

    def _new_connection(self) -> sqlite3.Connection:
        conn = connect(self.path, self.busy_timeout, native_busy=False)
        if not self._ready:
            self._create_schema(conn)
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        try:
            with _Tx(conn, self.busy_timeout, self.write_lock):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        except sqlite3.Error as exc:
            raise BrokerConnectionError(f"Cannot create the broker tables in {self.path!r}: {exc}"
                                        ) from exc
        self._ready = True

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork)."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._new_connection()
            local.conn, local.pid = conn, os.getpid()
        return conn

    def connect(self) -> None:
        """Open the database and create the tables now."""
        self._conn()

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run one autocommit statement on this thread's connection, retrying a busy lock."""
        conn = self._conn()
        return retry_busy(lambda: conn.execute(sql, args), self.busy_timeout)

    def _write(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """:meth:`_execute` for a statement that writes, under the in-process write lock."""
        conn = self._conn()
        with self.write_lock:
            return retry_busy(lambda: conn.execute(sql, args), self.busy_timeout)

    def _forget_consumer(self, consumer: _SQLiteConsumer) -> None:
        self._consumers.discard(consumer)
        with _LOCAL_LOCK:
            local = _LOCAL_CONSUMERS.get(self.path)
            if local is not None:
                local.discard(consumer)

    # -- declarations and routing -----------------------------------------------------------

    def declare(self, queue: Queue) -> None:
        """Record ``queue`` and its binding in the database; cached per broker object."""
        if self._declared.get(queue.name) == queue:
            return
        conn = self._conn()
        now = time.time()
        assert queue.exchange is not None
        try:
            with _Tx(conn, self.busy_timeout, self.write_lock):
                conn.execute(
                    "INSERT OR REPLACE INTO celeriac_queues (name, durable, max_priority, "
                    "declared_at) VALUES (?, ?, ?, ?)",
                    (queue.name, int(queue.durable), queue.max_priority, now))
                if queue.exchange.name:
                    conn.execute(
                        "INSERT OR REPLACE INTO celeriac_bindings (exchange, exchange_type, "
                        "routing_key, queue) VALUES (?, ?, ?, ?)",
                        (queue.exchange.name, queue.exchange.type, queue.binding_key, queue.name))
        except sqlite3.Error as exc:
            raise BrokerConnectionError(f"Cannot declare queue {queue.name!r}: {exc}") from exc
        self._declared[queue.name] = queue
        if queue.exchange.name:
            self._bindings.pop(queue.exchange.name, None)

    def _targets(self, exchange: str, routing_key: str, queue: Queue | None) -> list[str]:
        if not exchange:
            return [routing_key]
        cached = self._bindings.get(exchange)
        now = time.monotonic()
        fresh = cached is None or now - cached[0] > 1.0
        if fresh:
            cached = self._read_bindings(exchange, now)
        assert cached is not None
        targets = route(cached[1], routing_key)
        if not targets and not fresh:
            # Another process may have bound a queue since we cached (a remote-control client's
            # reply queue): a miss re-reads the bindings before the message is dropped.
            targets = route(self._read_bindings(exchange, now)[1], routing_key)
        if not targets and queue is not None:
            targets = [queue.name]
        return targets

    def _read_bindings(self, exchange: str, now: float) -> tuple[float, list[Binding]]:
        rows = self._execute(
            "SELECT exchange, exchange_type, routing_key, queue FROM celeriac_bindings "
            "WHERE exchange = ?", (exchange,)).fetchall()
        cached = (now, [Binding(*row) for row in rows])
        self._bindings[exchange] = cached
        return cached

    # -- publishing -------------------------------------------------------------------------

    def publish(self, message: Message, exchange: str, routing_key: str, *,
                queue: Queue | None = None, not_before: float | None = None) -> None:
        """Insert ``message`` for each queue it routes to (one autocommit statement each).

        An exchange with no matching binding drops the message unless ``queue`` is given.
        Raises ``BrokerConnectionError`` when the database cannot be written. Thread-safe.
        """
        if queue is not None and queue.name not in self._declared:
            self.declare(queue)
        now = time.time()
        delayed = not_before is not None and not_before > now
        visible_at = not_before if delayed else 0.0
        try:
            targets = self._targets(exchange, routing_key, queue)
            headers = _dumps(message.headers)
            properties = _dumps(message.properties)
            for name in targets:
                decl = self._declared.get(name)
                self._write(
                    "INSERT INTO celeriac_messages (queue, priority, ready, visible_at, exchange, "
                    "routing_key, headers, properties, content_type, content_encoding, body, "
                    "published_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, message_priority(message, decl.max_priority if decl else None),
                     0 if delayed else 1, visible_at, exchange, routing_key, headers, properties,
                     message.content_type, message.content_encoding, message.body, now))
        except sqlite3.Error as exc:
            raise BrokerConnectionError(f"Could not publish to {self.path!r}: {exc}") from exc
        if not delayed:
            self._wake_local()

    def _wake_local(self) -> None:
        consumers = _LOCAL_CONSUMERS.get(self.path)
        if consumers:
            for consumer in list(consumers):
                consumer.wake.set()

    def _dead_letter(self, conn: sqlite3.Connection, ids: Sequence[int], reason: str) -> None:
        """Move rows ``ids`` to the dead-letter table inside the caller's transaction."""
        now = time.time()
        for marks, part in _chunks(ids):
            conn.execute(
                "INSERT OR REPLACE INTO celeriac_dead_letters (id, queue, priority, deliveries, "
                "exchange, routing_key, headers, properties, content_type, content_encoding, body,"
                " published_at, rejected_at, reason) SELECT id, queue, priority, deliveries, "
                "exchange, routing_key, headers, properties, content_type, content_encoding, body,"
                f" published_at, ?, ? FROM celeriac_messages WHERE id IN ({marks})",
                (now, reason, *part))
            conn.execute(f"DELETE FROM celeriac_messages WHERE id IN ({marks})", part)

    # -- consuming --------------------------------------------------------------------------

    def consumer(self, queues: Sequence[Queue], prefetch: int, *, no_ack: bool = False) -> Consumer:
        """Consume ``queues`` (declared here) on a dedicated connection."""
        for queue in queues:
            self.declare(queue)
        consumer = _SQLiteConsumer(self, [q.name for q in queues], prefetch, no_ack)
        self._consumers.add(consumer)
        with _LOCAL_LOCK:
            _LOCAL_CONSUMERS.setdefault(self.path, set()).add(consumer)
        return consumer

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed (not leased) messages of ``queue``; return how many."""
        cur = self._write(
            "DELETE FROM celeriac_messages WHERE queue = ? AND (ready = 1 OR owner IS NULL)",
            (queue,))
        return cur.rowcount

    def scheduled(self, queues: Sequence[str], limit: int = 1000) -> list[tuple[float, Message]]:
        """The delayed messages of ``queues`` not due yet, soonest first (see :meth:`Broker.scheduled`)."""
        if not queues:
            return []
        marks = ",".join("?" * len(queues))
        rows = self._execute(
            "SELECT visible_at, headers, properties, body, content_type, content_encoding FROM "
            f"celeriac_messages WHERE ready = 0 AND owner IS NULL AND visible_at > ? AND queue IN ({marks}) "
            "ORDER BY visible_at LIMIT ?", (time.time(), *queues, limit)).fetchall()
        out: list[tuple[float, Message]] = []
        for when, headers, properties, body, content_type, content_encoding in rows:
            try:
                out.append((float(when), Message(json_loads(headers), json_loads(properties), bytes(body),
                                                 content_type, content_encoding)))
            except (ValueError, TypeError):
                continue
        return out

    def queue_size(self, queue: str) -> int | None:
        """Number of messages of ``queue`` deliverable now (delayed and leased ones excluded)."""
        ready = self._execute("SELECT COUNT(*) FROM celeriac_messages WHERE queue = ? AND "
                              "ready = 1", (queue,)).fetchone()[0]
        due = self._execute("SELECT COUNT(*) FROM celeriac_messages WHERE ready = 0 AND "
                            "visible_at <= ? AND queue = ?", (time.time(), queue)).fetchone()[0]
        return int(ready) + int(due)

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue``, all its messages (leased ones too) and its bindings."""
        conn = self._conn()
        with _Tx(conn, self.busy_timeout, self.write_lock):
            conn.execute("DELETE FROM celeriac_messages WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM celeriac_queues WHERE name = ?", (queue,))
            conn.execute("DELETE FROM celeriac_bindings WHERE queue = ?", (queue,))
        self._declared.pop(queue, None)
        self._bindings.clear()

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """The dead-lettered rows (of ``queue`` when given), oldest first."""
        sql = ("SELECT id, queue, reason, rejected_at, headers, properties, content_type, "
               "content_encoding, body FROM celeriac_dead_letters")
        args: tuple[Any, ...] = ()
        if queue is not None:
            sql += " WHERE queue = ?"
            args = (queue,)
        rows = self._execute(sql + " ORDER BY rejected_at, id", args).fetchall()
        return [DeadLetter(int(r[0]), str(r[1]), str(r[2]), float(r[3]), str(r[4]), str(r[5]),
                           str(r[6]), str(r[7]), bytes(r[8])) for r in rows]

    # -- broadcast --------------------------------------------------------------------------

    def broadcast(self, exchange: str, message: Message, routing_key: str = "") -> None:
        """Store ``message`` for every subscriber of ``exchange``; prunes rows older than 60 s."""
        now = time.time()
        try:
            self._write(
                "INSERT INTO celeriac_broadcasts (exchange, routing_key, created, headers, "
                "properties, content_type, content_encoding, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (exchange, routing_key, now, _dumps(message.headers), _dumps(message.properties),
                 message.content_type, message.content_encoding, message.body))
            if now - self._last_prune > 10.0:
                self._last_prune = now
                self._write("DELETE FROM celeriac_broadcasts WHERE created < ?",
                              (now - _BROADCAST_TTL,))
        except sqlite3.Error as exc:
            raise BrokerConnectionError(f"Could not broadcast on {self.path!r}: {exc}") from exc

    def subscribe(self, exchange: str, pattern: str = "#") -> Subscription:
        """Receive broadcasts on ``exchange`` from now on whose routing key matches ``pattern``."""
        sub = _SQLiteSubscription(self, exchange, pattern)
        self._subscriptions.add(sub)
        return sub

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close consumers (requeueing what they hold), subscriptions and connections."""
        for consumer in list(self._consumers):
            try:
                consumer.close()
            except sqlite3.Error as exc:
                logger.warning("Closing an SQLite consumer failed: %s", exc)
        for sub in list(self._subscriptions):
            sub.close()
        # Only this thread's connection is closed here: closing one another thread may be using
        # can crash the interpreter. The others close when their threads drop them.
        own: sqlite3.Connection | None = getattr(self._local, "conn", None)
        self._local = threading.local()
        if own is not None:
            try:
                own.close()
            except sqlite3.Error:
                pass
