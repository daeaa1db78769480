"""The green pool kit: ``celeriac worker -P POOL`` through the real command line, as pytest tests.

A green pool package (gevent, eventlet, a third party's) subclasses :class:`GreenPoolConformance`
in its tests and names its pool::

    from celeriac.testing.green_kit import GreenPoolConformance

    class TestGeventPool(GreenPoolConformance):
        pool = "gevent"

The kit checks what :class:`celeriac.worker.green.GreenPool` promises, with the plugin's own
primitives: early patching and the late-patch report, queueing beyond the limit, grow/shrink,
soft and hard time limits inside the green thread, ``inspect active``, warm shutdown waiting for
running tasks, cold shutdown and ``kill -9`` giving ``acks_late`` work back to the broker, the
embedded SQLite broker and hundreds of concurrent tasks on Redis, and the repository's tutorial
(``examples/tutorial.py``, run by :mod:`celeriac.testing.green_tutorial`) on Redis and RabbitMQ.

Every patched process is a subprocess: the pytest process is never monkey-patched (the whole
suite shares it). The clients are plain, unpatched Celeriac clients. Servers come from
``CELERIAC_TEST_REDIS_URL`` / ``CELERIAC_TEST_AMQP_URL`` (tests skip when one is down, unless
``CELERIAC_REQUIRE_BROKERS=1``); the tutorial runs on a Redis database
(``CELERIAC_TEST_GREEN_REDIS_URL``) and a RabbitMQ virtual host of its own. The tests need the
``redis`` and ``pika`` client libraries (imported only when used).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import pytest

from celeriac.exceptions import TaskRevokedError, TimeLimitExceeded
from celeriac.testing.process import WorkerProcess, require_server

__all__ = ["APP", "GreenPoolConformance", "find_examples", "patch_probe", "pool_probe", "wait_for"]

CELERIAC = [sys.executable, "-m", "celeriac.cli.main"]
REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS_URL", "redis://localhost:6379/9")
AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672//")
# The tutorial uses the default queues (celery, hipri, lopri) and expects exactly one worker to
# answer ``inspect ping``: it runs on a Redis database and a RabbitMQ virtual host of its own,
# so workers and tests running elsewhere on the same servers cannot take its messages.
TUTORIAL_REDIS_URL = os.environ.get("CELERIAC_TEST_GREEN_REDIS_URL", "redis://localhost:6379/11")
TUTORIAL_VHOST = "celeriac-green-tests"

GreenApp = tuple[Path, dict[str, str], str]


def _redis() -> str:
    return require_server("Redis", REDIS_URL, 6379, "CELERIAC_TEST_REDIS_URL")


def _amqp() -> str:
    return require_server("RabbitMQ", AMQP_URL, 5672, "CELERIAC_TEST_AMQP_URL")


def _vhost_reachable(url: str) -> bool:
    import pika  # type: ignore[import-untyped,unused-ignore]

    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except Exception:
        return False
    return True


def _tutorial_amqp_url() -> str:
    """The RabbitMQ URL of the tutorial's own virtual host, created with ``rabbitmqctl`` the
    first time (the default vhost when rabbitmqctl is not there)."""
    base = urlsplit(_amqp())
    url = urlunsplit(base._replace(path="/" + TUTORIAL_VHOST))
    if _vhost_reachable(url):
        return url
    if shutil.which("rabbitmqctl") is None:
        return urlunsplit(base)
    for command in (["add_vhost", TUTORIAL_VHOST],
                    ["set_permissions", "-p", TUTORIAL_VHOST, base.username or "guest", ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", "-q", *command], capture_output=True, timeout=120, check=False)
    assert _vhost_reachable(url), f"could not create the RabbitMQ virtual host {TUTORIAL_VHOST!r}"
    return url


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate()`` every 50 ms until it returns a true value, and return that value.

    ``timeout`` is in seconds; raises ``AssertionError`` naming ``what`` when it runs out.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def find_examples(start: Path) -> Path:
    """The ``examples`` folder (holding ``tutorial.py``) in the nearest parent of ``start``.

    Raises ``FileNotFoundError`` when no parent has one (the kit runs from a source checkout).
    """
    for parent in start.resolve().parents:
        if (parent / "examples" / "tutorial.py").is_file():
            return parent / "examples"
    raise FileNotFoundError(f"no examples/tutorial.py in any parent folder of {start}")


# -- the patching hook and the pool itself, without a broker ----------------------------------------

def patch_probe(pool: str) -> str:
    """Python source that imports ``ssl``, patches with ``pool``'s ``early_init`` and prints one
    JSON line: patched before/after, the late imports, the description, ``socket``'s module."""
    return f"""
import json, ssl, sys, threading
from celeriac.plugins.manager import pool_factory
factory = pool_factory({pool!r})
before = factory.patched
factory.early_init()
import socket
print(json.dumps({{"before": before, "patched": factory.patched, "late": list(factory.patched_late),
                  "description": factory.description, "socket": socket.socket.__module__}}))
"""


def pool_probe(pool: str) -> str:
    """Python source that drives a ``pool`` pool directly (queueing, grow/shrink, warm stop, a
    soft limit, a cold stop) and prints what it saw as one JSON line."""
    return f"""
import json, time
from celeriac.plugins.manager import pool_factory
factory = pool_factory({pool!r})
factory.early_init()
from celeriac.exceptions import SoftTimeLimitExceeded
pool = factory(concurrency=2)
done, seen = [], {{}}

def job(i, delay):
    seen[i] = pool.running
    try:
        time.sleep(delay)
    except SoftTimeLimitExceeded:
        return ("interrupted", i)
    return ("ok", i)

handles = [pool.apply_async(job, (i, 0.2), done.append) for i in range(5)]
time.sleep(0.01)
out = {{"running": pool.running, "waiting": pool.waiting}}
pool.grow(2)
out["grown"] = pool.concurrency
time.sleep(0.01)
out["running_after_grow"] = pool.running
pool.shrink(10)
out["shrunk"] = pool.concurrency
pool.stop(wait=True)
out["warm"] = sorted(map(list, done))
long = pool.apply_async(job, (9, 5.0), done.append)
time.sleep(0.05)
out["soft"] = pool.raise_soft_timeout(long, SoftTimeLimitExceeded)
time.sleep(0.05)
out["after_soft"] = list(done[-1])
out["soft_again"] = pool.raise_soft_timeout(long, SoftTimeLimitExceeded)
stuck = pool.apply_async(job, (10, 30.0), done.append)
time.sleep(0.05)
started = time.monotonic()
pool.stop(wait=False)
out["cold_took"] = time.monotonic() - started
out["cold_result"] = type(done[-1]).__name__
print(json.dumps(out))
"""


# -- limits, shutdowns, redelivery: the app the workers run ------------------------------------------

#: The test app's source: its broker, backend, queue and tally file come from ``GREEN_*``
#: environment variables.
APP = """
import os, socket, time
from celeriac import Celeriac
from celeriac.exceptions import SoftTimeLimitExceeded

app = Celeriac("greenapp", broker=os.environ["GREEN_BROKER"], backend=os.environ["GREEN_BACKEND"])
app.conf.task_default_queue = os.environ["GREEN_QUEUE"]
app.conf.broker_transport_options = {"global_keyprefix": os.environ["GREEN_QUEUE"] + "_"}
app.conf.result_backend_transport_options = {"global_keyprefix": os.environ["GREEN_QUEUE"] + "_"}
TALLY = os.environ["GREEN_TALLY"]


def note(text):
    fd = os.open(TALLY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\\n").encode())
    finally:
        os.close(fd)


@app.task(soft_time_limit=0.5)
def soft():
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "not interrupted"


@app.task(time_limit=0.5)
def hard():
    time.sleep(10)
    return "not killed"


@app.task
def where():
    return socket.socket.__module__


@app.task
def guarded(delay):
    note("start guarded")
    try:
        time.sleep(delay)
    except Exception:  # a task's usual safety net: terminate must go through it
        note("caught guarded")
        return "caught"
    note("end guarded")
    return "slept"


@app.task(acks_late=True)
def slow(i, delay):
    note(f"start {i} {os.getpid()}")
    if os.path.exists(TALLY + f".done{i}"):
        delay = 0.05  # a redelivery: finish at once
    open(TALLY + f".done{i}", "w").close()
    time.sleep(delay)
    note(f"end {i} {os.getpid()}")
    return i
"""


def _delete_redis_keys(prefix: str) -> None:
    """Delete the test's keys (its ``global_keyprefix``) from the test Redis, if it is up."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except redis.RedisError:
        pass


def _client(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], module: str) -> Any:
    for key, value in env.items():  # the app module reads them at import
        monkeypatch.setenv(key, value)
    return importlib.import_module(module)


def _tally(cwd: Path, word: str) -> list[str]:
    path = cwd / "tally"
    if not path.exists():
        return []
    return [line.split()[1] for line in path.read_text().splitlines() if line.startswith(word + " ")]


class GreenPoolConformance:
    """Subclass in a test module and set :attr:`pool` (see the module docstring)."""

    #: The pool's name for ``-P`` (``"gevent"``); ``socket.socket.__module__`` of a process the
    #: pool has patched must start with it too.
    pool: ClassVar[str] = ""
    #: The folder holding ``tutorial.py``; None finds it above the subclass's test module
    #: (:func:`find_examples`).
    examples_dir: ClassVar[Path | None] = None

    @pytest.fixture(autouse=True)
    def _named_pool(self) -> None:
        """Fail every test at once when the subclass did not name its pool."""
        if not self.pool:
            pytest.fail(f"{type(self).__name__} must set `pool` (the name given to -P).")

    @pytest.fixture
    def green_app(self, tmp_path: Path) -> Iterator[GreenApp]:
        """Writes the test app; yields (directory, worker environment, module name)."""
        name = f"greenapp_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(APP)
        queue = f"celeriac-green-{uuid.uuid4().hex[:10]}"
        env = {"GREEN_QUEUE": queue, "GREEN_TALLY": str(tmp_path / "tally")}
        sys.path.insert(0, str(tmp_path))
        try:
            yield tmp_path, env, name
        finally:
            sys.path.remove(str(tmp_path))
            module = sys.modules.pop(name, None)
            if module is not None:
                module.app.close()
            _delete_redis_keys(queue + "_")

    def spawn(self, cwd: Path, env: dict[str, str], module: str, tag: str,
              concurrency: int = 100) -> WorkerProcess:
        """Start ``celeriac -A module worker -P POOL -c concurrency`` in ``cwd`` and wait until it is
        ready; its log is ``cwd/TAG.log`` and its node name ``worker.nodename``. Fails the test
        when the worker does not start."""
        full = {**os.environ, **env, "PYTHONPATH": str(cwd)}
        name = f"{tag}-{uuid.uuid4().hex[:6]}"
        argv = [*CELERIAC, "-A", module, "worker", "-l", "info", "-P", self.pool, "-c", str(concurrency),
                "-n", f"{name}@%h"]
        worker = WorkerProcess(argv, str(cwd), full, str(cwd / f"{tag}.log"))
        worker.wait_ready()
        worker.nodename = f"{name}@{socket.gethostname()}"  # type: ignore[attr-defined]
        return worker

    # -- the patching hook and the pool, without a broker ---------------------------------------

    def test_early_init_patches_and_reports_a_late_ssl_import(self) -> None:
        out = subprocess.run([sys.executable, "-c", patch_probe(self.pool)], capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["before"] is False and got["patched"] is True
        assert got["socket"].startswith(self.pool)
        assert "ssl" in got["late"]
        assert "monkey-patched" in got["description"] and "late" in got["description"]

    def test_pool_queues_beyond_its_limit_grows_shrinks_interrupts_and_stops(self) -> None:
        out = subprocess.run([sys.executable, "-c", pool_probe(self.pool)], capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["running"] == 2 and got["waiting"] == 3
        assert got["grown"] == 4 and got["running_after_grow"] == 4
        assert got["shrunk"] == 1
        assert got["warm"] == [["ok", i] for i in range(5)]
        assert got["soft"] is True and got["after_soft"] == ["interrupted", 9]
        assert got["soft_again"] is False  # the job has ended
        assert got["cold_took"] < 2 and got["cold_result"] == "Reject"

    # -- the guide's tutorial -------------------------------------------------------------------

    @pytest.mark.parametrize("broker", ["redis", "amqp"])
    def test_the_repository_tutorial(self, broker: str) -> None:
        """``examples/tutorial.py`` (every call of the tutorial, inspect and revoke included) with
        its worker on ``-P POOL``: Redis as broker and backend, or RabbitMQ with ``rpc://``."""
        examples = self.examples_dir or find_examples(Path(inspect.getfile(type(self))))
        if broker == "redis":
            url = require_server("Redis", TUTORIAL_REDIS_URL, 6379, "CELERIAC_TEST_GREEN_REDIS_URL")
            env = {"CELERIAC_BROKER_URL": url, "CELERIAC_RESULT_BACKEND": url}
        else:
            env = {"CELERIAC_BROKER_URL": _tutorial_amqp_url(), "CELERIAC_RESULT_BACKEND": "rpc://"}
        done = subprocess.run([sys.executable, "-m", "celeriac.testing.green_tutorial", self.pool, str(examples)],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=150,
                              check=False)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        assert "All tutorial calls gave the expected answers." in done.stdout
        assert f"({self.pool}" in done.stdout  # the banner names the pool

    # -- limits, shutdowns, redelivery ----------------------------------------------------------

    def test_time_limits_inspect_active_and_warm_shutdown_on_redis(
            self, green_app: GreenApp, monkeypatch: pytest.MonkeyPatch) -> None:
        cwd, env, module = green_app
        url = _redis()
        env = {**env, "GREEN_BROKER": url, "GREEN_BACKEND": url}
        worker = self.spawn(cwd, env, module, "limits")
        try:
            mod = _client(monkeypatch, env, module)
            assert mod.where.delay().get(timeout=15).startswith(self.pool)  # the task ran patched
            assert mod.soft.delay().get(timeout=15) == "soft limit caught"
            hard = mod.hard.delay()
            with pytest.raises(TimeLimitExceeded):
                hard.get(timeout=15)
            assert hard.state == "FAILURE"
            # remote control resizes the pool
            only = [worker.nodename]  # type: ignore[attr-defined]
            replies = mod.app.control.broadcast("pool_grow", arguments={"n": 5}, destination=only, reply=True,
                                                timeout=2.5)
            assert replies and all("ok" in next(iter(r.values())) for r in replies), replies
            stats = mod.app.control.inspect(destination=only, timeout=2.5).stats() or {}
            assert [info["pool"]["max-concurrency"] for info in stats.values()] == [105], stats
            # the worker goes on: three acks_late tasks run at once, and inspect sees them
            results = [mod.slow.delay(i, 4.0) for i in range(3)]
            wait_for(lambda: len(_tally(cwd, "start")) == 3, 15, "three running tasks")
            active = mod.app.control.inspect(destination=only, timeout=2.5).active() or {}
            running = {task["id"] for tasks in active.values() for task in tasks}
            assert {r.id for r in results} <= running, active
            # warm shutdown waits for them
            os.killpg(worker.proc.pid, signal.SIGTERM)
            assert worker.proc.wait(20) == 0
            assert sorted(_tally(cwd, "end")) == ["0", "1", "2"]
            assert [r.get(timeout=10) for r in results] == [0, 1, 2]
            assert "Warm shutdown" in worker.log()
        finally:
            worker.stop()

    def test_revoke_terminate_ends_the_running_task_revoked_and_the_worker_goes_on(
            self, green_app: GreenApp, monkeypatch: pytest.MonkeyPatch) -> None:
        """``revoke(id, terminate=True)`` raises ``Terminated`` in the task's green thread, which
        the task's ``except Exception`` does not catch (as Celery's ``GreenletExit``): the reply
        names the task, the result is REVOKED, the task never reaches its end, the message is
        acked (nothing is redelivered) and the pool slot is free again."""
        cwd, env, module = green_app
        url = _redis()
        env = {**env, "GREEN_BROKER": url, "GREEN_BACKEND": url}
        worker = self.spawn(cwd, env, module, "terminate", concurrency=1)
        try:
            mod = _client(monkeypatch, env, module)
            running = mod.guarded.delay(30.0)
            wait_for(lambda: _tally(cwd, "start") == ["guarded"], 15, "the task to start")
            only = [worker.nodename]  # type: ignore[attr-defined]
            replies = mod.app.control.revoke(running.id, terminate=True, signal="SIGKILL", destination=only,
                                             reply=True, timeout=2.5)
            assert [next(iter(r.values())) for r in replies] == [{"ok": f"terminate: {running.id}"}], replies
            with pytest.raises(TaskRevokedError):
                running.get(timeout=10)
            assert running.state == "REVOKED"
            assert mod.where.delay().get(timeout=15).startswith(self.pool)  # the one slot is free
            assert _tally(cwd, "start") == ["guarded"]  # not redelivered
            assert _tally(cwd, "end") == [] and _tally(cwd, "caught") == []
            assert "terminated (signal 9)" in worker.log()
        finally:
            worker.stop()

    def test_cold_shutdown_and_kill_9_redeliver_acks_late_work_on_rabbitmq(
            self, green_app: GreenApp, monkeypatch: pytest.MonkeyPatch) -> None:
        cwd, env, module = green_app
        env = {**env, "GREEN_BROKER": _amqp(), "GREEN_BACKEND": "rpc://"}
        first = self.spawn(cwd, env, module, "cold")
        workers = [first]
        try:
            mod = _client(monkeypatch, env, module)
            results = [mod.slow.delay(i, 60) for i in range(2)]
            wait_for(lambda: len(_tally(cwd, "start")) == 2, 15, "two running tasks")
            started = time.monotonic()
            os.killpg(first.proc.pid, signal.SIGQUIT)  # cold shutdown: running tasks are killed
            assert first.proc.wait(15) != 0
            assert time.monotonic() - started < 10
            assert "Cold shutdown" in first.log()
            assert _tally(cwd, "end") == []
            # the acks_late messages were not acked: the next worker runs them
            second = self.spawn(cwd, env, module, "second")
            workers.append(second)
            assert sorted(r.get(timeout=20) for r in results) == [0, 1]
            # kill -9 while acks_late work runs: a third worker gets it at once
            more = [mod.slow.delay(i, 60) for i in range(10, 12)]
            wait_for(lambda: {"10", "11"} <= set(_tally(cwd, "start")), 15, "two more running tasks")
            second.kill()
            third = self.spawn(cwd, env, module, "third")
            workers.append(third)
            assert sorted(r.get(timeout=20) for r in more) == [10, 11]
        finally:
            for worker in workers:
                worker.stop()
            mod = sys.modules.get(module)
            if mod is not None:
                mod.app.broker.delete_queue(env["GREEN_QUEUE"])

    def test_embedded_sqlite_broker_and_backend_keep_few_connections(
            self, green_app: GreenApp, monkeypatch: pytest.MonkeyPatch) -> None:
        """The embedded broker and backend under the patched pool: 200 concurrent tasks, and the
        worker does not keep a database connection per green thread."""
        cwd, env, module = green_app
        env = {**env, "GREEN_BROKER": f"sqlite:///{cwd}/broker.db", "GREEN_BACKEND": f"sqlite:///{cwd}/results.db"}
        worker = self.spawn(cwd, env, module, "sqlite", concurrency=200)
        try:
            assert "the process is monkey-patched)" in worker.log()  # the banner says so
            mod = _client(monkeypatch, env, module)
            started = time.monotonic()
            results = [mod.slow.delay(i, 1.0) for i in range(200)]
            assert [r.get(timeout=30) for r in results] == list(range(200))
            assert time.monotonic() - started < 25  # concurrent, not 200 s
            fd_dir = Path(f"/proc/{worker.proc.pid}/fd")
            if fd_dir.is_dir():
                assert len(list(fd_dir.iterdir())) < 100
        finally:
            worker.stop()

    def test_hundreds_of_concurrent_tasks_on_redis_wait_for_a_connection(
            self, green_app: GreenApp, monkeypatch: pytest.MonkeyPatch) -> None:
        """400 tasks end at the same moment and store their results at once: more than redis-py's
        100 connections, so green threads must wait for a free one instead of failing and retrying."""
        cwd, env, module = green_app
        url = _redis()
        env = {**env, "GREEN_BROKER": url, "GREEN_BACKEND": url}
        worker = self.spawn(cwd, env, module, "many", concurrency=400)
        try:
            mod = _client(monkeypatch, env, module)
            results = [mod.slow.delay(i, 1.0) for i in range(400)]
            assert [r.get(timeout=30) for r in results] == list(range(400))
            assert "Too many connections" not in worker.log()
        finally:
            worker.stop()
