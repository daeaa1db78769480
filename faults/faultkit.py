"""The fault suite's helpers: brokers under test, a task flow with counts, workers, results.

A scenario writes a small project (``faultproj.py``) whose one task, ``faults.record(n)``,
appends ``S n time`` when it starts and ``D n time`` when it ends to a per-process file. The
test sends numbered tasks (``Flow.send``), starts workers through the real command line, injects
its fault, then counts from those files: tasks sent (``delay()`` returned), completed (distinct
``n`` with a ``D`` line), duplicates (extra ``D`` lines), lost (sent, never completed). Every
scenario runs with ``task_acks_late``: lost must be 0.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celeriac import Celeriac

FULL = os.environ.get("CELERIAC_FAULTS") == "full"
HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("CELERIAC_FAULTS_RESULTS") or HERE / "results")  # where the JSONs go
#: The brokers of the network scenarios (SQLite has no network), and all of them.
NETWORK = ["redis", "amqp", "qpid"]
ALL = ["sqlite", *NETWORK]
HEARTBEAT = 2.0  # broker_heartbeat (AMQP, AMQP 1.0) and socket_timeout-ish bound for Redis, s


def size(short: Any, full: Any) -> Any:
    """``full`` under ``CELERIAC_FAULTS=full``, else ``short``."""
    return full if FULL else short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), 1.0):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# -- brokers ----------------------------------------------------------------------------------


@dataclass
class Target:
    """One broker under test: its name, URL, server port and the settings a test uses."""

    name: str  # sqlite, redis, amqp, qpid
    url: str
    port: int | None
    conf: dict[str, Any] = field(default_factory=dict)

    def proxied(self, proxy_port: int) -> Target:
        """This target reached through a proxy listening on ``proxy_port``."""
        assert self.port is not None
        url = self.url.replace(f"127.0.0.1:{self.port}", f"127.0.0.1:{proxy_port}")
        return Target(self.name, url, proxy_port, self.conf)


def liveness_interval(broker: str) -> float:
    """``--heartbeat-file-interval`` for ``broker``. AMQP 1.0 has no queue-size round trip for
    the file's broker probe, so a half-open connection shows only once proton's idle timeout
    (2 heartbeats) closed it; the file is then stale one interval later: with an interval of 3
    broker heartbeats that is within 2 intervals (docs/liveness.md)."""
    return 3 * HEARTBEAT if broker == "qpid" else HEARTBEAT


def target_conf(name: str, unique: str) -> dict[str, Any]:
    """Settings that isolate one scenario on a shared server and make faults visible quickly."""
    conf: dict[str, Any] = {"task_acks_late": True, "broker_connection_retry": True,
                            "broker_connection_max_retries": 0}
    if name == "sqlite":
        conf["broker_transport_options"] = {"visibility_timeout": 5}
    elif name == "redis":
        conf["broker_transport_options"] = {
            "global_keyprefix": f"faults{unique}_", "visibility_timeout": 10,
            "socket_timeout": HEARTBEAT, "socket_connect_timeout": HEARTBEAT,
            "health_check_interval": 1, "publish_retry_timeout": 60}
    elif name in ("amqp", "qpid"):
        conf["task_default_queue"] = f"faults-{unique}"
        conf["broker_heartbeat"] = HEARTBEAT
        conf["broker_transport_options"] = {"publish_retry_timeout": 60}
    return conf


# -- private servers --------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own on a free loopback port (restart scenarios may kill it)."""

    def __init__(self, directory: Path, appendonly: bool = False) -> None:
        self.port = free_port()
        self.dir = directory
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), 20, f"redis-server on {self.port}")

    def shutdown_nosave(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
                       capture_output=True, timeout=20, check=False)
        if self.proc is not None:
            self.proc.wait(20)
        wait_until(lambda: not port_open(self.port), 20, "redis-server to stop")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


RABBIT_PORT = int(os.environ.get("CELERIAC_FAULTS_RABBIT_PORT", "5673"))
RABBIT_NODE = "faults@localhost" if RABBIT_PORT == 5673 else f"faults{RABBIT_PORT}@localhost"


class PrivateRabbit:
    """A RabbitMQ node of our own (``faults@localhost`` on 5673, AMQP 1.0 plugin enabled), so
    stop_app/start_app never touches the shared node others test against."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="celeriac-faults-rabbit-"))
        self.port = RABBIT_PORT
        self.started_here = False
        self.env = {**os.environ,
                    "RABBITMQ_NODENAME": RABBIT_NODE, "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(self.port + 20000),
                    "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
                    "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(self.base / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                    "RABBITMQ_PID_FILE": str(self.base / "pid")}

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["rabbitmqctl", "-n", RABBIT_NODE, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        if port_open(self.port):  # left running by an earlier session: reuse it
            return
        if shutil.which("rabbitmq-server") is None:
            pytest.skip("rabbitmq-server is not installed: no private RabbitMQ node")
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text("[rabbitmq_amqp1_0].\n")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n")
        shutil.chown(self.base, "rabbitmq", "rabbitmq") if os.geteuid() == 0 else None
        if os.geteuid() == 0:
            for path in self.base.rglob("*"):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, capture_output=True,
                       timeout=60, check=False)
        self.started_here = True
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.ctl("await_startup", timeout=60).returncode == 0 and port_open(self.port):
                return
            time.sleep(1)
        pytest.fail(f"the private RabbitMQ node did not start; see {self.base / 'log'}")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        wait_until(lambda: port_open(self.port), 60, "the private RabbitMQ node's listener")

    def stop(self) -> None:
        if self.started_here:
            self.ctl("stop", timeout=60)
            shutil.rmtree(self.base, ignore_errors=True)


# -- the project and the flow -----------------------------------------------------------------

PROJECT = textwrap.dedent('''
    """The fault suite's project: one task that records when it starts and ends."""
    import json, os, time
    from celeriac import Celeriac

    app = Celeriac("faultproj", broker=os.environ["FAULTS_BROKER"])
    app.conf.update(json.loads(os.environ.get("FAULTS_CONF", "{}")))
    OUT = os.environ["FAULTS_OUT"]
    _fd = []

    def _write(line):
        if not _fd:
            _fd.append(os.open(os.path.join(OUT, "record-%d.log" % os.getpid()),
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        os.write(_fd[0], line.encode())

    @app.task(name="faults.record")
    def record(n, sleep=0.0):
        _write("S %d %.3f\\n" % (n, time.time()))
        if sleep:
            time.sleep(sleep)
        _write("D %d %.3f\\n" % (n, time.time()))
''')


class Worker:
    """A worker process started through ``python -m celeriac ... worker``."""

    def __init__(self, flow: Flow, name: str, target: Target, extra: list[str]) -> None:
        self.name = name
        self.node = f"{name}@{socket.gethostname()}"
        self.log_path = flow.dir / f"{name}.log"
        self.heartbeat_file = flow.dir / f"{name}.alive"
        self.interval = liveness_interval(target.name)
        env = {**os.environ, "PYTHONPATH": str(flow.dir), "FAULTS_BROKER": target.url,
               "FAULTS_CONF": json.dumps(target.conf), "FAULTS_OUT": str(flow.dir),
               "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "celeriac", "-A", "faultproj", "worker", "-l", "info",
                "-P", "threads", "-c", str(flow.concurrency), "-n", self.node,
                "--heartbeat-file", str(self.heartbeat_file), "--heartbeat-file-interval",
                str(self.interval), *extra]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(argv, cwd=flow.dir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        start = self.log().count(" ready.")

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"worker {self.name} exited:\n{self.log()[-3000:]}")
            return self.log().count(" ready.") > start - 1 and " ready." in self.log()
        wait_until(ready, timeout, f"worker {self.name} to be ready")

    def heartbeat_age(self) -> float:
        try:
            return time.time() - self.heartbeat_file.stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(20)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Flow:
    """Numbered tasks sent by a client, run by workers, counted from the record files."""

    def __init__(self, directory: Path, target: Target, scenario: str, concurrency: int = 4) -> None:
        self.dir = directory
        self.target = target
        self.scenario = scenario
        self.concurrency = concurrency
        (directory / "faultproj.py").write_text(PROJECT)
        self.workers: list[Worker] = []
        self.sent: set[int] = set()
        self.refused: list[str] = []  # delay() raised: the error messages
        self._next = 0
        self._lock = threading.Lock()
        self.client = self.make_client(target)
        self.started = time.time()
        self.events: list[tuple[str, float]] = []  # (what, time.time())
        self.extra: dict[str, Any] = {}

    @staticmethod
    def make_client(target: Target) -> Celeriac:
        app = Celeriac("faultclient", broker=target.url)
        app.conf.update(target.conf)
        return app

    def note(self, what: str) -> float:
        now = time.time()
        self.events.append((what, now))
        return now

    # workers
    def worker(self, name: str, target: Target | None = None, extra: list[str] | None = None,
               ready: bool = True) -> Worker:
        w = Worker(self, name, target or self.target, extra or [])
        self.workers.append(w)
        if ready:
            w.wait_ready()
        return w

    # sending
    def send(self, count: int, rate: float | None = None, client: Celeriac | None = None,
             sleep: float = 0.0) -> int:
        """Send ``count`` tasks (``rate`` per second if given); return how many were accepted.
        A ``delay()`` that raises is counted as refused with its message, never as sent."""
        app = client or self.client
        accepted = 0
        begin = time.monotonic()
        for i in range(count):
            with self._lock:
                n = self._next
                self._next += 1
            try:
                app.send_task("faults.record", args=[n], kwargs={"sleep": sleep} if sleep else None)
            except Exception as exc:
                self.refused.append(f"{exc.__class__.__name__}: {exc}")
                continue
            with self._lock:
                self.sent.add(n)
            accepted += 1
            if rate:
                ahead = begin + (i + 1) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        return accepted

    def send_in_thread(self, count: int, rate: float | None = None, **kw: Any) -> threading.Thread:
        thread = threading.Thread(target=self.send, args=(count, rate), kwargs=kw, daemon=True)
        thread.start()
        return thread

    # counting
    def records(self) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
        """``(starts, dones)``: for each task number, the times of its S and D lines."""
        starts: dict[int, list[float]] = {}
        dones: dict[int, list[float]] = {}
        for path in self.dir.glob("record-*.log"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) != 3:
                    continue  # a line cut by a SIGKILL
                into = starts if parts[0] == "S" else dones
                into.setdefault(int(parts[1]), []).append(float(parts[2]))
        return starts, dones

    def completed(self) -> set[int]:
        return set(self.records()[1])

    def drain(self, timeout: float) -> None:
        """Wait until every sent task completed (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sent <= self.completed():
                return
            time.sleep(0.25)

    def first_done_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first completion after it."""
        after = [t for times in self.records()[1].values() for t in times if t > moment]
        return round(min(after) - moment, 2) if after else None

    def longest_gap(self, begin: float, end: float) -> float:
        """The longest time without a completion between ``begin`` and ``end``."""
        times = sorted(t for ts in self.records()[1].values() for t in ts if begin <= t <= end)
        points = [begin, *times, end]
        return round(max(b - a for a, b in itertools.pairwise(points)), 2)

    def figures(self) -> dict[str, Any]:
        _, dones = self.records()
        completed = set(dones) & self.sent
        return {"sent": len(self.sent), "completed": len(completed),
                "duplicates": sum(len(v) - 1 for n, v in dones.items() if n in self.sent),
                "lost": len(self.sent - set(dones)), "refused": len(self.refused)}

    def finish(self, recovery_s: float | None, drain: float = 120.0, **extra: Any) -> dict[str, Any]:
        """Drain, stop the workers, write the scenario's JSON and return its figures."""
        self.drain(drain)
        for w in self.workers:
            w.stop()
        figures = self.figures()
        trouble = [log_trouble(w.log()) for w in self.workers]
        self.extra["log"] = {key: sum(t[key] for t in trouble) for key in ("tracebacks", "problem_lines")}
        figures.update(broker=self.target.name, scenario=self.scenario, mode="full" if FULL else "short",
                       recovery_s=recovery_s, duration_s=round(time.time() - self.started, 1),
                       refused_errors=sorted(set(self.refused))[:3], **self.extra, **extra)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{self.target.name}-{self.scenario}.json"
        out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        return figures

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        with contextlib.suppress(Exception):
            self.client.close()


def log_trouble(text: str) -> dict[str, int]:
    """Tracebacks and WARNING/ERROR/CRITICAL lines in a worker log (the storm check)."""
    return {"tracebacks": text.count("Traceback (most recent call last)"),
            "problem_lines": len(re.findall(r"^\[[^\]]*: (?:WARNING|ERROR|CRITICAL)/", text, re.M))}


def assert_calm(flow: Flow, events: int, per_event: int = 4) -> dict[str, int]:
    """Every worker recovered by itself, saying so in a few lines per event, no traceback."""
    total = {"tracebacks": 0, "problem_lines": 0}
    for w in flow.workers:
        trouble = log_trouble(w.log())
        for key in total:
            total[key] += trouble[key]
    flow.extra["log"] = total
    text = "\n".join(w.log()[-3000:] for w in flow.workers)
    assert total["tracebacks"] == 0, f"tracebacks in the worker log:\n{text}"
    assert total["problem_lines"] <= per_event * max(1, events) + 4, f"a storm of log lines:\n{text}"
    return total


def unique() -> str:
    return uuid.uuid4().hex[:8]


@contextlib.contextmanager
def flow_for(tmp_path: Path, target: Target, scenario: str, **kw: Any) -> Iterator[Flow]:
    flow = Flow(tmp_path, target, scenario, **kw)
    try:
        yield flow
    finally:
        flow.close()
