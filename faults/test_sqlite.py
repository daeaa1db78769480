"""The embedded SQLite broker: a full disk, the database locked by another process, a worker
killed mid-transaction. Each: no corrupt database (PRAGMA integrity_check), no lost message, a
clear error where one is due."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import FULL, Target, assert_calm, flow_for, size, target_conf, unique


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def sqlite_target(db: Path, **options: float) -> Target:
    conf = target_conf("sqlite", unique())
    conf["broker_transport_options"] = {**conf["broker_transport_options"], **options}
    return Target("sqlite", f"sqlite:///{db}", None, conf)


def test_disk_full(tmp_path: Path) -> None:
    """A 1 MiB tmpfs holds the database: publishing fails with a clear error once it is full,
    nothing accepted is lost, and once space is back (remount) the worker runs everything."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): no disk-full scenario")
    try:
        db = disk / "broker.db"
        target = sqlite_target(db)
        with flow_for(tmp_path, target, "disk-full") as flow:
            cap = 20000
            while len(flow.sent) + len(flow.refused) < cap and not flow.refused:
                flow.send(50)
            assert flow.refused, "the disk never filled up"
            error = flow.refused[0]
            assert "full" in error.lower(), error
            assert "Traceback" not in error and "\n" not in error.strip(), error
            flow.extra["error"] = error
            flow.extra["integrity_when_full"] = integrity(db)
            w = flow.worker("w1", ready=False)  # starts on a full disk: it retries, saying why
            time.sleep(5)
            flow.extra["completed_while_full"] = len(flow.completed())
            flow.extra["worker_said_while_full"] = [ln[ln.find("]") + 2:][:200] for ln in w.log().splitlines()
                                                    if "ERROR" in ln or "CRITICAL" in ln][:2]
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            freed = time.time()
            w.wait_ready()
            flow.drain(size(120, 300))
            figures = flow.finish(flow.first_done_after(freed), tmpfs="1 MiB tmpfs, remounted 64 MiB")
            assert w.log().count("Traceback (most recent call last)") == 0, w.log()[-3000:]
            final = integrity(db)
        assert figures["integrity_when_full"] == "ok" and final == "ok"
        assert figures["lost"] == 0, figures
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def test_database_locked_by_another_process(tmp_path: Path) -> None:
    """Another process holds the write lock longer than busy_timeout (3 s): a delay() meanwhile
    waits or fails with a clear error; the worker waits and goes on; nothing is lost."""
    db = tmp_path / "broker.db"
    hold = 15.0 if FULL else 6.0
    target = sqlite_target(db, busy_timeout=3)
    with flow_for(tmp_path, target, "db-locked") as flow:
        flow.worker("w1")
        sender = flow.send_in_thread(size(600, 3000), size(50, 100))
        time.sleep(2)
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(hold)],
                                  stdout=subprocess.PIPE, text=True)
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        locker.wait(hold + 30)
        released = time.time()
        sender.join()
        flow.drain(size(120, 300))
        figures = flow.finish(flow.first_done_after(released), lock_held_s=hold, busy_timeout_s=3)
        assert_calm(flow, events=1, per_event=8)
    assert integrity(db) == "ok"
    assert figures["lost"] == 0, figures
    for error in figures["refused_errors"]:
        assert "lock" in error.lower() and "\n" not in error.strip(), error


def test_worker_killed_mid_transaction(tmp_path: Path) -> None:
    """SIGKILL the worker at random moments of a busy flow (claims, acks, lease renewals in
    progress), restart it each time: the database stays sound and every task runs."""
    db = tmp_path / "broker.db"
    target = sqlite_target(db)
    kills = size(4, 20)
    rng = random.Random(15)
    with flow_for(tmp_path, target, "worker-killed-mid-transaction") as flow:
        flow.worker("w1")
        sender = flow.send_in_thread(size(3000, 20000), size(400, 500))
        last = 0.0
        for i in range(kills):
            time.sleep(rng.uniform(0.5, 2.0))
            flow.workers[-1].kill()
            last = flow.note("kill")
            flow.worker(f"w{i + 2}")
        sender.join()
        flow.drain(size(120, 600))
        figures = flow.finish(flow.first_done_after(last), kills=kills)
    assert integrity(db) == "ok"
    assert figures["lost"] == 0, figures
