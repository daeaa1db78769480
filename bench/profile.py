"""Profile Celeriac's hot paths with py-spy on the bench's workloads and print where the time goes.

    python bench/profile.py [--broker redis|amqp|sqlite] [--tasks 20000] [--roundtrips 2000]
                            [--out bench/results/profile]

Needs ``py-spy`` (``pip install py-spy``) and permission to trace child processes (root, or
``kernel.yama.ptrace_scope=0``). Three recordings, each a collapsed-stack file in ``--out``:

``drain-worker``      the worker draining N queued no-op tasks (threads pool, x8)
``roundtrip-worker``  an idle worker serving sequential ``add.delay(2, 2).get()``
``roundtrip-client``  the client making those round trips
``enqueue-client``    the client publishing N tasks

Samples are taken only from the thread holding the GIL (``--gil``): Python CPU time, not waiting.
For each, the top functions by own time ("self", the frame on top of the stack) and by inclusive
time ("total", anywhere on the stack) are printed, as percentages of the samples.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_apps import SIGNAL_LINE, write_apps  # noqa: E402
from bench_worker import cli_path  # noqa: E402
from run import DEFAULT_AMQP, DEFAULT_REDIS  # noqa: E402


def pyspy() -> str:
    """The py-spy executable beside this interpreter, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else "py-spy"


def summarize(raw: Path, top: int = 15) -> str:
    """Top functions by self and by total share of the samples in a py-spy ``raw`` file."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        # "func (file:line)" -> "func (file)": a function's lines are counted together.
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{raw.stem}: {samples} samples"]
    for title, counter in (("self", own), ("total", total)):
        lines.append(f"  top by {title}:")
        for frame, count in counter.most_common(top):
            lines.append(f"    {100.0 * count / max(samples, 1):5.1f}%  {frame}")
    return "\n".join(lines)


def record(out: Path, cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` under ``py-spy record`` writing collapsed stacks to ``out``."""
    spy = [pyspy(), "record", "--format", "raw", "--rate", "250", "--gil", "--nonblocking", "-o", str(out), "--"]
    return subprocess.Popen(spy + cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def worker_pid(spy: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """The pid of the worker that py-spy started (its child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{spy.pid}/task/{spy.pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise RuntimeError("py-spy did not start the worker")


def wait_log(path: Path, text: str, timeout: float) -> None:
    """Wait until ``text`` appears in the file at ``path``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{text!r} not in {path} after {timeout} s")


def run_all(args: argparse.Namespace, app_dir: Path, env: dict[str, str], client: list[str],
            worker_cmd: list[str], signal_file: Path, backend: str, queue: str, tmp: Path,
            outputs: list[Path], spies: list[subprocess.Popen[bytes]]) -> None:
    """Record the enqueue, drain and round-trip workloads (every py-spy process goes in ``spies``)."""

    # enqueue (client) + drain (worker)
    subprocess.run(client + ["purge"], cwd=app_dir, env=env, check=True, capture_output=True)
    enqueue_out = args.out / f"enqueue-client-{args.broker}.txt"
    spy = record(enqueue_out, client + ["enqueue", str(args.tasks)], app_dir, env)
    spies.append(spy)
    spy.wait(600)
    outputs.append(enqueue_out)
    drain_out = args.out / f"drain-worker-{args.broker}.txt"
    log = tmp / "drain.log"
    with open(log, "wb") as handle:
        spy = subprocess.Popen([pyspy(), "record", "--format", "raw", "--rate", "250", "--gil", "--nonblocking",
                                "-o", str(drain_out), "--", *worker_cmd], cwd=app_dir, env=env,
                               stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    spies.append(spy)
    pid = worker_pid(spy)
    deadline = time.monotonic() + 600
    while (signal_file.stat().st_size if signal_file.exists() else 0) < args.tasks * SIGNAL_LINE:
        if time.monotonic() > deadline or spy.poll() is not None:
            raise RuntimeError(f"drain did not finish: {log.read_text()[-2000:]}")
        time.sleep(0.01)
    os.kill(pid, signal.SIGTERM)
    spy.wait(60)
    outputs.append(drain_out)

    # round trips: the worker and the client, each under py-spy
    env.update(BENCH_BACKEND=backend, BENCH_QUEUE=queue + "-rt")
    subprocess.run(client + ["purge"], cwd=app_dir, env=env, check=True, capture_output=True)
    rt_worker_out = args.out / f"roundtrip-worker-{args.broker}.txt"
    log = tmp / "roundtrip.log"
    with open(log, "wb") as handle:
        spy = subprocess.Popen([pyspy(), "record", "--format", "raw", "--rate", "250", "--gil", "--nonblocking",
                                "-o", str(rt_worker_out), "--", *worker_cmd], cwd=app_dir, env=env,
                               stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    spies.append(spy)
    pid = worker_pid(spy)
    wait_log(log, " ready." if args.loglevel.lower() in ("info", "debug") else "[Tasks]", 60)
    rt_client_out = args.out / f"roundtrip-client-{args.broker}.txt"
    client_spy = record(rt_client_out, client + ["roundtrip", str(args.roundtrips)], app_dir, env)
    spies.append(client_spy)
    client_spy.wait(600)
    os.kill(pid, signal.SIGTERM)
    spy.wait(60)
    outputs += [rt_worker_out, rt_client_out]


def main() -> int:
    """Record the workloads and print the summaries."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default="redis", choices=["redis", "amqp", "sqlite"])
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--roundtrips", type=int, default=2000)
    p.add_argument("--redis-url", default=os.environ.get("CELERIAC_BENCH_REDIS_URL", DEFAULT_REDIS))
    p.add_argument("--amqp-url", default=os.environ.get("CELERIAC_BENCH_AMQP_URL", DEFAULT_AMQP))
    p.add_argument("--out", type=Path, default=HERE / "results" / "profile")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--loglevel", default="info", help="the workers' -l (info logs two lines per task)")
    p.add_argument("--summarize", nargs="+", type=Path, metavar="RAW",
                   help="only print the summaries of existing py-spy raw files")
    args = p.parse_args()
    if args.summarize:
        for path in args.summarize:
            print(summarize(path, args.top) + "\n")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="celeriac-profile-"))
    app_dir = write_apps(tmp)["celeriac"]
    broker = {"redis": args.redis_url, "amqp": args.amqp_url, "sqlite": f"sqlite:///{tmp}/broker.db"}[args.broker]
    backend = {"redis": args.redis_url, "amqp": "rpc://", "sqlite": f"sqlite:///{tmp}/results.db"}[args.broker]
    queue = f"bench-profile-{os.getpid()}-{int(time.time())}"
    signal_file = tmp / "drain.signal"
    env = {k: v for k, v in os.environ.items() if k not in ("CELERIAC_BROKER_URL", "CELERIAC_RESULT_BACKEND")}
    env.update(BENCH_BROKER=broker, BENCH_BACKEND="", BENCH_QUEUE=queue, BENCH_SIGNAL=str(signal_file),
               PYTHONPATH=str(app_dir))
    client = [sys.executable, str(HERE / "bench_client.py"), "celeriac"]
    worker_cmd = [cli_path("celeriac"), "-A", "benchapp", "worker", "-l", args.loglevel, "-P", "threads", "-c", "8"]
    outputs: list[Path] = []
    spies: list[subprocess.Popen[bytes]] = []
    try:
        run_all(args, app_dir, env, client, worker_cmd, signal_file, backend, queue, tmp, outputs, spies)
    finally:
        for spy in spies:
            if spy.poll() is None:
                try:
                    os.killpg(spy.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                spy.wait(10)
    for path in outputs:
        print(summarize(path, args.top))
        print()
    print(f"collapsed stacks in {args.out} (render with flamegraph.pl or speedscope)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
