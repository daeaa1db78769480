"""Scaling series of Celeriac: how its costs grow with the work (``run.py --series``).

Each series is a list of points in the JSON (``"series"``) and one PNG beside it
(``<output stem>-<series>.png``). Every point runs a worker through the command line as the
table's workloads do (``--series-pool``, threads x8 by default), on each selected broker:

``backlog``  drain rate with a backlog of 1k, 10k, 100k queued no-op tasks (results off): tasks/s
             from the worker's ready line to the last task; also from process start and from the
             first task executed to the last. Backlogs below 100k are drained ``--reps`` times and
             the run with the median rate is kept (a 1k drain lasts about 0.1 s). The target is
             flat: the largest backlog's rate within 20 % of the smallest's (``spread`` in the
             summary = 1 - min/max).
``chord``    seconds from building ``chord(add.s(i, i) for i in range(N))(xsum.s())`` to its result
             for N = 10, 100, 1,000, 10,000, and ``group(add.s(i, i) for i in range(N))().get()`` for
             N = 10,000, against one idle worker (results on; on RabbitMQ the Redis result backend).
             Linear means the time per header task stays the same.
``payload``  ``sink(data)`` with a string of 100 B, 10 KB, 1 MB: enqueue and drain throughput in MB/s
             of payload (tasks = ``--payload-mb`` / size, at least 20, at most ``--tasks``).
``memory``   the worker's resident memory (the whole process tree) idle after one second, while
             ``--memory-tasks`` no-op tasks (results off) are published and executed, and after it;
             ``growth_pct`` = final / idle - 1 (target: at most 10 %).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_apps import SIGNAL_LINE

if TYPE_CHECKING:
    from run import Bench

__all__ = ["format_series", "plot_series", "run_series"]

HERE = Path(__file__).resolve().parent
CHORD_BACKEND = {"redis": "Redis", "amqp": "Redis", "sqlite": "SQLite"}


def run_series(bench: Bench, brokers: list[str], names: list[str]) -> dict[str, Any]:
    """Run the series ``names`` on ``brokers``; return them as JSON-able dicts."""
    out: dict[str, Any] = {}
    runners = {"backlog": _backlog, "chord": _chord, "payload": _payload, "memory": _memory}
    for name in names:
        points: list[dict[str, Any]] = []
        for broker in brokers:
            if name == "chord" and broker == "amqp":
                from run import reachable

                if not reachable(bench.args.redis_url, 6379):
                    points.append({"broker": broker, "error": "the chord on RabbitMQ needs Redis results"})
                    continue
            runners[name](bench, broker, points)
        out[name] = {"pool": bench.args.series_pool, "points": points, "summary": _summary(name, points)}
    return out


def _label(bench: Bench, name: str, broker: str, text: str) -> None:
    bench.progress(f"series {name:<7} {broker:<6}", text)


def _backlog(bench: Bench, broker: str, points: list[dict[str, Any]]) -> None:
    """Drain each backlog ``--reps`` times and keep the median run. The reps go round the sizes
    (1k, 10k, 100k, then 1k again...), so that the host's speed drifting over the minutes of
    the series (the shared 2-core machine's rates move by up to a quarter) weighs on every size
    alike rather than on the sizes drained last."""
    pool = bench.args.series_pool
    sizes = list(bench.args.backlog_sizes)
    runs: dict[int, list[dict[str, float]]] = {size: [] for size in sizes}
    errors: dict[int, str] = {}
    for rep in range(bench.args.reps):
        for size in sizes:
            if size in errors:
                continue
            queue = bench.queue_name(broker, "celeriac", pool, f"backlog{size}", rep)
            try:
                runs[size].append(bench.drain_once(broker, pool, queue, size))
            except RuntimeError as exc:
                errors[size] = str(exc)
                _label(bench, "backlog", broker, f"{size:,}: FAILED {errors[size][:300]}")
                continue
            got = runs[size][-1]
            _label(bench, "backlog", broker, f"{size:,} queued, rep {rep + 1}: "
                                             f"{got.get('from_ready', math.nan):,.0f} tasks/s from ready")
    for size in sizes:
        if size in errors:
            points.append({"broker": broker, "x": size, "error": errors[size]})
            continue
        figures = _median_run(runs[size])
        points.append({"broker": broker, "x": size, **figures})
        low, high = figures["from_ready_range"]
        _label(bench, "backlog", broker, f"{size:,} queued: {figures.get('from_ready', math.nan):,.0f} tasks/s "
                                         f"from ready (median of {len(runs[size])}: {low:,.0f}-{high:,.0f}), "
                                         f"{figures['from_start']:,.0f} from start "
                                         f"(enqueued at {figures['enqueue_rate']:,.0f}/s)")


def _median_run(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The run with the median rate from ready (from start when ready was not seen), with
    ``runs`` (how many) and ``from_ready_range`` (lowest, highest) beside its figures."""
    def rate(run: dict[str, float]) -> float:
        return run.get("from_ready", run["from_start"])

    ordered = sorted(runs, key=rate)
    median: dict[str, Any] = dict(ordered[(len(ordered) - 1) // 2])
    median["runs"] = len(runs)
    median["from_ready_range"] = (rate(ordered[0]), rate(ordered[-1]))
    return median


def _chord(bench: Bench, broker: str, points: list[dict[str, Any]]) -> None:
    pool = bench.args.series_pool
    try:
        worker, env = bench._idle_worker(broker, "celeriac", pool, 0, "chord")
    except RuntimeError as exc:
        points.append({"broker": broker, "error": str(exc)})
        _label(bench, "chord", broker, f"worker start FAILED: {str(exc)[:300]}")
        return
    try:
        try:
            bench.client("celeriac", env, "chord", 2)  # warm-up, untimed: the worker's first chord
        except RuntimeError:
            pass  # the timed chords below report the failure
        jobs = [("chord", n) for n in bench.args.chord_sizes] + [("group", bench.args.group_size)]
        for kind, n in jobs:
            try:
                out = bench.client("celeriac", env, kind, n)
            except RuntimeError as exc:
                points.append({"broker": broker, "kind": kind, "x": n, "error": str(exc)})
                _label(bench, "chord", broker, f"{kind} of {n:,}: FAILED {str(exc)[:300]}")
                continue
            seconds = out["seconds"]
            points.append({"broker": broker, "kind": kind, "x": n, "seconds": seconds,
                           "ms_per_task": 1000.0 * seconds / n, "backend": CHORD_BACKEND[broker]})
            _label(bench, "chord", broker, f"{kind} of {n:,}: {seconds:.3f} s ({1000 * seconds / n:.3f} ms/task)")
    finally:
        if worker.alive():
            worker.stop()
        else:
            worker.kill()


def _payload(bench: Bench, broker: str, points: list[dict[str, Any]]) -> None:
    pool = bench.args.series_pool
    for size in bench.args.payload_sizes:
        n = int(max(20, min(bench.args.tasks, bench.args.payload_mb * 1e6 / size)))
        queue = bench.queue_name(broker, "celeriac", pool, f"payload{size}", 0)
        try:
            figures = bench.drain_once(broker, pool, queue, n, "payload", (str(size),))
        except RuntimeError as exc:
            points.append({"broker": broker, "x": size, "n": n, "error": str(exc)})
            _label(bench, "payload", broker, f"{size:,} B: FAILED {str(exc)[:300]}")
            continue
        rate = figures.get("from_ready", figures["from_start"])
        point = {"broker": broker, "x": size, "n": n, "enqueue_MBps": figures["enqueue_rate"] * size / 1e6,
                 "drain_MBps": rate * size / 1e6, "drain_tasks_per_s": rate,
                 "enqueue_tasks_per_s": figures["enqueue_rate"]}
        points.append(point)
        _label(bench, "payload", broker, f"{size:,} B x {n:,}: enqueue {point['enqueue_MBps']:.1f} MB/s, "
                                         f"drain {point['drain_MBps']:.1f} MB/s ({rate:,.0f} tasks/s)")


def _memory(bench: Bench, broker: str, points: list[dict[str, Any]]) -> None:
    from run import wait_signal

    pool, n = bench.args.series_pool, bench.args.memory_tasks
    queue = bench.queue_name(broker, "celeriac", pool, "memory", 0)
    signal = bench.tmp / f"{queue}.signal"
    env = bench.env("celeriac", broker, "drain", queue, signal)
    try:
        bench.client("celeriac", env, "purge")
        worker = bench.start_worker("celeriac", env, pool, queue)
        worker.wait_ready(min(bench.args.timeout, 120))
    except RuntimeError as exc:
        points.append({"broker": broker, "x": n, "error": str(exc)})
        _label(bench, "memory", broker, f"FAILED {str(exc)[:300]}")
        return
    client = None
    try:
        time.sleep(1.0)
        idle = worker.rss_kb()[1] / 1024
        trace = [[0, idle]]
        cmd = [sys.executable, str(HERE / "bench_client.py"), "celeriac", "enqueue", str(n)]
        client = subprocess.Popen(cmd, cwd=bench.app_dirs["celeriac"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        step = max(1, n // 20)
        deadline = time.monotonic() + bench.args.timeout * max(1.0, n / max(bench.args.tasks, 1))
        error = None
        while True:
            done = (signal.stat().st_size if signal.exists() else 0) // SIGNAL_LINE
            if done >= trace[-1][0] + step or done >= n:
                trace.append([done, worker.rss_kb()[1] / 1024])
            if done >= n:
                break
            if not worker.alive():
                error = f"worker exited with {worker.returncode()}: {worker.log_tail()}"
                break
            if client.poll() not in (None, 0):
                error = f"enqueue client exited with {client.returncode}: {client.stderr.read().decode()[-1000:]}"
                break
            if time.monotonic() > deadline:
                error = f"{done} of {n} tasks after the timeout"
                break
            time.sleep(0.05)
        if error is None:
            error = wait_signal(worker, signal, n, 5.0)
        if error is not None:
            points.append({"broker": broker, "x": n, "error": error})
            _label(bench, "memory", broker, f"FAILED {error[:300]}")
            return
        time.sleep(1.0)
        final = worker.rss_kb()[1] / 1024
        trace.append([n, final])
        peak = max(v for _, v in trace)
        point = {"broker": broker, "x": n, "idle_MiB": idle, "final_MiB": final, "peak_MiB": peak,
                 "growth_pct": 100.0 * (final / idle - 1.0), "trace": trace}
        points.append(point)
        _label(bench, "memory", broker, f"{n:,} tasks: idle {idle:.1f} MiB, after {final:.1f} MiB "
                                        f"({point['growth_pct']:+.1f} %), peak {peak:.1f} MiB")
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(5)
        if worker.alive():
            worker.stop()
        else:
            worker.kill()
        signal.unlink(missing_ok=True)


def _summary(name: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    """Per broker: the verdict on the series' target."""
    good = [p for p in points if not p.get("error")]
    out: dict[str, Any] = {}
    for broker in dict.fromkeys(p["broker"] for p in good):
        mine = [p for p in good if p["broker"] == broker]
        if name == "backlog":
            rates = [p.get("from_ready", p["from_start"]) for p in mine]
            spread = 1.0 - min(rates) / max(rates)
            out[broker] = {"min": min(rates), "max": max(rates), "spread": spread, "flat_within_20pct": spread <= 0.2}
        elif name == "chord":
            per = {f"{p['kind']} {p['x']}": p["ms_per_task"] for p in mine}
            chords = [p for p in mine if p["kind"] == "chord"]
            growth = (chords[-1]["ms_per_task"] / chords[0]["ms_per_task"]) if len(chords) > 1 else None
            out[broker] = {"ms_per_task": per, "largest_over_smallest_per_task": growth}
        elif name == "payload":
            out[broker] = {str(p["x"]): p["drain_MBps"] for p in mine}
        elif name == "memory":
            out[broker] = {"growth_pct": mine[-1]["growth_pct"], "within_10pct": mine[-1]["growth_pct"] <= 10.0}
    return out


def format_series(series: dict[str, Any]) -> str:
    """The series as short markdown tables."""
    lines: list[str] = []
    for name, data in series.items():
        points = data["points"]
        lines.append(f"Series {name} (Celeriac, {data['pool']} pool):")
        if name == "backlog":
            lines.append("| broker | backlog | tasks/s from ready | runs (range) | from start | first to last "
                         "| enqueue/s |")
            lines.append("|---|---|---|---|---|---|---|")
            for p in points:
                if p.get("error"):
                    lines.append(f"| {p['broker']} | {p.get('x', '-')} | FAILED | | | | |")
                    continue
                runs = p.get("runs", 1)
                low, high = p.get("from_ready_range") or (math.nan, math.nan)
                spread = f"{runs} ({low:,.0f}-{high:,.0f})" if runs > 1 else "1"
                lines.append(f"| {p['broker']} | {p['x']:,} | {p.get('from_ready', math.nan):,.0f} | {spread} | "
                             f"{p['from_start']:,.0f} | {p['first_to_last']:,.0f} | {p['enqueue_rate']:,.0f} |")
            for broker, s in data["summary"].items():
                lines.append(f"  {broker}: spread {100 * s['spread']:.0f} % "
                             f"({'flat within 20 %' if s['flat_within_20pct'] else 'NOT flat within 20 %'})")
        elif name == "chord":
            lines.append("| broker | kind | header tasks | seconds | ms per task |")
            lines.append("|---|---|---|---|---|")
            for p in points:
                if p.get("error"):
                    lines.append(f"| {p['broker']} | {p.get('kind', '-')} | {p.get('x', '-')} | FAILED | |")
                    continue
                lines.append(f"| {p['broker']} | {p['kind']} | {p['x']:,} | {p['seconds']:.3f} | "
                             f"{p['ms_per_task']:.3f} |")
        elif name == "payload":
            lines.append("| broker | payload B | tasks | enqueue MB/s | drain MB/s | drain tasks/s |")
            lines.append("|---|---|---|---|---|---|")
            for p in points:
                if p.get("error"):
                    lines.append(f"| {p['broker']} | {p.get('x', '-')} | {p.get('n', '-')} | FAILED | | |")
                    continue
                lines.append(f"| {p['broker']} | {p['x']:,} | {p['n']:,} | {p['enqueue_MBps']:.2f} | "
                             f"{p['drain_MBps']:.2f} | {p['drain_tasks_per_s']:,.0f} |")
        elif name == "memory":
            lines.append("| broker | tasks | idle MiB | after MiB | growth | peak MiB |")
            lines.append("|---|---|---|---|---|---|")
            for p in points:
                if p.get("error"):
                    lines.append(f"| {p['broker']} | {p.get('x', '-')} | FAILED | | | |")
                    continue
                lines.append(f"| {p['broker']} | {p['x']:,} | {p['idle_MiB']:.1f} | {p['final_MiB']:.1f} | "
                             f"{p['growth_pct']:+.1f} % | {p['peak_MiB']:.1f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_series(series: dict[str, Any], json_path: Path) -> list[Path]:
    """One PNG per series beside ``json_path``; returns the paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write("matplotlib is not installed: no plots (pip install -r bench/requirements.txt)\n")
        return []
    written = []
    for name, data in series.items():
        points = [p for p in data["points"] if not p.get("error")]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        brokers = list(dict.fromkeys(p["broker"] for p in points))
        if name == "backlog":
            for broker in brokers:
                mine = [p for p in points if p["broker"] == broker]
                ax.plot([p["x"] for p in mine], [p.get("from_ready", p["from_start"]) for p in mine], "o-",
                        label=broker)
            ax.set_xscale("log")
            ax.set_xlabel("tasks queued before the worker starts")
            ax.set_ylabel("drain rate, tasks/s (from ready)")
            ax.set_ylim(bottom=0)
            ax.set_title("Drain rate vs backlog (flat is the target)")
        elif name == "chord":
            for broker in brokers:
                chords = [p for p in points if p["broker"] == broker and p["kind"] == "chord"]
                groups = [p for p in points if p["broker"] == broker and p["kind"] == "group"]
                line = ax.plot([p["x"] for p in chords], [p["seconds"] for p in chords], "o-",
                               label=f"{broker} chord")
                if chords:
                    big = chords[-1]
                    ax.plot([p["x"] for p in chords], [big["seconds"] * p["x"] / big["x"] for p in chords], ":",
                            color=line[0].get_color(), linewidth=0.8)
                if groups:
                    ax.plot([p["x"] for p in groups], [p["seconds"] for p in groups], "s",
                            color=line[0].get_color() if line else None, label=f"{broker} group")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("header tasks")
            ax.set_ylabel("seconds to the result")
            ax.set_title("Chord / group time vs size (dotted: linear through the largest)")
        elif name == "payload":
            for broker in brokers:
                mine = [p for p in points if p["broker"] == broker]
                line = ax.plot([p["x"] for p in mine], [p["drain_MBps"] for p in mine], "o-", label=f"{broker} drain")
                ax.plot([p["x"] for p in mine], [p["enqueue_MBps"] for p in mine], "x--",
                        color=line[0].get_color(), label=f"{broker} enqueue")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("payload bytes per task")
            ax.set_ylabel("MB/s of payload")
            ax.set_title("Throughput vs payload size")
        elif name == "memory":
            for broker in brokers:
                p = [q for q in points if q["broker"] == broker][-1]
                line = ax.plot([t[0] for t in p["trace"]], [t[1] for t in p["trace"]], "o-", markersize=3,
                               label=f"{broker} ({p['growth_pct']:+.1f} %)")
                ax.axhline(p["idle_MiB"] * 1.1, color=line[0].get_color(), linestyle=":", linewidth=0.8)
            ax.set_xlabel("tasks executed")
            ax.set_ylabel("worker RSS, MiB")
            top = max(max(t[1] for t in q["trace"]) for q in points)
            ax.set_ylim(0, max(top, max(q["idle_MiB"] for q in points) * 1.1) * 1.15)
            ax.set_title("Worker memory while executing tasks (dotted: idle + 10 %)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = json_path.with_name(f"{json_path.stem}-{name}.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png)
        plt.close(fig)
        written.append(png)
    return written
