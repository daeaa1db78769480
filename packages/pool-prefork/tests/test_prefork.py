"""The prefork pool under a real worker on the embedded SQLite broker (shared by the children)."""

from __future__ import annotations

import logging
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


@pytest.fixture(params=["classic", "direct"])
def app(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Celeriac]:
    """The app, for a pool whose parent consumes (classic) and one whose children consume
    (``worker_direct_consume``): every worker-level test runs on both."""
    app = Celeriac("pf", broker=f"sqlite:///{tmp_path}/b.db", backend=f"sqlite:///{tmp_path}/r.db",
                   broker_transport_options={"visibility_timeout": 5},
                   worker_direct_consume=request.param == "direct")

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

    @app.task(name="pf.slow_pid")
    def slow_pid(seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()

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


def _pids_of_recycled_children(app: Celeriac, limit: str, value: int, from_config: bool, tasks: int) -> set[int]:
    """Run ``tasks`` tasks on one child with ``max_<limit>_per_child=value`` given as a worker
    option or as Celery's ``worker_max_<limit>_per_child`` setting; the pids that ran them.
    Fails when the pool logged an error meanwhile (a child that stops itself is routine)."""
    option = f"max_{limit}_per_child"
    if from_config:
        app.conf[f"worker_{option}"] = value
        worker = _worker(app, concurrency=1)
    else:
        worker = _worker(app, concurrency=1, **{option: value})
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    logging.getLogger("celeriac").addHandler(handler)
    try:
        pids = {app.tasks["pf.pid"].delay().get(timeout=20) for _ in range(tasks)}
        assert app.tasks["pf.add"].delay(2, 3).get(timeout=20) == 5
        assert [r.getMessage() for r in errors] == []
        return pids
    finally:
        logging.getLogger("celeriac").removeHandler(handler)
        _stop(worker)


@pytest.mark.parametrize("from_config", [False, True])
def test_max_tasks_per_child_replaces_children(app: Celeriac, from_config: bool) -> None:
    """``--max-tasks-per-child``, or Celery's ``worker_max_tasks_per_child`` setting."""
    assert len(_pids_of_recycled_children(app, "tasks", 2, from_config, 6)) == 3


@pytest.mark.parametrize("from_config", [False, True])
def test_max_memory_per_child_replaces_a_child_after_its_task(app: Celeriac, from_config: bool) -> None:
    """``--max-memory-per-child`` / ``worker_max_memory_per_child`` in KiB: every child is above
    1 KiB, so each finishes its task (the result comes back) and is replaced."""
    assert len(_pids_of_recycled_children(app, "memory", 1, from_config, 3)) == 3


def test_warm_shutdown_finishes_running_and_requeues_waiting(app: Celeriac) -> None:
    # Queued first, so that the worker (or its consuming child) receives all four at once: a
    # consuming child does not fetch while it runs a task.
    slow = app.tasks["pf.slow"]
    running = slow.delay(1.0)
    waiting = [slow.delay(0.01) for _ in range(3)]
    worker = _worker(app, concurrency=1)
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
    before = time.time()
    # Both queued before the worker starts, so the one child takes both in one fetch (a child
    # that consumes does not fetch while it runs a task).
    running, waiting = until.delay(marker), until.delay(marker)
    worker = _worker(app, concurrency=1)
    try:
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
        pids = set(group(app.tasks["pf.slow_pid"].s(0.2) for _ in range(12))().get(timeout=20))
        assert len(pids) >= 2
        app.control.broadcast("pool_shrink", {"n": 2}, reply=True, timeout=3, limit=1)
        deadline = time.monotonic() + 10
        while len(pool._slots) != 1:
            assert time.monotonic() < deadline, "the children were not retired"
            time.sleep(0.05)
        assert app.tasks["pf.add"].delay(2, 2).get(timeout=10) == 4
    finally:
        _stop(worker)


# -- the pool on its own: pipelining, time limits, take-back, stopping -------------------------

def _value_after(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def _soft_probe(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "interrupted"
    return "finished"


def _exit_after(seconds: float, code: int) -> None:
    time.sleep(seconds)
    os._exit(code)


def _child_pid() -> int:
    return os.getpid()


class _Recorder:
    """Callbacks for :meth:`PreforkPool.apply_async` that remember what happened to each job."""

    def __init__(self) -> None:
        self.outcomes: dict[str, list[Any]] = {}
        self.started: list[str] = []
        self.finished_at: dict[str, float] = {}
        self.lock = threading.Lock()

    def submit(self, pool: Any, name: str, target: Any, *args: Any) -> Any:
        def done(outcome: Any) -> None:
            with self.lock:
                self.outcomes.setdefault(name, []).append(outcome)
                self.finished_at[name] = time.monotonic()

        def start() -> None:
            with self.lock:
                self.started.append(name)

        return pool.apply_async(target, args, done, on_start=start)

    def wait(self, *names: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not all(n in self.outcomes for n in names):
            assert time.monotonic() < deadline, f"no outcome for {set(names) - set(self.outcomes)}"
            time.sleep(0.005)
        return {n: self.outcomes[n][0] for n in names}


@pytest.fixture
def pool() -> Iterator[Any]:
    from celeriac_prefork.pool import PreforkPool

    pools: list[Any] = []

    def make(concurrency: int = 1, **options: Any) -> Any:
        p = PreforkPool(concurrency=concurrency, **options)
        p.start()
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.stop(wait=False)


def _warm_up(pool: Any, rec: _Recorder, n: int = 1) -> None:
    """Short jobs on every child first: a child gets a second job only behind short ones."""
    names = [f"warm{i}-{time.monotonic()}" for i in range(n)]
    for name in names:
        rec.submit(pool, name, _value_after, 0.0, name)
    rec.wait(*names)


def _wait_started_in_child(handle: Any) -> None:
    from celeriac_prefork.child import STARTED

    deadline = time.monotonic() + 10
    while handle.slot.shared[STARTED] != handle.seq:
        assert time.monotonic() < deadline, "the child never started the pipelined job"
        time.sleep(0.005)


@pytest.mark.parametrize("limit", ["soft", "hard"])
def test_a_time_limit_meant_for_a_finished_job_spares_the_next_one(pool: Any, limit: str) -> None:
    p = pool(1)
    rec = _Recorder()
    _warm_up(p, rec)
    first = rec.submit(p, "first", _value_after, 0.0, "first")
    second = rec.submit(p, "second", _soft_probe, 1.0)
    assert second.slot is first.slot, "the second job was not pipelined"
    # Hold the pool's lock: the parent cannot read the first job's answer, so to it the first
    # job still runs, while the child has moved on to the second one.
    with p._lock:
        _wait_started_in_child(second)
        exc = SoftTimeLimitExceeded if limit == "soft" else TimeLimitExceeded
        assert p.raise_soft_timeout(first, exc) is False
    outcomes = rec.wait("first", "second")
    assert outcomes == {"first": "first", "second": "finished"}
    assert rec.started[-2:] == ["first", "second"]


def test_a_soft_time_limit_interrupts_the_pipelined_job_it_is_meant_for(pool: Any) -> None:
    p = pool(1)
    rec = _Recorder()
    _warm_up(p, rec)
    rec.submit(p, "first", _value_after, 0.0, "first")
    second = rec.submit(p, "second", _soft_probe, 5.0)
    _wait_started_in_child(second)
    deadline = time.monotonic() + 10
    while "first" not in rec.outcomes:  # the parent counts it started once the first answered
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert p.raise_soft_timeout(second, SoftTimeLimitExceeded) is True
    assert rec.wait("second") == {"second": "interrupted"}


def test_a_child_killed_with_a_second_job_queued_hands_that_job_back(pool: Any) -> None:
    p = pool(1)
    rec = _Recorder()
    _warm_up(p, rec)
    dying = rec.submit(p, "dying", _exit_after, 0.3, 7)
    queued = rec.submit(p, "queued", _value_after, 0.0, "ran")
    assert queued.slot is dying.slot, "the second job was not pipelined"
    assert rec.wait("dying", "queued") == {"dying": "lost (exit code 7)", "queued": "notstarted"}
    assert "queued" not in rec.started
    # the replacement child runs what comes next
    rec.submit(p, "after", _value_after, 0.0, "after")
    assert rec.wait("after") == {"after": "after"}
    assert all(len(v) == 1 for v in rec.outcomes.values())


def test_a_hard_limit_kill_is_the_running_jobs_outcome_only(pool: Any) -> None:
    p = pool(1)
    rec = _Recorder()
    _warm_up(p, rec)
    stuck = rec.submit(p, "stuck", _value_after, 5.0, "stuck")
    queued = rec.submit(p, "queued", _value_after, 0.0, "ran")
    assert queued.slot is stuck.slot, "the second job was not pipelined"
    _wait_started_in_child(stuck)
    assert p.raise_soft_timeout(stuck, TimeLimitExceeded) is True
    assert rec.wait("stuck", "queued") == {"stuck": "timeout", "queued": "notstarted"}


def test_a_job_waiting_behind_a_long_one_moves_to_an_idle_child(pool: Any) -> None:
    p = pool(2)
    rec = _Recorder()
    _warm_up(p, rec, n=2)
    for attempt in range(10):  # until the third job is pipelined behind the long one
        long = rec.submit(p, f"long{attempt}", _value_after, 1.5, "long")
        rec.submit(p, f"short{attempt}", _value_after, 0.0, "short")
        waiting = rec.submit(p, f"waiting{attempt}", _child_pid)
        started = time.monotonic()
        if waiting.slot is long.slot:
            break
        rec.wait(f"long{attempt}", f"short{attempt}", f"waiting{attempt}")
    else:
        pytest.fail("the third job was never pipelined behind the long one")
    outcomes = rec.wait(f"long{attempt}", f"short{attempt}", f"waiting{attempt}")
    assert outcomes[f"waiting{attempt}"] != long.pid
    assert rec.finished_at[f"waiting{attempt}"] - started < 1.0
    assert rec.started.count(f"waiting{attempt}") == 1 and len(rec.outcomes[f"waiting{attempt}"]) == 1


def test_warm_stop_reports_every_job_once(pool: Any) -> None:
    p = pool(1)
    rec = _Recorder()
    _warm_up(p, rec)
    rec.submit(p, "running", _value_after, 0.5, "running")
    pipelined = rec.submit(p, "pipelined", _value_after, 0.0, "pipelined")
    assert pipelined.slot is not None, "the second job was not pipelined"
    rec.submit(p, "queued", _value_after, 0.0, "queued")
    time.sleep(0.1)
    p.stop(wait=True)
    assert rec.wait("running", "pipelined", "queued", timeout=1) == {
        "running": "running", "pipelined": "notstarted", "queued": "notstarted"}
    assert all(len(v) == 1 for v in rec.outcomes.values())
    rec.submit(p, "late", _value_after, 0.0, "late")
    assert rec.wait("late", timeout=1) == {"late": "notstarted"}


def test_max_tasks_per_child_is_never_exceeded_while_pipelining(pool: Any) -> None:
    import collections

    p = pool(1, max_tasks_per_child=3)
    rec = _Recorder()
    _warm_up(p, rec)
    names = [f"pid{i}" for i in range(12)]
    for name in names:
        rec.submit(p, name, _child_pid)
    pids = collections.Counter(rec.wait(*names).values())
    # the warm-up job was the first child's first
    assert max(pids.values()) <= 3 and len(pids) >= 4
    assert sum(pids.values()) == 12


def _length(data: bytes) -> int:
    return len(data)


def test_large_payloads_and_results_cross_whole(pool: Any) -> None:
    p = pool(2)
    rec = _Recorder()
    _warm_up(p, rec, n=2)
    big = b"x" * (8 * 1024 * 1024)
    for i in range(4):
        rec.submit(p, f"big{i}", _length, big)
        rec.submit(p, f"echo{i}", _value_after, 0.0, big)
    outcomes = rec.wait(*(f"big{i}" for i in range(4)), *(f"echo{i}" for i in range(4)))
    assert all(outcomes[f"big{i}"] == len(big) and outcomes[f"echo{i}"] == big for i in range(4))


def test_a_task_queued_behind_one_whose_child_dies_runs_once(app: Celeriac, tmp_path: Path) -> None:
    @app.task(name="pf.die_later")
    def die_later() -> None:
        time.sleep(0.3)
        os._exit(5)

    @app.task(name="pf.count")
    def count(path: str, text: str) -> str:
        with open(path, "a") as handle:
            handle.write(text + "\n")
        return text

    @app.task(name="pf.short", ignore_result=True)
    def short(path: str) -> None:
        open(path, "w").close()

    worker = _worker(app, concurrency=1)
    pool = worker.pool
    task_ids: dict[Any, str] = {}
    behind: list[tuple[str, str]] = []  # (task id of the running job, task id sent behind it)
    apply_async, send = pool.apply_async, pool._send

    def apply_spy(target: Any, args: Any, callback: Any, on_start: Any = None) -> Any:
        job = apply_async(target, args, callback, on_start)
        task_ids[job] = args[0]["headers"]["id"]
        return job

    def send_spy(slot: Any, job: Any) -> None:
        if slot.inflight:
            behind.append((task_ids.get(slot.inflight[0], "?"), args_id(job)))
        send(slot, job)

    def args_id(job: Any) -> str:
        import pickle

        return str(pickle.loads(job.body)[1][0]["headers"]["id"])

    direct = bool(app.conf.get("worker_direct_consume"))
    if not direct:  # the parent sends a job behind the running one
        pool.apply_async, pool._send = apply_spy, send_spy
    try:
        marker = str(tmp_path / "runs")
        warm = str(tmp_path / "warm")
        short.delay(warm)  # a short job first: a child gets a second job only behind short ones
        deadline = time.monotonic() + 10
        while not os.path.exists(warm):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        dying = die_later.delay()
        counted = [count.delay(marker, f"run{i}") for i in range(3)]
        with pytest.raises(WorkerLostError):
            dying.get(timeout=20)
        assert [r.get(timeout=20) for r in counted] == ["run0", "run1", "run2"]
        # classic: the parent sent a job behind the dying one; direct: the child had them
        # prefetched, and they come back from the broker redelivered, to run once
        assert direct or any(head == dying.id for head, _ in behind), "no task was sent behind the dying one"
        assert sorted(Path(marker).read_text().split()) == ["run0", "run1", "run2"]
    finally:
        _stop(worker)


def test_jobs_submitted_before_start_run_once_it_starts() -> None:
    from celeriac_prefork.pool import PreforkPool

    p = PreforkPool(concurrency=2)
    rec = _Recorder()
    try:
        for i in range(3):
            rec.submit(p, f"early{i}", _value_after, 0.0, i)
        p.start()
        assert rec.wait("early0", "early1", "early2") == {"early0": 0, "early1": 1, "early2": 2}
    finally:
        p.stop(wait=True)


def _release_when(path: str) -> Any:
    deadline = time.monotonic() + 20
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "released"


@pytest.mark.parametrize("warm_up", [False, True], ids=["queued-in-parent", "pipelined-in-child"])
def test_a_revoked_task_waiting_for_a_child_never_runs(app: Celeriac, tmp_path: Path, warm_up: bool) -> None:
    """A reserved task revoked while every child is busy is REVOKED and never runs, as in Celery,
    whether it waits in the parent or was already written to a child behind a running task
    (after short tasks the pool sends a second job to a busy child)."""
    from celeriac import states
    from celeriac.exceptions import TaskRevokedError

    until = app.task(name="pf.until2")(_release_when)
    ran = tmp_path / "ran"

    @app.task(name="pf.mark")
    def mark(path: str) -> str:
        open(path, "w").close()
        return "ran"

    marker = str(tmp_path / "release")
    direct = bool(app.conf.get("worker_direct_consume"))
    if direct and warm_up:
        pytest.skip("no pipelining when the children consume: the parent sends them nothing")
    if direct:  # queued first, so that the child receives both in one fetch
        running = until.delay(marker)
        waiting = mark.delay(str(ran))
    worker = _worker(app, concurrency=1)
    try:
        if warm_up:  # short tasks first: the child then gets jobs pipelined behind its current one
            assert [app.tasks["pf.add"].delay(i, i).get(timeout=10) for i in range(3)] == [0, 2, 4]
        if not direct:
            running = until.delay(marker)
            waiting = mark.delay(str(ran))
        inspect = app.control.inspect(timeout=1)
        deadline = time.monotonic() + 10
        while [item["id"] for item in (inspect.reserved() or {}).get(worker.hostname) or []] != [waiting.id]:
            assert time.monotonic() < deadline, "the second task was never reserved"
        app.control.revoke(waiting.id)
        with pytest.raises(TaskRevokedError):
            waiting.get(timeout=10)
        assert waiting.state == states.REVOKED
        open(marker, "w").close()
        assert running.get(timeout=10) == "released"
        assert app.tasks["pf.add"].delay(1, 1).get(timeout=10) == 2  # the child goes on
        assert not ran.exists()
    finally:
        open(marker, "w").close()
        _stop(worker)


def _started(app: Celeriac, worker: Any, result: Any) -> Any:
    """``result`` once ``inspect active`` shows its task running on ``worker``."""
    inspect = app.control.inspect(timeout=1)
    deadline = time.monotonic() + 10
    while not (inspect.active() or {}).get(worker.hostname):
        assert time.monotonic() < deadline, "the task never started"
    return result


def test_revoke_terminate_kills_the_running_task_which_ends_revoked(app: Celeriac, tmp_path: Path) -> None:
    from celeriac import states
    from celeriac.exceptions import TaskRevokedError

    until = app.task(name="pf.until3")(_release_when)
    marker = str(tmp_path / "release")
    worker = _worker(app, concurrency=1)
    try:
        running = _started(app, worker, until.delay(marker))
        replies = app.control.revoke(running.id, terminate=True, signal="SIGKILL", reply=True, timeout=2)
        assert {"ok": f"terminate: {running.id}"} in [next(iter(r.values())) for r in replies]
        with pytest.raises(TaskRevokedError):
            running.get(timeout=10)
        assert running.state == states.REVOKED
        assert app.tasks["pf.add"].delay(2, 2).get(timeout=20) == 4  # a new child took over
    finally:
        open(marker, "w").close()
        _stop(worker)


def test_revoking_a_running_task_without_terminate_lets_it_finish(app: Celeriac, tmp_path: Path) -> None:
    """Celery only flags it: the task finishes and its result stands (no REVOKED stored first)."""
    from celeriac import states

    until = app.task(name="pf.until4")(_release_when)
    marker = str(tmp_path / "release")
    worker = _worker(app, concurrency=1)
    try:
        running = _started(app, worker, until.delay(marker))
        app.control.revoke(running.id, reply=True, timeout=1)
        assert running.state != states.REVOKED
        open(marker, "w").close()
        assert running.get(timeout=10) == "released"
        assert running.state == states.SUCCESS
    finally:
        open(marker, "w").close()
        _stop(worker)


def test_enable_events_reaches_the_children(app: Celeriac) -> None:
    """``control enable_events`` on a worker started without ``-E``: the tasks its children run
    send task-started and task-succeeded (they used to send nothing), and disable_events stops
    them again."""
    from celeriac.events import EventReceiver

    receiver = EventReceiver(app)
    worker = _worker(app)
    add = app.tasks["pf.add"]

    def task_events(task_id: str) -> set[str]:
        seen: set[str] = set()
        for event in receiver.itercapture(timeout=3):
            if event.get("uuid") == task_id:
                seen.add(event["type"])
            if "task-succeeded" in seen:
                break
        return seen

    try:
        assert add.delay(1, 1).get(timeout=10) == 2
        app.control.enable_events(reply=True, timeout=1)
        on = add.delay(2, 2)
        assert on.get(timeout=10) == 4
        assert {"task-received", "task-started", "task-succeeded"} <= task_events(on.id)
        app.control.disable_events(reply=True, timeout=1)
        off = add.delay(3, 3)
        assert off.get(timeout=10) == 6
        assert task_events(off.id) == set()
    finally:
        _stop(worker)
        receiver.close()


@pytest.mark.parametrize("setting", ["rate_limit", "autoscale", "off"])
def test_the_worker_consumes_for_its_children_when_they_must_not(tmp_path: Path, setting: str) -> None:
    """Children consume by themselves by default; the worker consumes for them when a task has a
    rate limit at start (it holds for the whole worker), with --autoscale (sized by the tasks
    the worker holds), or with ``worker_direct_consume = False``."""
    from celeriac_prefork.direct import DirectPreforkPool

    app = Celeriac("pfc", broker=f"sqlite:///{tmp_path}/b.db", backend=f"sqlite:///{tmp_path}/r.db",
                   worker_direct_consume=setting != "off")

    @app.task(name="pfc.add", rate_limit="100/s" if setting == "rate_limit" else None)
    def add(x: int, y: int) -> int:
        return x + y

    options: dict[str, Any] = {"autoscale": (2, 1)} if setting == "autoscale" else {}
    worker = _worker(app, **options)
    try:
        assert add.delay(2, 3).get(timeout=10) == 5
        assert not worker.pool.consumes_directly and not isinstance(worker.pool, DirectPreforkPool)
    finally:
        _stop(worker)
        app.close()
    app.conf.worker_direct_consume = True
    add.rate_limit = None
    worker = _worker(app)
    try:
        assert add.delay(2, 3).get(timeout=10) == 5
        assert isinstance(worker.pool, DirectPreforkPool)
    finally:
        _stop(worker)
        app.close()
