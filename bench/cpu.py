"""CPU time per task of one drain, per process and thread of the worker, and of the broker server.

    python bench/cpu.py [--system celeriac|celery|dramatiq] [--pool threads|prefork|solo]
                        [--workers 1] [--broker amqp|redis] [--tasks 20000] [-- EXTRA WORKER ARGS]

Queues ``--tasks`` no-op tasks with the bench's client, starts the worker through its command
line (as ``run.py`` does), and samples ``/proc/<pid>/task/<tid>/stat`` of the worker's process
tree every 50 ms until the last task ran; the broker server's CPU time (``beam.smp`` or
``redis-server``, found with ``pgrep``) is read before and after. Prints the drain rate from
process start, each process's CPU seconds and microseconds per task with its busiest threads,
and the server's, and the share of each process's CPU spent in the kernel (system calls, waking
threads). The worker's CPU includes its start-up (imports, connecting: about 0.3 s), so
use thousands of tasks. Linux only. This is what ``bench/README.md``'s "where the time went" figures
come from; unlike ``profile.py`` nothing traces the processes, so the rates are real.

``--workers N`` starts N independent workers on the queue (hostnames ``cpu1@%h`` ...; the rate is
counted from the first one's start): ``--pool solo --workers 2`` is two processes that each consume
from the broker and run tasks inline, the ceiling of a prefork pool whose children would consume
directly (see bench/README.md, "Children that consume directly").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_apps import SIGNAL_LINE, write_apps  # noqa: E402
from bench_worker import WorkerProcess, _children  # noqa: E402
from run import DEFAULT_AMQP, DEFAULT_REDIS  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SERVER = {"amqp": "beam.smp", "redis": "redis-server"}


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User plus system CPU seconds of a process (or one of its threads) from ``/proc``."""
    user, system = user_system_seconds(pid, tid)
    return user + system


def user_system_seconds(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (or one of its threads) from ``/proc``; a
    process's include its threads that have exited."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def thread_times(pid: int) -> dict[tuple[int, str], float]:
    """{(thread id, thread name): CPU seconds} of every thread of ``pid``."""
    out: dict[tuple[int, str], float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as handle:
                name = handle.read().strip()
            out[(int(tid), name)] = cpu_seconds(pid, int(tid))
        except OSError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", default="celeriac", choices=["celeriac", "celery", "dramatiq"])
    parser.add_argument("--pool", default="threads", choices=["threads", "prefork", "solo"])
    parser.add_argument("--workers", type=int, default=1, help="independent workers (default 1)")
    parser.add_argument("--broker", default="amqp", choices=["amqp", "redis"])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("extra", nargs="*", help="extra worker arguments (after --)")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="celeriac-cpu-"))
    apps = write_apps(tmp / "apps")
    signal = tmp / "drain.signal"
    env = {k: v for k, v in os.environ.items() if k not in ("CELERIAC_BROKER_URL", "CELERIAC_RESULT_BACKEND")}
    env.update(BENCH_BROKER=DEFAULT_AMQP if args.broker == "amqp" else DEFAULT_REDIS, BENCH_BACKEND="",
               BENCH_QUEUE=f"bench-cpu-{uuid.uuid4().hex[:8]}", BENCH_SIGNAL=str(signal),
               PYTHONPATH=str(apps[args.system]))

    def client(action: str, n: int = 0) -> dict[str, float]:
        proc = subprocess.run([sys.executable, str(HERE / "bench_client.py"), args.system, action, str(n)],
                              cwd=apps[args.system], env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{action} failed: {proc.stderr.strip()[-1000:]}")
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    client("purge")
    client("enqueue", args.tasks)
    found = subprocess.run(["pgrep", "-f", SERVER[args.broker]], capture_output=True, text=True).stdout.split()
    server = int(found[0]) if found else None
    server_before = cpu_seconds(server) if server else 0.0
    workers = [WorkerProcess(args.system, apps[args.system], env, args.pool, tmp / f"worker{i}.log",
                             hostname="bench@%h" if args.workers == 1 else f"cpu{i + 1}@%h")
               for i in range(args.workers)]
    for worker in workers:
        worker.cmd += args.extra
        worker.start()
        assert worker.proc is not None
    last: dict[int, dict[tuple[int, str], float]] = {}
    split: dict[int, tuple[float, float]] = {}
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            done = signal.exists() and signal.stat().st_size >= args.tasks * SIGNAL_LINE
            pids = [w.proc.pid for w in workers if w.proc is not None]
            todo = [child for pid in pids for child in _children(pid)]
            while todo:
                child = todo.pop()
                pids.append(child)
                todo += _children(child)
            for pid in pids:
                try:
                    last[pid] = thread_times(pid)
                    split[pid] = user_system_seconds(pid)
                except OSError:
                    pass
            if done:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the drain did not finish within {args.timeout:.0f} s:\n{workers[0].log_tail()}")
            time.sleep(0.05)
        server_cpu = (cpu_seconds(server) - server_before) if server else 0.0
    finally:
        for worker in workers:
            worker.stop()
    stamps = [float(line) for line in signal.read_bytes().split()]
    wall = max(stamps) - min(w.started for w in workers)
    n = args.tasks
    label = f"{args.workers} x " if args.workers > 1 else ""
    print(f"{args.system} {label}{args.pool} on {args.broker}: {n / wall:,.0f} tasks/s from process start "
          f"({wall:.2f} s)")
    total = 0.0
    for pid, threads in last.items():
        seconds = sum(threads.values())
        total += seconds
        busiest = sorted(threads.items(), key=lambda kv: -kv[1])[:4]
        names = ", ".join(f"{name} {value:.2f}" for (_, name), value in busiest if value >= 0.01)
        user, system = split.get(pid, (0.0, 0.0))
        kernel = 100 * system / max(user + system, 1e-9)
        print(f"  pid {pid}: {seconds:.2f} s = {seconds / n * 1e6:.0f} us/task, {kernel:.0f} % in the kernel  "
              f"(threads: {names})")
    print(f"  worker total {total / n * 1e6:.0f} us/task; {SERVER[args.broker]} {server_cpu / n * 1e6:.0f} us/task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
