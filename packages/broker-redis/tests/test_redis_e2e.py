"""End to end through the real CLI: the seed tutorial, Celery interop both ways, kill -9, restarts.

Workers are real processes (``celeriac -A ... worker`` and ``celery -A ... worker``) on the live
Redis, each test under its own key prefix. The task modules are generated per test so the same
task names exist in a Celery app and in a Celeriac app.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from redis_support import REDIS_START, ensure_redis_running, redis_up, wait_for

VENV_BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

COMMON = '''
import json, os, time
import redis as _redis

URL, PFX, QUEUE, VT = {url!r}, {prefix!r}, {queue!r}, {vt!r}


def configure(app):
    app.conf.update(
        broker_transport_options={{"global_keyprefix": PFX, "visibility_timeout": VT,
                                   "unacked_restore_interval": 1, "unacked_restore_throttle": 1}},
        result_backend_transport_options={{"global_keyprefix": PFX}},
        task_default_queue=QUEUE,
        result_expires=600,
        result_extended=os.environ.get("E2E_RESULT_EXTENDED") == "1",
        worker_prefetch_multiplier=4,
    )
    store = _redis.Redis.from_url(URL)

    @app.task(name="e2e.add")
    def add(x, y):
        return x + y

    @app.task(name="e2e.mul")
    def mul(x, y):
        return x * y

    @app.task(name="e2e.xsum")
    def xsum(numbers):
        return sum(numbers)

    @app.task(name="e2e.mark", acks_late=True)
    def mark(i, sleep=0.0):
        time.sleep(sleep)
        store.sadd(PFX + "marks", i)
        store.rpush(PFX + "runs", json.dumps([i, time.time(), os.getpid()]))
        return i

    return add, mul, xsum, mark
'''

CELERIAC_APP = '''
from celeriac import Celeriac
from {common} import URL, configure
app = Celeriac("e2e", broker=URL, backend=URL)
add, mul, xsum, mark = configure(app)
'''

CELERY_APP = '''
from celery import Celery
from {common} import URL, configure
app = Celery("e2e", broker=URL, backend=URL)
add, mul, xsum, mark = configure(app)
'''


class Project:
    """Generated task modules for one test, plus the worker processes it started."""

    def __init__(self, root: Path, url: str, prefix: str, vt: float) -> None:
        self.root = root
        self.url = url
        self.prefix = prefix
        suffix = uuid.uuid4().hex[:8]
        self.common = f"e2e_common_{suffix}"
        self.celeriac_mod = f"e2e_celeriac_{suffix}"
        self.celery_mod = f"e2e_celery_{suffix}"
        (root / f"{self.common}.py").write_text(
            COMMON.format(url=url, prefix=prefix, queue=f"q{suffix}", vt=vt))
        (root / f"{self.celeriac_mod}.py").write_text(CELERIAC_APP.format(common=self.common))
        (root / f"{self.celery_mod}.py").write_text(CELERY_APP.format(common=self.common))
        self.workers: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.redis = redis.Redis.from_url(url)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), str(EXAMPLES), env.get("PYTHONPATH", "")])
        env.pop("CELERIAC_BROKER_URL", None)
        env.pop("CELERIAC_RESULT_BACKEND", None)
        return env

    def start(self, argv: list[str], ready: str, env: dict[str, str] | None = None,
              name: str = "w") -> subprocess.Popen[bytes]:
        log = self.root / f"{name}-{len(self.workers)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=self.root, env=env or self.env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append((proc, log))
        try:
            wait_for(lambda: ready in log.read_text(errors="replace") or proc.poll() is not None,
                     30, f"{name} to be ready")
        except AssertionError:
            raise AssertionError(f"worker not ready:\n{log.read_text(errors='replace')[-3000:]}") from None
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        return proc

    def celeriac_worker(self, name: str = "a", concurrency: int = 4) -> subprocess.Popen[bytes]:
        return self.start([str(VENV_BIN / "celeriac"), "-A", self.celeriac_mod, "worker", "-l",
                           "info", "-P", "threads", "-c", str(concurrency), "-n", f"{name}@%h"],
                          "ready", name=name)

    def celery_worker(self, name: str = "c") -> subprocess.Popen[bytes]:
        return self.start([str(VENV_BIN / "celery"), "-A", self.celery_mod, "worker", "-l", "info",
                           "-P", "threads", "-c", "4", "-n", f"{name}@%h", "--without-gossip",
                           "--without-mingle", "--without-heartbeat"], "ready", name=name)

    def module(self, name: str) -> ModuleType:
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        return importlib.import_module(name)

    def marks(self) -> int:
        return int(self.redis.scard(self.prefix + "marks"))

    def stop(self) -> None:
        for proc, _log in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _log in self.workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.redis.close()
        if str(self.root) in sys.path:
            sys.path.remove(str(self.root))

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n" + log.read_text(errors="replace")[-2000:]
                         for _, log in self.workers)


@pytest.fixture
def project(tmp_path: Path, redis_url: str, prefix: str, request: pytest.FixtureRequest) -> Iterator[Project]:
    vt = getattr(request, "param", 30.0)
    proj = Project(tmp_path, redis_url, prefix, vt)
    yield proj
    proj.stop()


def _celeriac_canvas() -> Any:
    import celeriac

    return celeriac.group, celeriac.chain, celeriac.chord


def _celery_canvas() -> Any:
    import celery

    return celery.group, celery.chain, celery.chord


def _exercise(mod: ModuleType, canvas: Any) -> None:
    group, chain, chord = canvas
    assert mod.add.delay(2, 2).get(timeout=15) == 4
    start = time.time()
    assert mod.add.apply_async((1, 1), countdown=1).get(timeout=20) == 2
    assert time.time() - start >= 0.95
    assert group(mod.add.s(i, i) for i in range(10))().get(timeout=15) == [2 * i for i in range(10)]
    assert chain(mod.add.s(4, 4) | mod.mul.s(8))().get(timeout=15) == 64
    assert chord((mod.add.s(i, i) for i in range(10)), mod.xsum.s())().get(timeout=20) == 90


def test_seed_tutorial_through_the_cli(project: Project, redis_url: str, prefix: str) -> None:
    (project.root / "e2econf.py").write_text(
        f"broker_transport_options = {{'global_keyprefix': {prefix!r}}}\n"
        f"result_backend_transport_options = {{'global_keyprefix': {prefix!r}}}\n")
    env = project.env()
    env["CELERIAC_BROKER_URL"] = env["CELERIAC_RESULT_BACKEND"] = redis_url
    project.start([str(VENV_BIN / "celeriac"), "-A", "proj", "--config", "e2econf", "worker",
                   "-l", "info", "-c", "4"], "ready", env=env, name="seed")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from proj.celery import app
        from proj.tasks import add, flaky, mul, xsum

        app.conf.update(broker_url=redis_url, result_backend=redis_url,
                        broker_transport_options={"global_keyprefix": prefix},
                        result_backend_transport_options={"global_keyprefix": prefix})
        from celeriac import chord, group

        assert add.delay(4, 4).get(timeout=15) == 8
        assert mul.apply_async((3, 3), countdown=1).get(timeout=15) == 9
        assert group(add.s(i, i) for i in range(5))().get(timeout=15) == [0, 2, 4, 6, 8]
        assert chord((add.s(i, i) for i in range(5)), xsum.s())().get(timeout=15) == 20
        assert flaky.delay().get(timeout=15) == "succeeded after 2 retries"
    finally:
        sys.path.remove(str(EXAMPLES))


def test_celery_client_to_celeriac_worker(project: Project) -> None:
    project.celeriac_worker()
    _exercise(project.module(project.celery_mod), _celery_canvas())


def test_celeriac_client_to_celery_worker(project: Project) -> None:
    project.celery_worker()
    try:
        _exercise(project.module(project.celeriac_mod), _celeriac_canvas())
    except BaseException:
        print(project.logs())
        raise


def test_result_extended_stores_the_fields_celery_stores(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """``result_extended``: the same task run by a Celery worker and by a Celeriac worker leaves
    the same name, args, kwargs, retries and queue (and its node name as ``worker``), read by
    Celery's client and by ours."""
    monkeypatch.setenv("E2E_RESULT_EXTENDED", "1")
    celery_mod, ours_mod = project.module(project.celery_mod), project.module(project.celeriac_mod)
    fields = ("name", "args", "kwargs", "retries", "queue")
    seen = {}
    for system, start in (("celery", project.celery_worker), ("celeriac", project.celeriac_worker)):
        proc = start(name=system[:2])
        try:
            sent = celery_mod.mark.apply_async((7,), {"sleep": 0.0})
            assert sent.get(timeout=15) == 7
            theirs, ours = celery_mod.app.AsyncResult(sent.id), ours_mod.app.AsyncResult(sent.id)
            seen[system] = {f: getattr(theirs, f) for f in fields}
            assert {f: getattr(ours, f) for f in fields} == seen[system]
            assert theirs.worker == ours.worker and ours.worker.startswith(f"{system[:2]}@")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    assert seen["celeriac"] == seen["celery"]
    assert seen["celery"]["name"] == "e2e.mark" and seen["celery"]["args"] == [7]


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "lzma"])
def test_compressed_tasks_from_a_celery_client_run_on_celeriac(project: Project, compression: str) -> None:
    """``compression=`` on Celery's ``apply_async``: the body is compressed and named in the
    ``compression`` header; the Celeriac worker reads it (it used to reject it as undecodable)."""
    project.celeriac_worker()
    mod = project.module(project.celery_mod)
    assert mod.add.apply_async((2, 3), compression=compression).get(timeout=15) == 5
    mod.app.conf.task_compression = compression
    assert (mod.add.s(1, 1) | mod.mul.s(10))().get(timeout=15) == 20


def test_celeriac_task_compression_is_read_by_celery_workers(project: Project) -> None:
    project.celery_worker()
    mod = project.module(project.celeriac_mod)
    mod.app.conf.task_compression = "gzip"
    try:
        assert mod.add.delay(2, 3).get(timeout=15) == 5
        assert mod.add.apply_async((4, 4), compression="bzip2").get(timeout=15) == 8
    except BaseException:
        print(project.logs())
        raise


@pytest.mark.parametrize("project", [3.0], indirect=True)
def test_kill_9_of_a_worker_loses_no_task(project: Project) -> None:
    total = 10_000
    mod = project.module(project.celeriac_mod)
    # Queue everything first, so both workers are busy with a backlog when one is killed.
    for i in range(total):
        mod.mark.delay(i)
    first = project.celeriac_worker("a", concurrency=8)
    project.celeriac_worker("b", concurrency=8)
    wait_for(lambda: project.marks() >= total // 5, 60, "the workers to get going")
    assert first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    # The dead worker's prefetched and running acks_late tasks are still in the unacked store.
    assert project.redis.hlen(project.prefix + "unacked") > 0
    try:
        wait_for(lambda: project.marks() == total, 90, f"all {total} tasks (have {project.marks()})")
    except AssertionError:
        print(project.logs())
        raise


@pytest.mark.parametrize("project", [2.0], indirect=True)
def test_acks_late_task_of_a_killed_worker_runs_on_another(project: Project) -> None:
    import json

    first = project.celeriac_worker("a")
    mod = project.module(project.celeriac_mod)
    result = mod.mark.apply_async((1,), kwargs={"sleep": 8.0})
    key = project.prefix + "unacked"
    wait_for(lambda: project.redis.hlen(key) == 1 and
             not project.redis.exists(project.prefix + project.common.replace("e2e_common_", "q")),
             10, "worker a to hold the task")
    second = project.celeriac_worker("b")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    assert result.get(timeout=20) == 1
    runs = [json.loads(r) for r in project.redis.lrange(project.prefix + "runs", 0, -1)]
    assert [r[2] for r in runs] == [second.pid], runs


@pytest.mark.parametrize("project", [2.0], indirect=True)
def test_countdown_runs_once_on_two_workers_within_a_second(project: Project) -> None:
    project.celeriac_worker("a")
    project.celeriac_worker("b")
    mod = project.module(project.celeriac_mod)
    cmod = project.module(project.celery_mod)
    eta = time.time() + 5
    result = mod.mark.apply_async((7,), countdown=5)  # parked by our client
    cresult = cmod.mark.apply_async((8,), countdown=5)  # Celery's: parked by the worker that gets it
    assert result.get(timeout=20) == 7
    assert cresult.get(timeout=20) == 8
    time.sleep(2 * 2.0 + 0.5)  # past two visibility timeouts: a duplicate would have run by now
    import json

    runs = [json.loads(r) for r in project.redis.lrange(project.prefix + "runs", 0, -1)]
    assert sorted(r[0] for r in runs) == [7, 8], runs
    for run in runs:
        assert eta - 0.05 <= run[1] <= eta + 1.0, f"ran {run[1] - eta:+.2f} s from its ETA"


def test_worker_reconnects_after_a_redis_restart(project: Project) -> None:
    project.celeriac_worker("a")
    mod = project.module(project.celeriac_mod)
    assert [r.get(timeout=15) for r in [mod.add.delay(i, 1) for i in range(20)]] == \
        [i + 1 for i in range(20)]
    try:
        subprocess.run(["redis-cli", "shutdown", "nosave"], check=False, capture_output=True,
                       timeout=10)
        wait_for(lambda: not redis_up(), 10, "Redis to stop")
        time.sleep(1.0)  # the worker sees the outage
        subprocess.run(REDIS_START, check=False, capture_output=True)
        wait_for(redis_up, 20, "Redis to restart")
        results = [mod.add.delay(i, 2) for i in range(50)]
        assert [r.get(timeout=30) for r in results] == [i + 2 for i in range(50)]
    except BaseException:
        print(project.logs())
        raise
    finally:
        ensure_redis_running()


def test_the_repository_tutorial_on_redis(redis_url: str) -> None:
    """``examples/tutorial.py`` (every call of the seed tutorial, inspect and revoke included)
    with Redis as broker and backend: its default queues, unprefixed, in the test database."""
    env = dict(os.environ, CELERIAC_BROKER_URL=redis_url, CELERIAC_RESULT_BACKEND=redis_url)
    done = subprocess.run([sys.executable, str(EXAMPLES / "tutorial.py")], env=env, check=False,
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "All tutorial calls gave the expected answers." in done.stdout
