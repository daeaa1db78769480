"""The prefork pool under a real worker on the embedded SQLite broker (shared by the children)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celeriac import Celeriac, chain, chord, group
from celeriac.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celeriac.testing.plugin import start_worker


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celeriac]:
    app = Celeriac("pf", broker=f"sqlite:///{tmp_path}/b.db", backend=f"sqlite:///{tmp_path}/r.db",
                   broker_transport_options={"visibility_timeout": 5})

    @app.task(name="pf.pid")
    def pid() -> int:
        return os.getpid()

    @app.task(name="pf.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="pf.xsum")
    def xsum(values: list[int]) -> int:
        return sum(values)

    @app.task(soft_time_limit=0.3, name="pf.soft")
    def soft() -> str:
        try:
            time.sleep(10)
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "not interrupted"

    @app.task(time_limit=0.3, name="pf.hard")
    def hard() -> None:
        time.sleep(10)

    @app.task(name="pf.die")
    def die() -> None:
        os._exit(3)

    @app.task(acks_late=True, reject_on_worker_lost=True, name="pf.die_once")
    def die_once(marker: str) -> str:
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(4)
        return "second try"

    @app.task(bind=True, max_retries=3, default_retry_delay=0.05, name="pf.flaky")
    def flaky(self: Any) -> int:
        if self.request.retries < 2:
            raise self.retry()
        return int(self.request.retries)

    @app.task(name="pf.slow")
    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return "slow done"

    yield app
    app.close()


def _worker(app: Celeriac, **options: Any) -> Any:
    options.setdefault("concurrency", 2)
    return start_worker(app, pool="prefork", **options)


def _stop(worker: Any) -> None:
    worker.stop()
    worker._thread.join(30)


def test_tasks_run_in_child_processes_and_results_come_back(app: Celeriac) -> None:
    worker = _worker(app)
    try:
        pids = {app.tasks["pf.pid"].delay().get(timeout=10) for _ in range(10)}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
        add, xsum = app.tasks["pf.add"], app.tasks["pf.xsum"]
        assert group(add.s(i, i) for i in range(10))().get(timeout=20) == list(range(0, 20, 2))
        assert chain(add.s(4, 4) | add.s(8))().get(timeout=20) == 16
        assert chord((add.s(i, i) for i in range(10)), xsum.s())().get(timeout=20) == 90
        assert app.tasks["pf.flaky"].delay().get(timeout=20) == 2
    finally:
        _stop(worker)


def test_time_limits_and_lost_children(app: Celeriac) -> None:
    worker = _worker(app)
    try:
        assert app.tasks["pf.soft"].delay().get(timeout=10) == "cleaned up"
        with pytest.raises(TimeLimitExceeded):
            app.tasks["pf.hard"].delay().get(timeout=10)
        with pytest.raises(WorkerLostError):
            app.tasks["pf.die"].delay().get(timeout=10)
        # the pool replaced its children and goes on
        assert app.tasks["pf.add"].delay(1, 2).get(timeout=10) == 3
    finally:
        _stop(worker)


def test_reject_on_worker_lost_requeues(app: Celeriac, tmp_path: Path) -> None:
    worker = _worker(app)
    try:
        marker = str(tmp_path / "died-once")
        assert app.tasks["pf.die_once"].delay(marker).get(timeout=30) == "second try"
    finally:
        _stop(worker)


def test_max_tasks_per_child_replaces_children(app: Celeriac) -> None:
    worker = _worker(app, concurrency=1, max_tasks_per_child=2)
    try:
        pids = [app.tasks["pf.pid"].delay().get(timeout=10) for _ in range(6)]
        assert len(set(pids)) == 3
    finally:
        _stop(worker)


def test_warm_shutdown_finishes_running_and_requeues_waiting(app: Celeriac) -> None:
    worker = _worker(app, concurrency=1)
    slow = app.tasks["pf.slow"]
    running = slow.delay(1.0)
    waiting = [slow.delay(0.01) for _ in range(3)]
    deadline = time.monotonic() + 10
    while not (worker.task_consumer.active and worker.task_consumer.reserved >= 2):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    stopper = threading.Thread(target=_stop, args=(worker,))
    stopper.start()
    stopper.join(30)
    assert running.get(timeout=5) == "slow done"
    assert all(r.state == "PENDING" for r in waiting)
    replacement = _worker(app)
    try:
        assert [r.get(timeout=20) for r in waiting] == ["slow done"] * 3
    finally:
        _stop(replacement)


def test_prefork_is_the_default_pool_once_installed() -> None:
    from celeriac.worker.worker import default_pool_name

    assert default_pool_name() == "prefork"


def test_children_exit_when_the_worker_is_killed(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import textwrap

    (tmp_path / "killproj.py").write_text(textwrap.dedent(f"""
        from celeriac import Celeriac
        app = Celeriac("killproj", broker="sqlite:///{tmp_path}/b.db")
    """))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "celeriac", "-A", "killproj", "worker", "-l", "info",
                             "-P", "prefork", "-c", "3"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if " ready." in line:
            break
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert len(children) == 3
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
                 and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert alive == []


def test_inspect_active_lists_the_task_a_child_runs(app: Celeriac, tmp_path: Path) -> None:
    """``inspect active`` shows what the children run, with its start time and the child's pid."""
    @app.task(name="pf.until")
    def until(path: str) -> str:
        deadline = time.monotonic() + 20
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        return "released"

    marker = str(tmp_path / "release")
    worker = _worker(app, concurrency=1)
    try:
        before = time.time()
        running, waiting = until.delay(marker), until.delay(marker)
        inspect = app.control.inspect(timeout=1)
        deadline = time.monotonic() + 10
        active: list[Any] = []
        while not active:
            assert time.monotonic() < deadline, "the running task never showed under active"
            active = (inspect.active() or {}).get(worker.hostname) or []
        assert [item["id"] for item in active] == [running.id]
        assert before - 1 <= active[0]["time_start"] <= time.time()
        assert active[0]["worker_pid"] not in (None, os.getpid())
        reserved = inspect.reserved()[worker.hostname]
        assert [item["id"] for item in reserved] == [waiting.id]
        assert reserved[0]["time_start"] is None
        open(marker, "w").close()
        assert running.get(timeout=10) == waiting.get(timeout=10) == "released"
    finally:
        open(marker, "w").close()
        _stop(worker)


def test_queued_time_does_not_count_against_the_hard_time_limit(app: Celeriac) -> None:
    @app.task(time_limit=0.9, name="pf.limited")
    def limited(index: int) -> int:
        time.sleep(0.5)
        return index

    worker = _worker(app, concurrency=1)
    try:
        results = [limited.delay(i) for i in range(4)]
        assert [r.get(timeout=20) for r in results] == [0, 1, 2, 3]
    finally:
        _stop(worker)


def test_pool_grow_and_shrink_fork_and_retire_children(app: Celeriac) -> None:
    worker = _worker(app, concurrency=1)
    try:
        pool = worker.pool
        reply = app.control.broadcast("pool_grow", {"n": 2}, reply=True, timeout=3, limit=1)
        assert reply == [{worker.hostname: {"ok": "pool will grow"}}]
        assert pool.concurrency == 3 and len(pool._slots) == 3
        pids = {app.tasks["pf.pid"].delay().get(timeout=10) for _ in range(12)}
        assert len(pids) >= 2
        app.control.broadcast("pool_shrink", {"n": 2}, reply=True, timeout=3, limit=1)
        deadline = time.monotonic() + 10
        while len(pool._slots) != 1:
            assert time.monotonic() < deadline, "the children were not retired"
            time.sleep(0.05)
        assert app.tasks["pf.add"].delay(2, 2).get(timeout=10) == 4
    finally:
        _stop(worker)
