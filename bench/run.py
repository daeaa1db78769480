"""Benchmarks of Celeriac against Celery 5.6.2 and Dramatiq on the same broker servers, in one run.

    python bench/run.py [--brokers redis,amqp,sqlite] [--pools threads,prefork] [--tasks 20000]
                        [--reps 3] [--only drain,enqueue,roundtrip,chord,start,raw] [--quick]
                        [--systems celery,celeriac,dramatiq] [--series backlog,chord,payload,memory]

Every workload runs for every system (the order rotating per repetition) with workers started
through their own command line, then the medians, ranges and same-run ratios Celeriac/Celery and
Celeriac/Dramatiq of every figure are printed and written to ``bench/results/latest.json``; the
scaling series (Celeriac only) go into the same JSON and are plotted to PNG files beside it.
See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_apps import SIGNAL_LINE, SYSTEMS, write_apps  # noqa: E402
from bench_report import Record, format_table, format_targets, summarize, write_json  # noqa: E402
from bench_worker import DRAMATIQ_POOLS, POOL_CONCURRENCY, WorkerProcess  # noqa: E402

WORKLOADS = ("drain", "enqueue", "roundtrip", "chord", "start", "raw")
SERIES = ("backlog", "chord", "payload", "memory")
BROKERS = ("redis", "amqp", "sqlite")
POOLS = ("threads", "prefork")
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def log(text: str) -> None:
    """One progress line on stderr."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def reachable(url: str, default_port: int) -> bool:
    """Whether a TCP connection to the URL's host and port succeeds within 2 s."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), 2):
            return True
    except OSError:
        return False


def celeriac_pools() -> set[str]:
    """Pool names Celeriac has installed (built-ins and plugins)."""
    from celeriac.plugins.manager import available_pools

    return set(available_pools())


class Bench:
    """One benchmark run: the options, the temporary directory, the records."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix="celeriac-bench-"))
        self.app_dirs = write_apps(self.tmp / "apps")
        self.records: list[Record] = []
        self.queues: dict[str, list[str]] = {b: [] for b in BROKERS}
        self.base_env = {k: v for k, v in os.environ.items()
                         if k not in ("CELERIAC_BROKER_URL", "CELERIAC_RESULT_BACKEND")}
        self.base_env["CELERIAC_BENCH_RUN"] = self.run_id
        has = {name: importlib.util.find_spec(name) is not None for name in ("celery", "dramatiq")}
        self.pools = {"celery": set(POOLS) if has["celery"] else set(), "celeriac": celeriac_pools(),
                      "dramatiq": set(POOLS) if has["dramatiq"] else set()}
        for system in SYSTEMS:
            if system not in args.systems:
                self.pools[system] = set()
        self.step = 0
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.series: dict[str, Any] = {}

    # -- plumbing -------------------------------------------------------------------------------

    def record(self, broker: str, pool: str, system: str, workload: str, metric: str, unit: str,
               better: str, rep: int, value: float | None, error: str | None = None) -> None:
        """Keep one figure."""
        self.records.append(Record(broker, pool, system, workload, metric, unit, better, rep, value, error))

    def urls(self, broker: str, purpose: str, system: str = "celeriac") -> tuple[str, str]:
        """(broker URL, result backend URL) for a phase: ``drain``, ``idle`` or ``chord``.

        Dramatiq has no RPC backend: its round trip on RabbitMQ uses the Redis result backend.
        """
        args = self.args
        if broker == "amqp" and system == "dramatiq":
            return args.amqp_url, "" if purpose == "drain" else args.redis_url
        if broker == "redis":
            return args.redis_url, "" if purpose == "drain" else args.redis_url
        if broker == "amqp":
            backend = {"drain": "", "idle": "rpc://", "chord": args.redis_url}[purpose]
            return args.amqp_url, backend
        db = self.tmp / "sqlite"
        db.mkdir(exist_ok=True)
        return f"sqlite:///{db}/broker.db", "" if purpose == "drain" else f"sqlite:///{db}/results.db"

    def env(self, system: str, broker: str, purpose: str, queue: str, signal: Path | None = None) -> dict[str, str]:
        """The environment of a worker or client process."""
        broker_url, backend_url = self.urls(broker, purpose, system)
        env = dict(self.base_env)
        env.update(BENCH_BROKER=broker_url, BENCH_BACKEND=backend_url, BENCH_QUEUE=queue,
                   BENCH_SIGNAL=str(signal or self.tmp / "unused.signal"),
                   BENCH_GET_TIMEOUT=str(self.args.timeout),
                   PYTHONPATH=str(self.app_dirs[system]) + os.pathsep + env.get("PYTHONPATH", ""))
        return env

    def queue_name(self, broker: str, system: str, pool: str, purpose: str, rep: int) -> str:
        """A queue name unique to this run and phase."""
        name = f"bench-{self.run_id}-{broker}-{system}-{pool}-{purpose}-{rep}"
        self.queues[broker].append(name)
        return name

    def client(self, system: str, env: dict[str, str], action: str, n: int = 0, *extra: str) -> dict[str, Any]:
        """Run ``bench_client.py`` for one action; return its JSON. Raises ``RuntimeError``."""
        cmd = [sys.executable, str(HERE / "bench_client.py"), system, action, str(n), *extra]
        try:
            proc = subprocess.run(cmd, cwd=self.app_dirs[system], env=env, capture_output=True,
                                  text=True, timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{action} did not finish within {self.args.timeout:.0f} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{action} exited with {proc.returncode}: {proc.stderr.strip()[-1500:]}")
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    def start_worker(self, system: str, env: dict[str, str], pool: str, tag: str) -> WorkerProcess:
        """Spawn a worker with a node name unique to this run."""
        worker = WorkerProcess(system, self.app_dirs[system], env, pool, self.tmp / f"{tag}.log",
                               loglevel=self.args.loglevel, hostname=f"{tag}@%h")
        worker.start()
        return worker

    def progress(self, label: str, text: str) -> None:
        """One numbered progress line (an error shows only its last line: the JSON has the rest)."""
        self.step += 1
        if "\n" in text:
            head, _, _ = text.partition(":")
            last = [line for line in text.splitlines() if line.strip()][-1].strip()
            text = f"{head}: ... {last}"
        log(f"{self.step:>3} {label}: {text[:400]}")

    # -- workloads ------------------------------------------------------------------------------

    def phase_drain(self, broker: str, system: str, pool: str, rep: int, only: set[str]) -> None:
        """``enqueue`` N no-op tasks with the client, then ``drain`` them with a new worker."""
        n = self.args.tasks
        label = f"{broker:<6} {pool:<7} {system:<8} rep {rep + 1}"
        queue = self.queue_name(broker, system, pool, "drain", rep)
        signal = self.tmp / f"{queue}.signal"
        env = self.env(system, broker, "drain", queue, signal)
        try:
            self.client(system, env, "purge")
            out = self.client(system, env, "enqueue", n)
        except RuntimeError as exc:
            for workload in ("enqueue", "drain") if "drain" in only else ("enqueue",):
                self.record(broker, "-" if workload == "enqueue" else pool, system, workload,
                            "tasks/s" if workload == "enqueue" else "tasks/s from start", "tasks/s", "higher", rep,
                            None, str(exc))
            self.progress(label, f"enqueue FAILED: {exc}")
            return
        if "enqueue" in only:
            self.record(broker, "-", system, "enqueue", "tasks/s", "tasks/s", "higher", rep, out["rate"])
            self.progress(label, f"enqueue {out['rate']:,.0f} tasks/s")
        if "drain" not in only:
            return
        worker = self.start_worker(system, env, pool, f"{queue}")
        error = None
        try:
            error = wait_signal(worker, signal, n, self.args.timeout)
        finally:
            if error is None:
                worker.stop()
            else:
                worker.kill()
        if error is not None:
            self.record(broker, pool, system, "drain", "tasks/s from start", "tasks/s", "higher", rep, None, error)
            self.progress(label, f"drain FAILED: {error[:300]}")
            return
        stamps = [float(line) for line in signal.read_bytes().split()]
        last = max(stamps)
        if min(stamps) < worker.started:
            error = "task executions stamped before the worker started: another consumer on the queue?"
            self.record(broker, pool, system, "drain", "tasks/s from start", "tasks/s", "higher", rep, None, error)
            self.progress(label, f"drain FAILED: {error}")
            return
        rate = n / (last - worker.started)
        self.record(broker, pool, system, "drain", "tasks/s from start", "tasks/s", "higher", rep, rate)
        text = f"drain {rate:,.0f} tasks/s from process start"
        if worker.ready_at is not None and last > worker.ready_at:
            from_ready = n / (last - worker.ready_at)
            self.record(broker, pool, system, "drain", "tasks/s from ready", "tasks/s", "higher", rep, from_ready)
            text += f", {from_ready:,.0f} from ready"
        self.progress(label, text + (f" ({len(stamps)} executions)" if len(stamps) != n else ""))

    def drain_once(self, broker: str, pool: str, queue: str, n: int, action: str = "enqueue",
                   extra: tuple[str, ...] = ()) -> dict[str, float]:
        """Celeriac: publish ``n`` tasks with ``action``, drain them with a new worker; the figures.

        Returns ``enqueue_rate`` (tasks/s), ``from_start``, ``from_ready`` and ``first_to_last``
        (tasks/s). Raises ``RuntimeError`` when a step fails.
        """
        signal = self.tmp / f"{queue}.signal"
        env = self.env("celeriac", broker, "drain", queue, signal)
        self.client("celeriac", env, "purge")
        out = self.client("celeriac", env, action, n, *extra)
        worker = self.start_worker("celeriac", env, pool, queue)
        error = None
        try:
            error = wait_signal(worker, signal, n, self.args.timeout)
        finally:
            if error is None:
                worker.stop()
            else:
                worker.kill()
        if error is not None:
            raise RuntimeError(error)
        stamps = [float(line) for line in signal.read_bytes().split()]
        first, last = min(stamps), max(stamps)
        signal.unlink()
        figures = {"enqueue_rate": out["rate"], "from_start": n / (last - worker.started),
                   "first_to_last": (n - 1) / (last - first) if last > first else float("nan")}
        if worker.ready_at is not None and last > worker.ready_at:
            figures["from_ready"] = n / (last - worker.ready_at)
        return figures

    def _idle_worker(self, broker: str, system: str, pool: str, rep: int, purpose: str) -> tuple[
            WorkerProcess, dict[str, str]]:
        queue = self.queue_name(broker, system, pool, purpose, rep)
        env = self.env(system, broker, purpose, queue)
        self.client(system, env, "purge")
        worker = self.start_worker(system, env, pool, queue)
        try:
            worker.wait_ready(min(self.args.timeout, 120))
        except RuntimeError:
            worker.kill()
            raise
        return worker, env

    def phase_idle(self, broker: str, system: str, pool: str, rep: int, only: set[str]) -> None:
        """``start`` (spawn to ready, idle RSS), ``roundtrip`` and ``chord`` against an idle worker."""
        label = f"{broker:<6} {pool:<7} {system:<8} rep {rep + 1}"
        wanted: list[str] = [w for w in ("start", "roundtrip", "chord") if w in only]
        if system == "dramatiq" and "chord" in wanted:
            wanted.remove("chord")
            note = ("Dramatiq has no chord: a group's completion callback (GroupCallbacks) does not "
                    "receive the header's results, so the chord row has no Dramatiq figure")
            if note not in self.notes:
                self.notes.append(note)
        chord_apart = broker == "amqp"  # Celery's rpc:// refuses chords: the chord uses Redis results
        first = [w for w in wanted if not (chord_apart and w == "chord")]
        if system == "dramatiq":
            chord_apart = False
        if first:
            self._idle_run(broker, system, pool, rep, "idle", first, label)
        if chord_apart and "chord" in wanted:
            if reachable(self.args.redis_url, 6379):
                self._idle_run(broker, system, pool, rep, "chord", ["chord"], label)
            else:
                self.record(broker, pool, system, "chord", "seconds", "s", "lower", rep, None,
                            "the chord on RabbitMQ needs the Redis result backend; Redis unreachable")

    def _idle_run(self, broker: str, system: str, pool: str, rep: int, purpose: str, workloads: list[str],
                  label: str) -> None:
        try:
            worker, env = self._idle_worker(broker, system, pool, rep, purpose)
        except RuntimeError as exc:
            primary = {"start": ("to ready", "s"), "roundtrip": ("p50", "ms"), "chord": ("seconds", "s")}
            for workload in workloads:
                metric, unit = primary[workload]
                self.record(broker, pool, system, workload, metric, unit, "lower", rep, None, str(exc))
            self.progress(label, f"worker start FAILED: {str(exc)[:300]}")
            return
        try:
            if "start" in workloads:
                assert worker.ready_at is not None
                seconds = worker.ready_at - worker.started
                time.sleep(1.0)  # idle for a second before reading memory
                main_kb, total_kb = worker.rss_kb()
                self.record(broker, pool, system, "start", "to ready", "s", "lower", rep, seconds)
                self.record(broker, pool, system, "start", "idle RSS", "MiB", "lower", rep, total_kb / 1024)
                self.progress(label, f"start {seconds:.3f} s to ready, idle RSS {total_kb / 1024:.1f} MiB"
                              + (f" (main process {main_kb / 1024:.1f})" if total_kb != main_kb else ""))
            if "roundtrip" in workloads:
                try:
                    out = self.client(system, env, "roundtrip", self.args.roundtrips)
                    for key in ("p50", "p90", "p99"):
                        self.record(broker, pool, system, "roundtrip", key, "ms", "lower", rep, out[key])
                    self.progress(label, "roundtrip p50 {p50:.2f} p90 {p90:.2f} p99 {p99:.2f} ms".format(**out))
                except RuntimeError as exc:
                    self.record(broker, pool, system, "roundtrip", "p50", "ms", "lower", rep, None, str(exc))
                    self.progress(label, f"roundtrip FAILED: {str(exc)[:300]}")
            if "chord" in workloads:
                try:
                    out = self.client(system, env, "chord", self.args.chord_size)
                    self.record(broker, pool, system, "chord", "seconds", "s", "lower", rep, out["seconds"])
                    self.progress(label, f"chord of {self.args.chord_size}: {out['seconds']:.3f} s")
                except RuntimeError as exc:
                    self.record(broker, pool, system, "chord", "seconds", "s", "lower", rep, None, str(exc))
                    self.progress(label, f"chord FAILED: {str(exc)[:300]}")
        finally:
            if worker.alive():
                worker.stop()
            else:
                worker.kill()

    def phase_raw(self, broker: str, rep: int) -> None:
        """The bare client library's ceiling on this broker."""
        kind = "redis" if broker == "redis" else "amqp"
        url = self.args.redis_url if broker == "redis" else self.args.amqp_url
        cmd = [sys.executable, str(HERE / "bench_raw.py"), kind, url, str(self.args.tasks)]
        label = f"{broker:<6} {'-':<7} {'raw':<8} rep {rep + 1}"
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.timeout)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip()[-1000:])
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            self.record(broker, "-", "raw", "raw", "ceiling", "msg/s", "higher", rep, None, str(exc))
            self.progress(label, f"raw FAILED: {str(exc)[:300]}")
            return
        for metric, value in figures.items():
            self.record(broker, "-", "raw", "raw", metric, "msg/s", "higher", rep, value)
        self.progress(label, "raw " + ", ".join(f"{k} {v:,.0f}/s" for k, v in figures.items()))

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> None:
        """Every selected broker x repetition x pool x system, systems alternating per repetition."""
        args = self.args
        only = set(args.only)
        for broker in args.brokers:
            if (broker == "redis" and not reachable(args.redis_url, 6379)) or \
                    (broker == "amqp" and not reachable(args.amqp_url, 5672)):
                log(f"{broker}: server unreachable, skipped")
                self.skipped.append(f"{broker}: server unreachable")
                continue
            systems = ("celeriac",) if broker == "sqlite" else SYSTEMS
            systems = tuple(s for s in systems if s in args.systems)
            for rep in range(args.reps if only else 0):
                shift = rep % len(systems)
                order = systems[shift:] + systems[:shift]
                for pool in args.pools:
                    for system in order:
                        if pool not in self.pools[system]:
                            if rep == 0:
                                what = "not installed" if self.pools[system] else "package not installed"
                                log(f"{broker} {pool} {system}: {what}, skipped")
                                self.skipped.append(f"{broker} {pool} {system}: {what}")
                            continue
                        if only & {"drain", "enqueue"}:
                            if "drain" in only or pool == args.pools[0]:
                                self.phase_drain(broker, system, pool, rep, only)
                        if only & {"start", "roundtrip", "chord"}:
                            self.phase_idle(broker, system, pool, rep, only)
                if "raw" in only and broker != "sqlite":
                    self.phase_raw(broker, rep)
        if args.series:
            from bench_series import run_series

            brokers = [b for b in args.brokers if not any(b in skip for skip in self.skipped if "unreachable" in skip)]
            self.series = run_series(self, brokers, args.series)

    def cleanup(self) -> None:
        """Delete this run's queues and keys (and only those), and the temporary directory."""
        if self.queues["redis"] or self.queues["amqp"]:
            try:
                self._cleanup_redis()
            except Exception as exc:
                log(f"cleanup of Redis keys failed: {exc}")
        if self.queues["amqp"]:
            try:
                self._cleanup_amqp()
            except Exception as exc:
                log(f"cleanup of RabbitMQ queues failed: {exc}")
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"kept {self.tmp}")

    def _cleanup_redis(self) -> None:
        import redis

        if not reachable(self.args.redis_url, 6379):
            return
        client = redis.Redis.from_url(self.args.redis_url)
        try:
            marker = f"bench-{self.run_id}-"
            doomed = list(client.scan_iter(match=f"*{marker}*", count=1000))
            if doomed:
                client.delete(*doomed)
            for key in client.scan_iter(match="_kombu.binding.*", count=1000):
                members = [m for m in client.smembers(key) if marker.encode() in m]
                if members:
                    client.srem(key, *members)
        finally:
            client.close()

    def _cleanup_amqp(self) -> None:
        import pika
        from bench_raw import pika_parameters

        if not reachable(self.args.amqp_url, 5672):
            return
        conn = pika.BlockingConnection(pika_parameters(self.args.amqp_url))
        try:
            names = list(self.queues["amqp"])
            # Dramatiq's delay and dead-letter queues beside each of its queues.
            names += [f"{q}.{kind}" for q in self.queues["amqp"] if "-dramatiq-" in q for kind in ("DQ", "XQ")]
            for name in names:
                channel = conn.channel()
                try:
                    channel.queue_delete(name)
                    channel.close()
                except pika.exceptions.ChannelClosed:
                    pass
        finally:
            conn.close()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, distributions, version

    out = {}
    for dist in ("celery", "kombu", "dramatiq", "redis", "pika", "matplotlib"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    for found in distributions():
        name = str(found.metadata["Name"] or "")
        if name.startswith("celeriac"):
            out[name] = found.version
    return out


def _commit() -> str:
    """``git rev-parse HEAD`` of the working tree the bench runs from (plus ``-dirty`` if modified)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "packages"],
                               cwd=HERE.parent, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+uncommitted changes in packages/" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    def sizes(text: str) -> list[int]:
        try:
            values = [int(float(x)) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"sizes must be >= 1: {text!r}")
        return values

    def names(allowed: tuple[str, ...]) -> Any:
        def parse(text: str) -> list[str]:
            items = [x.strip() for x in text.split(",") if x.strip()]
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
            return items
        return parse

    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brokers", type=names(BROKERS), default=["redis", "amqp", "sqlite"],
                   help="comma-separated: redis, amqp, sqlite (Celeriac's embedded broker, Celeriac only)")
    p.add_argument("--pools", type=names(POOLS), default=list(POOLS),
                   help=f"comma-separated: threads (x{POOL_CONCURRENCY['threads']}), "
                        f"prefork (x{POOL_CONCURRENCY['prefork']}; only where installed); Dramatiq: "
                        f"--processes {DRAMATIQ_POOLS['threads'][0]} --threads {DRAMATIQ_POOLS['threads'][1]} and "
                        f"--processes {DRAMATIQ_POOLS['prefork'][0]} --threads {DRAMATIQ_POOLS['prefork'][1]}")
    p.add_argument("--only", type=names(WORKLOADS + ("none",)), default=list(WORKLOADS),
                   help="comma-separated workloads: " + ", ".join(WORKLOADS) + " (none: only the series)")
    p.add_argument("--systems", type=names(SYSTEMS), default=list(SYSTEMS),
                   help="comma-separated: celery, celeriac, dramatiq (a peer not installed is skipped)")
    p.add_argument("--series", type=names(SERIES + ("none", "all")), default=None,
                   help="scaling series of Celeriac, comma-separated: " + ", ".join(SERIES)
                        + ", all or none (default all; none with --quick)")
    p.add_argument("--backlog-sizes", type=sizes, help="backlog series (default 1000,10000,100000)")
    p.add_argument("--chord-sizes", type=sizes, help="chord series header sizes (default 10,100,1000,10000)")
    p.add_argument("--group-size", type=int, help="the group with results of the chord series (default 10000)")
    p.add_argument("--payload-sizes", type=sizes, help="payload series, bytes (default 100,10240,1048576)")
    p.add_argument("--payload-mb", type=float,
                   help="bytes per payload size in MB: tasks = this / size, between 20 and --tasks (default 100)")
    p.add_argument("--memory-tasks", type=int, help="tasks of the memory series (default 100000)")
    p.add_argument("--series-pool", choices=POOLS, default="threads", help="the worker pool of the series")
    p.add_argument("--tasks", type=int, help="tasks for drain/enqueue/raw (default 20000)")
    p.add_argument("--roundtrips", type=int, help="sequential round trips (default 2000)")
    p.add_argument("--chord-size", type=int, help="header size of the chord (default 1000)")
    p.add_argument("--reps", type=int, help="repetitions (default 3)")
    p.add_argument("--timeout", type=float, help="seconds per workload before it is failed (default 300)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: 300 tasks, 100 round trips, a chord of 50, 1 repetition, 60 s timeouts")
    p.add_argument("--loglevel", default="info", help="workers' -l (default info; the ready line needs info)")
    p.add_argument("--redis-url", default=os.environ.get("CELERIAC_BENCH_REDIS_URL", DEFAULT_REDIS),
                   help=f"Redis server and database used only by the bench (default {DEFAULT_REDIS})")
    p.add_argument("--amqp-url", default=os.environ.get("CELERIAC_BENCH_AMQP_URL", DEFAULT_AMQP),
                   help=f"RabbitMQ server (default {DEFAULT_AMQP})")
    p.add_argument("--output", type=Path, default=HERE / "results" / "latest.json", help="JSON file to write")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (worker logs)")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="measure nothing: print the tables of an earlier run's JSON and redraw its plots")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"tasks": 300 if quick else 20000, "roundtrips": 100 if quick else 2000,
                "chord_size": 50 if quick else 1000, "reps": 1 if quick else 3, "timeout": 60.0 if quick else 300.0,
                "backlog_sizes": [100, 1000] if quick else [1000, 10000, 100000],
                "chord_sizes": [10, 100] if quick else [10, 100, 1000, 10000],
                "group_size": 100 if quick else 10000,
                "payload_sizes": [100, 10240, 1048576], "payload_mb": 2.0 if quick else 100.0,
                "memory_tasks": 1000 if quick else 100000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tasks < 2 or args.roundtrips < 1 or args.chord_size < 1 or args.reps < 1:
        p.error("--tasks must be >= 2 and --roundtrips, --chord-size, --reps >= 1")
    if "none" in args.only:
        args.only = []
    if args.series is None:
        args.series = [] if quick else list(SERIES)
    elif "all" in args.series:
        args.series = list(SERIES)
    elif "none" in args.series:
        args.series = []
    return args


def report(path: Path) -> int:
    """Print the tables of the JSON at ``path`` (and redraw its series' plots beside it)."""
    data = json.loads(path.read_text())
    rows = summarize(Record(**rec) for rec in data["records"])
    meta = data["meta"]
    print(f"{path}: {meta['date']}, commit {meta.get('commit', '?')}, {meta['args'].get('tasks')} tasks, "
          f"{meta['args'].get('reps')} rep(s)\n")
    if rows:
        print(format_table(rows))
        targets = format_targets(rows)
        if targets:
            print("\n" + targets)
    for note in meta.get("notes", []):
        print(f"note: {note}")
    if data.get("series"):
        from bench_series import format_series, plot_series

        print("\n" + format_series(data["series"]))
        for png in plot_series(data["series"], path):
            print(f"plot: {png}")
    return 0


def wait_signal(worker: WorkerProcess, signal: Path, n: int, timeout: float) -> str | None:
    """Wait until the signal file holds ``n`` lines; None, or the error (worker died, timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        worker.poll_ready()
        size = signal.stat().st_size if signal.exists() else 0
        if size >= n * SIGNAL_LINE:
            return None
        if not worker.alive():
            return f"worker exited with {worker.returncode()}: {worker.log_tail()}"
        if time.monotonic() > deadline:
            return f"{size // SIGNAL_LINE} of {n} tasks after {timeout:.0f} s"
        time.sleep(0.005)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit code 1 when any figure failed."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report:
        return report(args.report)
    bench = Bench(args)
    started = dt.datetime.now(dt.timezone.utc)
    log(f"run {bench.run_id}: brokers {','.join(args.brokers)}, pools {','.join(args.pools)}, "
        f"workloads {','.join(args.only) or 'none'}, series {','.join(args.series) or 'none'}, {args.tasks} tasks, "
        f"{args.reps} rep(s); commit {_commit()}; Celeriac pools installed: "
        f"{', '.join(sorted(bench.pools['celeriac']))}; peers: "
        + (", ".join(s for s in ("celery", "dramatiq") if bench.pools[s]) or "none"))
    if bench.pools["celery"] and importlib.util.find_spec("packaging") is None and "redis" in args.brokers:
        log("warning: kombu's Redis transport imports 'packaging', which is not installed: Celery on Redis "
            "will fail. pip install packaging (or install celery[redis]).")
    load_before = os.getloadavg()
    commit_at_start = _commit()
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        bench.cleanup()
    rows = summarize(bench.records)
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
        "nproc": os.cpu_count(), "cpu": _cpu_model(), "host": platform.node(),
        "python": platform.python_version(), "platform": platform.platform(), "versions": _versions(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "run_id": bench.run_id, "skipped": bench.skipped,
    }
    meta["notes"] = bench.notes
    meta["commit"] = _commit()
    if meta["commit"] != commit_at_start:
        meta["commit_at_start"] = commit_at_start
        bench.notes.append(f"the commit changed during the run: {commit_at_start} at the start, "
                           f"{meta['commit']} at the end")
    write_json(args.output, meta, bench.records, rows, bench.series)
    if rows:
        print(f"\nCeleriac vs Celery and Dramatiq, {meta['date']}, commit {meta['commit']}, {meta['nproc']} cores "
              f"({meta['cpu']}), medians of {args.reps} rep(s) (range), {args.tasks} tasks; Celeriac/peer = median of "
              "the same-repetition ratios (range); for times lower is better for Celeriac, for rates higher.\n")
        print(format_table(rows))
        targets = format_targets(rows)
        if targets:
            print("\nIssue 13's figures (same-run ratios Celeriac/peer: median (range), drain from process start):\n")
            print(targets)
    for note in bench.notes:
        print(f"note: {note}")
    if bench.series:
        from bench_series import format_series, plot_series

        print()
        print(format_series(bench.series))
        for png in plot_series(bench.series, args.output):
            print(f"plot: {png}")
    print(f"\nJSON: {args.output}")
    failed = [r for r in bench.records if r.value is None]
    failed_series = [(name, point) for name, data in bench.series.items() for point in data["points"]
                     if point.get("error")]
    for name, point in failed_series:
        print(f"FAILED series {name} {point.get('broker')} {point.get('x')}: {point['error'][:500]}", file=sys.stderr)
    if failed_series and not failed:
        return 1
    for rec in failed:
        print(f"FAILED {rec.broker} {rec.pool} {rec.system} {rec.workload} rep {rec.rep + 1}: "
              f"{(rec.error or '')[:500]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
