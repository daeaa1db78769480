"""The client side of a workload, run in its own process: ``python bench_client.py SYSTEM ACTION N``.

It imports the generated ``benchapp`` (``PYTHONPATH`` points at the system's app directory), does
one action and prints one JSON object on stdout:

``purge``      declare the benchmark queue and empty it: ``{"purged": count}``
``enqueue N``  publish N ``noop`` tasks one by one: ``{"seconds": s, "rate": tasks/s}``
``roundtrip N`` N sequential ``add.delay(2, 2).get()`` after 20 untimed warm-up calls:
               ``{"p50": ms, "p90": ms, "p99": ms, "mean": ms}``
``chord N``    ``chord(add.s(i, i) for i in range(N))(xsum.s()).get()``: ``{"seconds": s}``
``group N``    ``group(add.s(i, i) for i in range(N))().get()``: ``{"seconds": s}``
               (both after one untimed ``add(0, 0)`` round trip that connects the client)
``payload N SIZE`` publish N ``sink(data)`` with a ``SIZE``-byte string: ``{"seconds": s, "rate": tasks/s}``

Dramatiq's client publishes with ``actor.send()`` and waits with ``message.get_result(block=True)``
(its ``Results`` middleware); it has no chord (a group's completion callback does not receive the
header's results), so ``chord`` and ``group`` are Celery and Celeriac only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

TIMEOUT = float(os.environ.get("BENCH_GET_TIMEOUT", "60"))


def purge(system: str) -> int:
    """Declare the default queue and purge it with the system's own client."""
    import benchapp

    if system == "dramatiq":
        broker = benchapp.broker
        broker.declare_queue(benchapp.QUEUE)
        broker.flush(benchapp.QUEUE)
        return 0
    app = benchapp.app
    name = app.conf.task_default_queue
    if system == "celery":
        with app.connection_for_write() as conn:
            bound = app.amqp.queues[name](conn.default_channel)
            bound.declare()
            return int(bound.purge() or 0)
    broker = app.broker
    broker.declare(app.router.queue(name))
    return int(broker.purge(name) or 0)


def enqueue(system: str, n: int) -> dict[str, float]:
    """Publish ``n`` no-op tasks; the first one (connection setup) is not timed."""
    import benchapp

    send = benchapp.noop.send if system == "dramatiq" else benchapp.noop.delay
    send()
    start = time.perf_counter()
    for _ in range(n - 1):
        send()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rate": (n - 1) / seconds}


def payload(system: str, n: int, size: int) -> dict[str, float]:
    """Publish ``n`` ``sink(data)`` tasks carrying ``size`` bytes each (the first one is not timed)."""
    import benchapp

    send = benchapp.sink.send if system == "dramatiq" else benchapp.sink.delay
    data = "x" * size
    send(data)
    start = time.perf_counter()
    for _ in range(n - 1):
        send(data)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rate": (n - 1) / seconds}


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted ``values``, nearest rank."""
    index = min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))
    return values[index]


def roundtrip(system: str, n: int) -> dict[str, float]:
    """Sequential ``add.delay(2, 2).get()`` latencies in ms."""
    import benchapp

    add = benchapp.add
    if system == "dramatiq":
        timeout_ms = int(TIMEOUT * 1000)

        def call() -> Any:
            return add.send(2, 2).get_result(block=True, timeout=timeout_ms)
    else:
        def call() -> Any:
            return add.delay(2, 2).get(timeout=TIMEOUT)
    for _ in range(20):
        assert call() == 4
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        value = call()
        samples.append((clock() - start) * 1000.0)
        if value != 4:
            raise AssertionError(f"add(2, 2) returned {value!r}")
    samples.sort()
    return {"p50": percentile(samples, 0.5), "p90": percentile(samples, 0.9),
            "p99": percentile(samples, 0.99), "mean": sum(samples) / len(samples)}


def warm_up() -> None:
    """One untimed ``add(0, 0)`` round trip: connects the client to the broker and the backend.

    A fresh client's first publish imports and connects (1-3 s on a loaded 2-core machine), which
    would otherwise be most of a small chord's time.
    """
    import benchapp

    assert benchapp.add.delay(0, 0).get(timeout=TIMEOUT) == 0


def chord(n: int) -> dict[str, float]:
    """Time from building a chord of ``n`` ``add`` into ``xsum`` to its result (after :func:`warm_up`)."""
    import benchapp

    warm_up()
    start = time.perf_counter()
    result = benchapp.chord(benchapp.add.s(i, i) for i in range(n))(benchapp.xsum.s())
    value = result.get(timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    if value != n * (n - 1):
        raise AssertionError(f"chord returned {value!r}, expected {n * (n - 1)}")
    return {"seconds": seconds}


def group(n: int) -> dict[str, float]:
    """Time from building a group of ``n`` ``add`` to all its results (after :func:`warm_up`)."""
    import benchapp

    warm_up()
    start = time.perf_counter()
    result = benchapp.group(benchapp.add.s(i, i) for i in range(n))()
    values = result.get(timeout=TIMEOUT)
    seconds = time.perf_counter() - start
    if list(values) != [2 * i for i in range(n)]:
        raise AssertionError(f"group returned {str(values)[:200]}")
    return {"seconds": seconds}


def main(argv: list[str]) -> int:
    """Run one action and print its JSON result."""
    system, action = argv[0], argv[1]
    n = int(argv[2]) if len(argv) > 2 else 0
    out: Any
    if action == "purge":
        out = {"purged": purge(system)}
    elif action == "enqueue":
        out = enqueue(system, n)
    elif action == "payload":
        out = payload(system, n, int(argv[3]))
    elif action == "roundtrip":
        out = roundtrip(system, n)
    elif action == "chord":
        out = chord(n)
    elif action == "group":
        out = group(n)
    else:
        raise SystemExit(f"unknown action {action!r}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
