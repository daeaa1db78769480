"""Green pools under load: ``-P gevent`` and ``-P eventlet`` through the real ``celeriac`` CLI.

Two workloads, on Redis (Redis results) and on RabbitMQ (``rpc://`` results):

- ``sleep``: 1,000 tasks that each ``time.sleep(1)`` (patched: the greenlet yields), with
  ``-c 1000``; the goal is all done in under 3 s;
- ``http``: 1,000 tasks that each make one HTTP GET (``urllib``) to a local server started by
  this script, which answers after ``--http-delay`` seconds (0.2 by default), with ``-c 500``;
  the goal is all done in under 5 s.

Each workload runs two ways:

- ``drain``: the tasks are queued first, then the worker is started; ``worker`` is the time
  from its ``ready.`` log line to its last ``succeeded`` log line (the pool's own speed: the
  goal applies to it), ``client`` from ``ready.`` to the last result received by the client;
- ``live``: the worker is running; both figures start at the first publish, with the client
  publishing from ``--publishers`` threads (on RabbitMQ, publisher confirms make publishing
  itself take a while on a small machine: it is reported too).

    python bench/green.py                                   # everything
    python bench/green.py --pools gevent --brokers redis --only sleep

Figures go to stdout as a table and, with ``--output``, to a JSON file. Each run uses its own
queue and Redis key prefix, and deletes them at the end. Needs Redis on 127.0.0.1:6379 and
RabbitMQ (guest/guest) on 127.0.0.1:5672 (``CELERIAC_BENCH_REDIS_URL``, ``CELERIAC_BENCH_AMQP_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

APP = '''
import os, time, urllib.request
from celeriac import Celeriac

app = Celeriac("greenbench", broker=os.environ["GB_BROKER"], backend=os.environ["GB_BACKEND"])
app.conf.task_default_queue = os.environ["GB_QUEUE"]
app.conf.broker_transport_options = {"global_keyprefix": os.environ["GB_PREFIX"]}
app.conf.result_backend_transport_options = {"global_keyprefix": os.environ["GB_PREFIX"]}
app.conf.result_expires = 600


@app.task(name="green.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task(name="green.fetch")
def fetch(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        response.read()
        return response.status
'''

GOALS = {"sleep": 3.0, "http": 5.0}


@dataclass
class Figure:
    """One measurement."""

    pool: str
    broker: str
    workload: str
    mode: str
    tasks: int
    concurrency: int
    seconds: float | None
    client_seconds: float | None = None
    publish_seconds: float | None = None
    worker_cpu_seconds: float | None = None
    error: str | None = None

    @property
    def verdict(self) -> str:
        """``ok`` when the worker figure is under the goal, ``SLOW`` above it, ``FAILED``
        without a figure."""
        if self.seconds is None:
            return "FAILED"
        return "ok" if self.seconds < GOALS[self.workload] else "SLOW"


_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): INFO/[^\]]*\] (.*)$")


def _log_times(text: str, what: str) -> list[float]:
    """Unix times of the worker's INFO log lines whose message contains ``what``."""
    times = []
    for line in text.splitlines():
        found = _LOG_LINE.match(line)
        if found and what in found.group(3):
            stamp = time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S"))
            times.append(stamp + int(found.group(2)) / 1000)
    return times


# -- the local HTTP server -------------------------------------------------------------------------

async def _serve(port: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if delay:
                await asyncio.sleep(delay)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def http_server(delay: float) -> Iterator[str]:
    """A local HTTP server in a subprocess (so it has its own core); yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--http-delay", str(delay)])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local HTTP server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)


# -- one run -----------------------------------------------------------------------------------------

class Run:
    """One (pool, broker) pair: the app module, its worker, its client."""

    def __init__(self, workdir: Path, pool: str, broker: str, broker_url: str, backend_url: str) -> None:
        self.workdir = workdir
        self.pool = pool
        self.broker = broker
        tag = uuid.uuid4().hex[:8]
        self.module = f"greenbench_{tag}"
        (workdir / f"{self.module}.py").write_text(APP)
        self.env = {"GB_BROKER": broker_url, "GB_BACKEND": backend_url,
                    "GB_QUEUE": f"bench-green-{tag}", "GB_PREFIX": f"bench-green-{tag}_"}
        os.environ.update(self.env)
        sys.path.insert(0, str(workdir))
        self.mod: Any = importlib.import_module(self.module)
        self.worker: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.module}-{pool}-{broker}.log"

    def start_worker(self, concurrency: int) -> None:
        """Start ``celeriac worker -P pool -c concurrency`` (returns at once)."""
        argv = [sys.executable, "-m", "celeriac.cli.main", "-A", self.module, "worker", "-l", "info",
                "-P", self.pool, "-c", str(concurrency), "-n", f"{self.module}@%h"]
        env = {**os.environ, "PYTHONPATH": str(self.workdir)}
        with open(self.log, "wb") as out:
            self.worker = subprocess.Popen(argv, cwd=self.workdir, env=env, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait for the worker's ``ready.`` line; return the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        assert self.worker is not None
        while time.monotonic() < deadline:
            if b" ready." in self.log.read_bytes():
                return time.monotonic()
            if self.worker.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"worker not ready:\n{self.log.read_text(errors='replace')[-3000:]}")

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the worker process has used so far (Linux), else None."""
        try:
            assert self.worker is not None
            fields = Path(f"/proc/{self.worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
        except (OSError, AssertionError, IndexError, ValueError):
            return None

    def stop_worker(self) -> None:
        """Warm shutdown, SIGKILL after 30 s."""
        worker, self.worker = self.worker, None
        if worker is None or worker.poll() is not None:
            return
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)

    def publish(self, workload: str, count: int, arg: Any, publishers: int) -> list[Any]:
        """Send ``count`` tasks from ``publishers`` threads; return their results in order."""
        task = self.mod.sleep if workload == "sleep" else self.mod.fetch
        results: list[Any] = [None] * count

        def send(start: int) -> None:
            for i in range(start, count, publishers):
                results[i] = task.delay(arg)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(publishers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    def collect(self, results: list[Any], timeout: float) -> None:
        """Wait for every result (raises on a failure or the timeout)."""
        from celeriac.result import ResultSet

        ResultSet(results).get(timeout=timeout)

    def close(self) -> None:
        """Stop the worker and delete this run's queue and Redis keys."""
        self.stop_worker()
        app = self.mod.app
        with contextlib.suppress(Exception):
            if self.broker == "amqp":
                app.broker.delete_queue(self.env["GB_QUEUE"])
            else:
                import redis

                client = redis.Redis.from_url(self.env["GB_BROKER"])
                keys = list(client.scan_iter(match=self.env["GB_PREFIX"] + "*", count=1000))
                for i in range(0, len(keys), 500):
                    client.delete(*keys[i:i + 500])
                client.close()
        with contextlib.suppress(Exception):
            app.close()
        sys.path.remove(str(self.workdir))
        sys.modules.pop(self.module, None)


def measure(run: Run, workload: str, mode: str, tasks: int, concurrency: int, arg: Any,
            publishers: int, timeout: float) -> Figure:
    """One figure: ``drain`` (queued before the worker starts) or ``live``."""
    figure = Figure(run.pool, run.broker, workload, mode, tasks, concurrency, None)
    try:
        if mode == "drain":
            started = time.monotonic()
            results = run.publish(workload, tasks, arg, publishers)
            figure.publish_seconds = round(time.monotonic() - started, 3)
            run.start_worker(concurrency)
            ready = run.wait_ready()
            run.collect(results, timeout)
            figure.client_seconds = round(time.monotonic() - ready, 3)
            log = run.log.read_text(errors="replace")
            origin = _log_times(log, " ready.")[0]
        else:
            run.start_worker(concurrency)
            run.wait_ready()
            time.sleep(0.5)  # let it settle
            started = time.monotonic()
            origin = time.time()
            results = run.publish(workload, tasks, arg, publishers)
            figure.publish_seconds = round(time.monotonic() - started, 3)
            run.collect(results, timeout)
            figure.client_seconds = round(time.monotonic() - started, 3)
            log = run.log.read_text(errors="replace")
        figure.worker_cpu_seconds = run.cpu_seconds()
        done = _log_times(log, "] succeeded in ")
        if len(done) != tasks:
            raise RuntimeError(f"the worker logged {len(done)} successes for {tasks} tasks")
        figure.seconds = round(max(done) - origin, 3)
    except Exception as exc:
        figure.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        run.stop_worker()
    return figure


def _show(value: float | None) -> str:
    return f"{value:6.2f}" if value is not None else "     -"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit code 1 when a figure failed (a slow figure is only reported)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", default="gevent,eventlet")
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument("--only", default="sleep,http", help="workloads: sleep, http")
    parser.add_argument("--modes", default="drain,live")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--sleep-concurrency", type=int, default=1000)
    parser.add_argument("--http-concurrency", type=int, default=500)
    parser.add_argument("--http-delay", type=float, default=0.2, help="the server's answer delay, s")
    parser.add_argument("--publishers", type=int, default=8, help="client threads publishing")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--redis-url", default=os.environ.get("CELERIAC_BENCH_REDIS_URL",
                                                              "redis://127.0.0.1:6379/13"))
    parser.add_argument("--amqp-url", default=os.environ.get("CELERIAC_BENCH_AMQP_URL",
                                                             "amqp://guest:guest@127.0.0.1:5672//"))
    parser.add_argument("--output", help="also write the figures to this JSON file")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.http_delay))
        return 0
    workloads = [w for w in args.only.split(",") if w]
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="celeriac-green-bench-") as tmp, \
            http_server(args.http_delay) as url:
        for pool in args.pools.split(","):
            for broker in args.brokers.split(","):
                broker_url = args.redis_url if broker == "redis" else args.amqp_url
                backend_url = args.redis_url if broker == "redis" else "rpc://"
                run = Run(Path(tmp), pool, broker, broker_url, backend_url)
                try:
                    for workload in workloads:
                        concurrency = args.sleep_concurrency if workload == "sleep" else args.http_concurrency
                        arg = 1.0 if workload == "sleep" else url
                        for mode in args.modes.split(","):
                            figure = measure(run, workload, mode, args.tasks, concurrency, arg,
                                             args.publishers, args.timeout)
                            figures.append(figure)
                            print(f"{pool:9} {broker:6} {workload:6} {mode:6} {figure.tasks} tasks "
                                  f"-c {concurrency:<5} worker {_show(figure.seconds)} s "
                                  f"(goal < {GOALS[workload]:.0f} s: {figure.verdict}), client "
                                  f"{_show(figure.client_seconds)} s, publishing {_show(figure.publish_seconds)} s, "
                                  f"worker CPU {_show(figure.worker_cpu_seconds)} s"
                                  f"{'  ' + figure.error if figure.error else ''}", flush=True)
                finally:
                    run.close()
    if args.output:
        Path(args.output).write_text(json.dumps([asdict(f) for f in figures], indent=2))
    return 1 if any(f.seconds is None for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
