"""AMQP 1.0 (celeriac-qpid) beside AMQP 0-9-1 (celeriac-amqp) on the same RabbitMQ server.

    python bench/amqp10.py                       # 5,000 tasks, 500 round trips, 3 repetitions
    python bench/amqp10.py --tasks 2000 --roundtrips 200 --reps 1

For each protocol, through Celeriac's real command line and a client in its own process:

enqueue    tasks/s one client publishes ``--tasks`` ``noop.delay()`` at, until the last one is
           confirmed by the broker (``app.close()`` waits for it); the first call is not timed.
drain      the ``--tasks`` queued tasks, then ``celeriac worker -P threads -c 8`` started:
           tasks/s from the worker's process start to the last task executed (each task appends
           its ``time.time()`` to a file); also from the first task executed to the last (the
           worker's start-up left out, which weighs a lot on a loaded machine).
roundtrip  ``--roundtrips`` sequential ``add.delay(2, 2).get()`` against that idle worker with
           ``rpc://`` results: p50, p90, p99 in ms.

Medians over ``--reps`` repetitions (the protocols alternate first); the machine's load average
is printed with them, as other work on the machine moves every figure. Every queue is unique to
the run and deleted at the end (over AMQP 0-9-1). Needs RabbitMQ with the ``rabbitmq_amqp1_0``
plugin on 127.0.0.1:5672 (guest/guest) and the celeriac, celeriac-amqp, celeriac-qpid and
celeriac-rpc packages installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

URLS = {
    "amqp 0-9-1": "amqp://guest:guest@127.0.0.1:5672//",
    "amqp 1.0": "qpid://guest:guest@127.0.0.1:5672//",
}

APP = """
import os, time
from celeriac import Celeriac

app = Celeriac("amqp10bench", broker=os.environ["BENCH_BROKER"], backend="rpc://")
app.conf.task_default_queue = os.environ["BENCH_QUEUE"]


@app.task(ignore_result=True)
def noop(i):
    fd = os.open(os.environ["BENCH_TALLY"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{time.time():.6f}\\n".encode())
    finally:
        os.close(fd)


@app.task
def add(x, y):
    return x + y
"""

ENQUEUE = """
import json, sys, time
from amqp10bench import app, noop
n = int(sys.argv[1])
noop.delay(-1)
started = time.perf_counter()
for i in range(n - 1):
    noop.delay(i)
app.close()
print(json.dumps({"rate": (n - 1) / (time.perf_counter() - started)}))
"""

ROUNDTRIP = """
import json, sys, time
from amqp10bench import add
n = int(sys.argv[1])
for _ in range(20):
    add.delay(2, 2).get(timeout=30)
times = []
for _ in range(n):
    started = time.perf_counter()
    assert add.delay(2, 2).get(timeout=30) == 4
    times.append((time.perf_counter() - started) * 1000)
times.sort()
pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
print(json.dumps({"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}))
"""


def _client(code: str, workdir: Path, env: dict[str, str], *args: str, timeout: float) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"client failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _lines(path: Path) -> list[float]:
    if not path.exists():
        return []
    return [float(x) for x in path.read_text().split()]


def one_run(protocol: str, workdir: Path, tasks: int, roundtrips: int, timeout: float) -> dict[str, float]:
    """Enqueue, drain and round trip for one protocol; returns the figures."""
    queue = f"celeriac-bench10-{uuid.uuid4().hex[:10]}"
    tally = workdir / f"tally-{queue}"
    env = {**os.environ, "PYTHONPATH": str(workdir), "BENCH_BROKER": URLS[protocol],
           "BENCH_QUEUE": queue, "BENCH_TALLY": str(tally)}
    figures: dict[str, float] = {}
    try:
        figures["enqueue tasks/s"] = _client(ENQUEUE, workdir, env, str(tasks), timeout=timeout)["rate"]
        log = open(workdir / f"worker-{queue}.log", "w")
        started = time.time()
        worker = subprocess.Popen([sys.executable, "-m", "celeriac", "-A", "amqp10bench", "worker", "-l", "info",
                                   "-P", "threads", "-c", "8", "-n", f"{queue}@%h"], cwd=workdir, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while len(stamps := _lines(tally)) < tasks:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"drain did not finish: {len(stamps)}/{tasks}")
                time.sleep(0.1)
            figures["drain tasks/s (threads x8)"] = (tasks - 1) / (max(stamps) - started)
            figures["  after the first task"] = (tasks - 1) / (max(stamps) - min(stamps))
            got = _client(ROUNDTRIP, workdir, env, str(roundtrips), timeout=timeout)
            figures.update({f"roundtrip {k} ms": v for k, v in got.items()})
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, 15)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
                worker.wait(5)
            log.close()
    finally:
        _delete_queue(queue)
    return figures


def _delete_queue(name: str) -> None:
    with contextlib.suppress(Exception):
        import pika

        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
        connection.channel().queue_delete(name)
        connection.close()


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print a table (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--roundtrips", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, list[float]]] = {p: {} for p in URLS}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="amqp10bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "amqp10bench.py").write_text(APP)
        for rep in range(args.reps):
            order = list(URLS) if rep % 2 == 0 else list(reversed(URLS))
            for protocol in order:
                print(f"rep {rep + 1}/{args.reps}: {protocol} ...", file=sys.stderr, flush=True)
                loads.append(os.getloadavg()[0])
                figures = one_run(protocol, workdir, args.tasks, args.roundtrips, args.timeout)
                for key, value in figures.items():
                    results[protocol].setdefault(key, []).append(value)
    keys = list(results["amqp 1.0"])
    print(f"\n{args.tasks} tasks, {args.roundtrips} round trips, median of {args.reps}; "
          f"RabbitMQ on 127.0.0.1:5672, {os.cpu_count()} CPUs, load average {min(loads):.1f}-{max(loads):.1f}\n")
    print(f"| {'metric':<28} | {'AMQP 0-9-1 (pika)':>18} | {'AMQP 1.0 (proton)':>18} |")
    print(f"|{'-' * 30}|{'-' * 20}|{'-' * 20}|")
    for key in keys:
        cells = []
        for protocol in URLS:
            values = results[protocol].get(key, [])
            cells.append(f"{statistics.median(values):,.1f}" if values else "-")
        print(f"| {key:<28} | {cells[0]:>18} | {cells[1]:>18} |")
    if args.json:
        summary: dict[str, Any] = {p: {k: v for k, v in r.items()} for p, r in results.items()}
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
