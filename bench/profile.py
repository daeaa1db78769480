"""Profile Celeriac's hot paths with py-spy on the bench's workloads and print where the time goes.

    python bench/profile.py [--broker redis|amqp|sqlite] [--pools threads,prefork] [--tasks 20000]
                            [--roundtrips 2000] [--out bench/results/profile]

Needs ``py-spy`` (``pip install py-spy``) and permission to trace child processes (root, or
``kernel.yama.ptrace_scope=0``). The recordings, each a collapsed-stack file in ``--out``:

``enqueue-client``        the client publishing N tasks
``drain-worker-<pool>``   the worker draining N queued no-op tasks, per pool of ``--pools``
                          (threads x8; prefork x2 is recorded with ``--subprocesses``, so its pool
                          processes are in it, and the summary splits the samples per process)
``roundtrip-worker``      an idle worker (threads x8) serving sequential ``add.delay(2, 2).get()``
``roundtrip-client``      the client making those round trips

Samples are taken only from the thread holding the GIL (``--gil``): Python CPU time, not waiting.
For each, the top functions by own time ("self", the frame on top of the stack) and by inclusive
time ("total", anywhere on the stack) are printed, as percentages of the samples, and the wall
time and rate of the workload (py-spy slows the traced process: compare shares, not rates).
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

#: recording name -> what the workload did (wall time, rate), printed under its summary.
notes: dict[str, str] = {}


def pyspy() -> str:
    """The py-spy executable beside this interpreter, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else "py-spy"


#: Frames on every stack (entry points, click, thread start): left out of the "total" list.
_WRAPPER = re.compile(r"^<module> |\(click/|\(celeriac/cli/main\.py\)|^worker \(celeriac/cli/worker\.py\)|"
                      r"^Thread\.(_bootstrap|_bootstrap_inner|run) |^main \(bench_client\.py\)")


def _short(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py)`` -> ``func (pkg/mod.py)``."""
    return re.sub(r"\((?:[^()]*/(?:site-packages|src|lib/python3\.\d+)/)([^()]*)\)$", r"(\1)", frame)


def summarize(raw: Path, top: int = 15) -> str:
    """Top functions by self and by total share of the samples in a py-spy ``raw`` file."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    procs: collections.Counter[str] = collections.Counter()
    own_by_kind: dict[str, collections.Counter[str]] = {}
    samples = startup = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        parts = stack.split(";")
        nested = [f for f in parts if f.startswith("process ")]
        # --subprocesses nests a child's stacks under its parent's "process" frame.
        proc = "main process" if len(nested) <= 1 else "pool process " + nested[-1].split(":", 1)[0].split()[1]
        # "func (file:line)" -> "func (file)": a function's lines are counted together.
        frames = [_short(re.sub(r":\d+\)$", ")", f)) for f in parts if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any(f.startswith("_find_and_load ") for f in frames):
            startup += count  # importing modules (start-up), left out of the shares below
            continue
        samples += count
        procs[proc] += count
        own_by_kind.setdefault(proc.split(" ")[0], collections.Counter())[frames[-1]] += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{raw.stem}: {samples} samples (and {startup} in imports at start-up, left out)"]
    if len(procs) > 1:
        lines.append("  per process:")
        for proc, count in procs.most_common():
            lines.append(f"    {100.0 * count / max(samples, 1):5.1f}%  {proc[:110]}")
    for title, counter in (("self", own), ("total", total)):
        lines.append(f"  top by {title}:")
        shown = [(f, c) for f, c in counter.most_common() if title == "self" or not _WRAPPER.search(f)]
        for frame, count in shown[:top]:
            lines.append(f"    {100.0 * count / max(samples, 1):5.1f}%  {frame}")
    if len(own_by_kind) > 1:
        for kind, counter in own_by_kind.items():
            lines.append(f"  top by self in the {kind} process{'es' if kind == 'pool' else ''} (% of all samples):")
            for frame, count in counter.most_common(max(5, top // 2)):
                lines.append(f"    {100.0 * count / max(samples, 1):5.1f}%  {frame}")
    return "\n".join(lines)


def spy_command(out: Path, subprocesses: bool = False) -> list[str]:
    """``py-spy record`` writing collapsed stacks to ``out``, up to the ``--`` before the command."""
    rate = os.environ.get("PYSPY_RATE", "250")  # samples per second
    return [pyspy(), "record", "--format", "raw", "--rate", rate, "--gil", "--nonblocking",
            *(["--subprocesses"] if subprocesses else []), "-o", str(out), "--"]


def record(out: Path, cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` under ``py-spy record`` writing collapsed stacks to ``out``."""
    return subprocess.Popen(spy_command(out) + cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


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
    for index, pool in enumerate(args.pools):
        # enqueue (client, recorded once) + drain (worker, per pool)
        subprocess.run(client + ["purge"], cwd=app_dir, env=env, check=True, capture_output=True)
        signal_file.unlink(missing_ok=True)
        if index == 0:
            enqueue_out = args.out / f"enqueue-client-{args.broker}.txt"
            started = time.monotonic()
            spy = record(enqueue_out, client + ["enqueue", str(args.tasks)], app_dir, env)
            spies.append(spy)
            spy.wait(600)
            seconds = time.monotonic() - started
            outputs.append(enqueue_out)
            notes[enqueue_out.stem] = f"{args.tasks} tasks in {seconds:.1f} s (with interpreter start)"
        else:
            subprocess.run(client + ["enqueue", str(args.tasks)], cwd=app_dir, env=env, check=True,
                           capture_output=True)
        drain_out = args.out / f"drain-worker-{pool}-{args.broker}.txt"
        log = tmp / f"drain-{pool}.log"
        cmd = worker_cmd + ["-P", pool, "-c", "8" if pool == "threads" else "2"]
        started = time.monotonic()
        with open(log, "wb") as handle:
            spy = subprocess.Popen(spy_command(drain_out, subprocesses=pool != "threads") + cmd, cwd=app_dir,
                                   env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        spies.append(spy)
        pid = worker_pid(spy)
        deadline = time.monotonic() + 600
        while (signal_file.stat().st_size if signal_file.exists() else 0) < args.tasks * SIGNAL_LINE:
            if time.monotonic() > deadline or spy.poll() is not None:
                raise RuntimeError(f"drain did not finish: {log.read_text()[-2000:]}")
            time.sleep(0.01)
        seconds = time.monotonic() - started
        os.kill(pid, signal.SIGTERM)
        spy.wait(60)
        outputs.append(drain_out)
        notes[drain_out.stem] = f"{args.tasks} tasks in {seconds:.1f} s from spawn ({args.tasks / seconds:,.0f}/s)"

    # round trips: the worker and the client, each under py-spy
    env.update(BENCH_BACKEND=backend, BENCH_QUEUE=queue + "-rt")
    subprocess.run(client + ["purge"], cwd=app_dir, env=env, check=True, capture_output=True)
    rt_worker_out = args.out / f"roundtrip-worker-{args.broker}.txt"
    log = tmp / "roundtrip.log"
    with open(log, "wb") as handle:
        spy = subprocess.Popen(spy_command(rt_worker_out) + worker_cmd + ["-P", "threads", "-c", "8"], cwd=app_dir,
                               env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    spies.append(spy)
    pid = worker_pid(spy)
    wait_log(log, " ready." if args.loglevel.lower() in ("info", "debug") else "[Tasks]", 60)
    rt_client_out = args.out / f"roundtrip-client-{args.broker}.txt"
    started = time.monotonic()
    client_spy = record(rt_client_out, client + ["roundtrip", str(args.roundtrips)], app_dir, env)
    spies.append(client_spy)
    client_spy.wait(600)
    seconds = time.monotonic() - started
    notes[rt_client_out.stem] = notes[rt_worker_out.stem] = (
        f"{args.roundtrips} round trips in {seconds:.1f} s (with interpreter start)")
    os.kill(pid, signal.SIGTERM)
    spy.wait(60)
    outputs += [rt_worker_out, rt_client_out]


def cleanup(kind: str, url: str, queues: list[str]) -> None:
    """Delete the recordings' queues (RabbitMQ) or the Redis keys named after them, nothing else."""
    try:
        if kind == "amqp":
            import pika
            from bench_raw import pika_parameters

            conn = pika.BlockingConnection(pika_parameters(url))
            try:
                for name in queues:
                    channel = conn.channel()
                    try:
                        channel.queue_delete(name)
                        channel.close()
                    except pika.exceptions.ChannelClosed:
                        pass
            finally:
                conn.close()
        elif kind == "redis":
            import redis

            client = redis.Redis.from_url(url)
            try:
                for name in queues:
                    doomed = list(client.scan_iter(match=f"*{name}*", count=1000))
                    if doomed:
                        client.delete(*doomed)
                    for key in client.scan_iter(match="_kombu.binding.*", count=1000):
                        members = [m for m in client.smembers(key) if name.encode() in m]
                        if members:
                            client.srem(key, *members)
            finally:
                client.close()
    except Exception as exc:  # clean-up is best effort: say so and go on
        sys.stderr.write(f"clean-up of {kind} queues failed: {exc}\n")


def main() -> int:
    """Record the workloads and print the summaries."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default="redis", choices=["redis", "amqp", "sqlite"])
    p.add_argument("--pools", default="threads,prefork",
                   help="comma-separated worker pools for the drain (default threads,prefork)")
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
    args.pools = [x.strip() for x in args.pools.split(",") if x.strip()]
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
    worker_cmd = [cli_path("celeriac"), "-A", "benchapp", "worker", "-l", args.loglevel]
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
        cleanup(args.broker, broker, [queue, queue + "-rt"])
    for path in outputs:
        print(summarize(path, args.top))
        if path.stem in notes:
            print(f"  ({notes[path.stem]}; under py-spy)")
        print()
    print(f"collapsed stacks in {args.out} (render with flamegraph.pl or speedscope)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
