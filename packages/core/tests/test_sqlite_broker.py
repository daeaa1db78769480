"""SQLite broker and backend behaviour beyond the conformance kits: several processes on one
file, lease expiry after a SIGKILL, ETAs, dead letters, expiry of results."""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celeriac import states
from celeriac.backends.base import make_meta
from celeriac.backends.memory import MemoryBackend
from celeriac.backends.sqlite import SQLiteBackend
from celeriac.broker.sqlite import SQLiteBroker, sqlite_path
from celeriac.protocol import Message
from celeriac.routing import Queue
from celeriac.testing.broker_kit import make_message

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"child printed nothing within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"child exited: {proc.stderr.read() if proc.stderr else ''}")
    return line.strip()


def _drain(consumer: object, count: int, timeout: float) -> list:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    out: list = []  # type: ignore[type-arg]
    while len(out) < count and time.monotonic() < deadline:
        out.extend(consumer.fetch(100, 0.2))  # type: ignore[attr-defined]
    return out


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture
def broker(url: str) -> Iterator[SQLiteBroker]:
    b = SQLiteBroker(url, {"broker_transport_options": {"visibility_timeout": 2}})
    yield b
    b.close()


def _rows(path: str, table: str = "celeriac_messages") -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///rel/b.db", "d.db") == str(tmp_path / "rel" / "b.db")
    assert sqlite_path("sqlite:////abs/b.db", "d.db") == "/abs/b.db"
    assert sqlite_path("sqlite://", "d.db") == str(tmp_path / "d.db")
    b = SQLiteBroker("sqlite:///celeriac-broker.db", {})
    try:
        b.connect()
        assert (tmp_path / "celeriac-broker.db").exists()
    finally:
        b.close()


PRODUCER = """
import sys
from celeriac.broker.sqlite import SQLiteBroker
from celeriac.routing import Queue
from celeriac.testing.broker_kit import make_message
b = SQLiteBroker(sys.argv[1], {})
q = Queue(sys.argv[2])
for i in range(int(sys.argv[3])):
    b.publish(make_message(f"p{i}"), "", q.name, queue=q)
b.close()
print("DONE", flush=True)
"""

CONSUMER = """
import json, os, sys, time
from celeriac.broker.sqlite import SQLiteBroker
from celeriac.routing import Queue
b = SQLiteBroker(sys.argv[1], {})
c = b.consumer([Queue(sys.argv[2])], 10)
print("READY", flush=True)
seen = []
while True:
    batch = c.fetch(10, 0.2)
    for d in batch:
        seen.append(d.message.headers["kit"])
        time.sleep(0.003)  # a little work, so the other process gets its share
        c.ack(d)
    if not batch and os.path.exists(sys.argv[3]):
        break
c.close()
b.close()
print(json.dumps(seen), flush=True)
"""


def test_processes_share_one_database(broker: SQLiteBroker, url: str, tmp_path: Path) -> None:
    queue = Queue(f"q-{uuid.uuid4().hex}")
    broker.declare(queue)
    stop = tmp_path / "stop"
    consumers = [_child(CONSUMER, url, queue.name, str(stop)) for _ in range(2)]
    try:
        for proc in consumers:
            assert _read_line(proc, 30) == "READY"
        producer = _child(PRODUCER, url, queue.name, "300")
        assert _read_line(producer, 60) == "DONE"
        producer.wait(10)
        deadline = time.monotonic() + 30
        while _rows(broker.path) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.touch()
        seen: list[str] = []
        counts = []
        for proc in consumers:
            got = json.loads(_read_line(proc, 30))
            counts.append(len(got))
            seen.extend(got)
            proc.wait(10)
    finally:
        stop.touch()
        for proc in consumers:
            if proc.poll() is None:
                proc.kill()
    assert sorted(seen) == sorted(f"p{i}" for i in range(300)), "each message exactly once"
    assert all(counts), f"both processes should have consumed: {counts}"
    assert _rows(broker.path) == 0, "acks must be durable when close() returns"


HOLDER = """
import sys, time
from celeriac.broker.sqlite import SQLiteBroker
from celeriac.routing import Queue
b = SQLiteBroker(sys.argv[1], {"broker_transport_options": {"visibility_timeout": 2}})
c = b.consumer([Queue(sys.argv[2])], 1)
got = []
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    got = c.fetch(1, 0.5)
print("GOT", got[0].message.headers["kit"], flush=True)
time.sleep(600)
"""


def test_lease_expiry_redelivers_after_sigkill(broker: SQLiteBroker, url: str) -> None:
    queue = Queue(f"q-{uuid.uuid4().hex}")
    broker.publish(make_message("late-ack"), "", queue.name, queue=queue)
    holder = _child(HOLDER, url, queue.name)
    try:
        assert _read_line(holder, 30) == "GOT late-ack"
        consumer = broker.consumer([queue], 1)
        # The holder is alive and renews its lease (every visibility_timeout / 3): a task that
        # runs longer than the visibility timeout is not handed to anyone else.
        assert _drain(consumer, 1, 3.5) == []
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        got = _drain(consumer, 1, 15)
        assert [d.message.headers["kit"] for d in got] == ["late-ack"]
        assert got[0].redelivered
        consumer.ack(got[0])
        consumer.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert _rows(broker.path) == 0


def test_etas_are_kept_in_order_and_never_early(broker: SQLiteBroker) -> None:
    queue = Queue(f"q-{uuid.uuid4().hex}")
    now = time.time()
    etas = {"b": now + 0.6, "a": now + 0.3, "c": now + 0.9}
    for tag, eta in etas.items():
        broker.publish(make_message(tag), "", queue.name, queue=queue, not_before=eta)
    assert broker.queue_size(queue.name) == 0
    consumer = broker.consumer([queue], 0)
    order: list[str] = []
    deadline = time.monotonic() + 10
    while len(order) < 3 and time.monotonic() < deadline:
        for delivery in consumer.fetch(10, 0.1):
            tag = delivery.message.headers["kit"]
            assert time.time() >= etas[tag], f"{tag} delivered before its ETA"
            order.append(tag)
            consumer.ack(delivery)
    assert order == ["a", "b", "c"]
    consumer.close()


def test_reject_moves_to_dead_letters_and_bad_rows_do_not_stop_the_consumer(
        broker: SQLiteBroker) -> None:
    queue = Queue(f"q-{uuid.uuid4().hex}")
    broker.publish(make_message("bad-task"), "", queue.name, queue=queue)
    consumer = broker.consumer([queue], 10)
    got = _drain(consumer, 1, 5)
    consumer.reject(got[0], requeue=False)
    consumer.flush()
    dead = broker.dead_letters(queue.name)
    assert [(d.message().headers["kit"], d.reason) for d in dead] == [("bad-task", "rejected")]
    assert dead[0].message().body == got[0].message.body
    # A row whose headers are not JSON (written by something else) is set aside, not fatal.
    conn = sqlite3.connect(broker.path)
    conn.execute(
        "INSERT INTO celeriac_messages (queue, priority, ready, visible_at, exchange, routing_key,"
        " headers, properties, content_type, content_encoding, body, published_at) "
        "VALUES (?, 0, 1, 0, '', ?, '{not json', '{}', 'application/json', 'utf-8', x'00', 0)",
        (queue.name, queue.name))
    conn.commit()
    conn.close()
    broker.publish(make_message("good"), "", queue.name, queue=queue)
    got = _drain(consumer, 1, 5)
    assert [d.message.headers["kit"] for d in got] == ["good"]
    consumer.ack(got[0])
    consumer.close()
    dead = broker.dead_letters(queue.name)
    assert [d.reason for d in dead] == ["rejected", "undecodable"]
    assert dead[1].headers == "{not json"
    with pytest.raises(ValueError):
        dead[1].message()


def test_requeue_marks_redelivered_and_keeps_position(broker: SQLiteBroker) -> None:
    queue = Queue(f"q-{uuid.uuid4().hex}")
    for tag in ("first", "second"):
        broker.publish(make_message(tag), "", queue.name, queue=queue)
    consumer = broker.consumer([queue], 1)
    got = _drain(consumer, 1, 5)
    assert not got[0].redelivered
    consumer.reject(got[0], requeue=True)
    again = _drain(consumer, 1, 5)
    assert [d.message.headers["kit"] for d in again] == ["first"]
    assert again[0].redelivered
    consumer.ack(again[0])
    consumer.close()


def test_broadcast_between_processes(broker: SQLiteBroker, url: str) -> None:
    exchange = f"x-{uuid.uuid4().hex}"
    sub = broker.subscribe(exchange)
    code = """
    import sys
    from celeriac.broker.sqlite import SQLiteBroker
    from celeriac.testing.broker_kit import make_message
    b = SQLiteBroker(sys.argv[1], {})
    b.broadcast(sys.argv[2], make_message("ping"), "worker.ping")
    b.close()
    print("SENT", flush=True)
    """
    proc = _child(code, url, exchange)
    assert _read_line(proc, 30) == "SENT"
    proc.wait(10)
    deadline = time.monotonic() + 10
    got: list[Message] = []
    while not got and time.monotonic() < deadline:
        got = sub.fetch(0.2)
    assert [m.headers["kit"] for m in got] == ["ping"]
    sub.close()


CHORD_MEMBER = """
import sys, json
from celeriac.backends.sqlite import SQLiteBackend
b = SQLiteBackend(sys.argv[1], {})
wins = []
for index in range(int(sys.argv[3]), int(sys.argv[4])):
    found = b.chord_part_return(sys.argv[2], index, f"t{index}", "SUCCESS", index)
    if found is not None:
        wins.append([e[0] for e in found])
b.close()
print(json.dumps(wins), flush=True)
"""


def test_chord_join_across_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    backend = SQLiteBackend(url, {})
    group_id = uuid.uuid4().hex
    backend.set_chord_size(group_id, 100)
    procs = [_child(CHORD_MEMBER, url, group_id, str(k * 25), str(k * 25 + 25)) for k in range(4)]
    wins = []
    for proc in procs:
        wins.extend(json.loads(_read_line(proc, 60)))
        proc.wait(10)
    assert wins == [[f"t{i}" for i in range(100)]]
    backend.close()


def test_chord_member_reported_twice_counts_once(tmp_path: Path) -> None:
    for backend in (SQLiteBackend(f"sqlite:///{tmp_path / 'r.db'}", {}),
                    MemoryBackend(f"memory://{uuid.uuid4().hex}", {})):
        backend.set_chord_size("g", 2)
        assert backend.chord_part_return("g", 0, "t0", states.SUCCESS, 0) is None
        assert backend.chord_part_return("g", 0, "t0", states.SUCCESS, 0) is None
        done = backend.chord_part_return("g", 1, "t1", states.SUCCESS, 1)
        assert done is not None and [e[0] for e in done] == ["t0", "t1"]
        backend.close()


def _steps(backend: SQLiteBackend, call: Callable[[], object]) -> int:
    """SQLite virtual-machine steps (in units of 100) spent by ``call`` on this thread's
    connection: a cost that does not depend on the machine's speed or load."""
    conn = backend._conn()
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        call()
    finally:
        conn.set_progress_handler(None, 100)
    return count[0]


def test_chord_join_cost_does_not_grow_with_the_chord(tmp_path: Path) -> None:
    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'r.db'}", {})
    size = 4000
    backend.set_chord_size("g", size)
    costs = {}
    for index in range(size - 1):
        if index in (50, size - 2):
            costs[index] = _steps(backend, lambda i=index: backend.chord_part_return(
                "g", i, f"t{i}", states.SUCCESS, i))
        else:
            backend.chord_part_return("g", index, f"t{index}", states.SUCCESS, index)
    # Counting the stored parts on every call made the 3,999th member cost ~80x the 51st.
    assert costs[size - 2] <= 2 * costs[50] + 5, costs
    done = backend.chord_part_return("g", size - 1, f"t{size - 1}", states.SUCCESS, size - 1)
    assert done is not None and [e[2] for e in done] == list(range(size))
    backend.close()


def test_chord_size_recorded_after_members_counts_them(tmp_path: Path) -> None:
    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'r.db'}", {})
    assert backend.chord_part_return("g", 0, "t0", states.SUCCESS, 0) is None
    backend.set_chord_size("g", 2)
    done = backend.chord_part_return("g", 1, "t1", states.SUCCESS, 1)
    assert done is not None and [e[0] for e in done] == ["t0", "t1"]
    backend.close()


def test_a_chord_half_joined_by_an_earlier_version_completes(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE celeriac_chords (group_id TEXT PRIMARY KEY, size INTEGER NOT NULL);"
        "CREATE TABLE celeriac_chord_parts (seq INTEGER PRIMARY KEY, group_id TEXT NOT NULL, "
        "task_id TEXT NOT NULL, group_index INTEGER, state TEXT NOT NULL, result BLOB NOT NULL, "
        "UNIQUE (group_id, task_id));"
        "INSERT INTO celeriac_chords VALUES ('g', 3);")
    backend = SQLiteBackend(f"sqlite:///{path}", {})
    for index in (0, 1):
        old.execute("INSERT INTO celeriac_chord_parts (group_id, task_id, group_index, state, result) "
                    "VALUES ('g', ?, ?, 'SUCCESS', ?)", (f"t{index}", index, backend.encode(index)))
    old.commit()
    old.close()
    done = backend.chord_part_return("g", 2, "t2", states.SUCCESS, 2)
    assert done is not None and [(e[0], e[2]) for e in done] == [("t0", 0), ("t1", 1), ("t2", 2)]
    backend.close()


def test_results_expire(tmp_path: Path) -> None:
    for backend in (SQLiteBackend(f"sqlite:///{tmp_path / 'r.db'}", {"result_expires": 0.5}),
                    MemoryBackend(f"memory://{uuid.uuid4().hex}", {"result_expires": 0.5})):
        task_id = uuid.uuid4().hex
        backend.store(task_id, make_meta(task_id, states.SUCCESS, 1))
        assert backend.get(task_id) is not None
        deadline = time.monotonic() + 10
        while backend.get(task_id) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.get(task_id) is None
        # an expired SUCCESS no longer blocks a new write for the same id
        backend.store(task_id, make_meta(task_id, states.FAILURE, ValueError("x")))
        got = backend.get(task_id)
        assert got is not None and got["status"] == states.FAILURE
        backend.close()


def test_forked_child_uses_its_own_connection(broker: SQLiteBroker) -> None:
    queue = Queue(f"q-{uuid.uuid4().hex}")
    broker.publish(make_message("parent"), "", queue.name, queue=queue)  # opens a connection
    lock = broker.write_lock
    lock.acquire()  # as if another thread were mid-write when the pool forks
    try:
        pid = os.fork()
        if pid == 0:  # the child: publish through the inherited broker object
            code = 1
            signal.alarm(20)  # a deadlocked child dies instead of hanging the test
            try:
                broker.publish(make_message("child"), "", queue.name, queue=queue)
                code = 0
            finally:
                os._exit(code)
    finally:
        lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    consumer = broker.consumer([queue], 0)
    got = _drain(consumer, 2, 10)
    assert sorted(d.message.headers["kit"] for d in got) == ["child", "parent"]
    for delivery in got:
        consumer.ack(delivery)
    consumer.close()


def test_a_binding_made_by_another_process_is_seen_at_once(tmp_path: Path) -> None:
    """A publisher's binding cache must not drop a message for a queue bound since it cached:
    a remote-control client binds a fresh reply queue and the worker replies right away."""
    from celeriac.routing import Exchange

    url = f"sqlite:///{tmp_path}/bindings.db"
    publisher, client = SQLiteBroker(url, {}), SQLiteBroker(url, {})
    try:
        exchange = Exchange("reply.celery.pidbox", "direct", durable=False)
        first = Queue("first.reply", exchange, "first")
        client.declare(first)
        publisher.publish(Message({"n": 1}, {}, b"1"), exchange.name, "first")  # caches the bindings
        second = Queue("second.reply", exchange, "second")
        client.declare(second)
        publisher.publish(Message({"n": 2}, {}, b"2"), exchange.name, "second")
        consumer = client.consumer([second], 10, no_ack=True)
        deliveries = consumer.fetch(10, 2.0)
        assert [d.message.body for d in deliveries] == [b"2"]
        consumer.close()
    finally:
        publisher.close()
        client.close()
