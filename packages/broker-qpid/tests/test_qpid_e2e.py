"""End to end through the real ``celeriac`` command line over RabbitMQ's AMQP 1.0 plugin.

The seed tutorial with ``-b qpid://guest:guest@localhost:5672//`` and ``rpc://`` results,
``inspect active``, ``status`` and ``events --dump``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qpid_support import (
    CELERIAC,
    celeriac,
    copy_seed,
    delete_queues,
    run_client,
    unique,
)

URL = "qpid://guest:guest@localhost:5672//"


@pytest.fixture
def seed_project(tmp_path: Path, qpid_url: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """A copy of the seed's project whose default queue is unique to this test."""
    queue = unique("e2e")
    copy_seed(tmp_path, f"app.conf.task_default_queue = {queue!r}  # test isolation")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CELERIAC_BROKER_URL": qpid_url,
           "CELERIAC_RESULT_BACKEND": "rpc://"}
    yield tmp_path, env
    delete_queues([queue])


def test_seed_tutorial_through_the_cli(seed_project: tuple[Path, dict[str, str]],
                                       spawn_worker: Callable[..., Any]) -> None:
    cwd, env = seed_project
    node = f"q{os.getpid()}@localhost"
    worker = spawn_worker([*CELERIAC, "-A", "proj", "worker", "-l", "info", "-c", "2", "-P", "threads",
                           "-b", URL, "-n", node], cwd, env)
    worker.wait_ready()
    assert "qpid://guest:**@localhost:5672//" in worker.log()
    assert "AMQP 1.0" in worker.log()
    got = run_client("""
        import json, time
        from celeriac import chain, group
        from proj.tasks import add, mul, xsum, slow_add, flaky
        out = {}
        res = add.delay(4, 4)
        out["add"] = res.get(timeout=20)
        out["ready"] = res.ready()
        out["mul"] = mul.delay(3, 7).get(timeout=20)
        out["xsum"] = xsum.delay([1, 2, 3]).get(timeout=20)
        out["group"] = group(add.s(i, i) for i in range(10))().get(timeout=20)
        started = time.time()
        out["countdown"] = add.apply_async((1, 1), countdown=1).get(timeout=20)
        out["waited"] = time.time() - started
        out["flaky"] = flaky.delay().get(timeout=20)
        slow = slow_add.delay(1, 2, 1.0)
        states = set()
        while not slow.ready():
            states.add(slow.state)
            time.sleep(0.05)
        out["slow_states"] = sorted(states)
        out["slow"] = slow.get(timeout=20)
        out["chain"] = chain(add.s(4, 4), mul.s(8))().get(timeout=20)
        print(json.dumps(out))
    """, cwd, env)
    assert got["add"] == 8 and got["ready"] is True
    assert got["mul"] == 21 and got["xsum"] == 6
    assert got["group"] == [i + i for i in range(10)]
    assert got["countdown"] == 2 and got["waited"] >= 1.0
    assert got["flaky"] == "succeeded after 2 retries"
    assert got["slow"] == 3 and "STARTED" in got["slow_states"]
    assert got["chain"] == 64

    task_id = run_client("""
        import json
        from proj.tasks import slow_add
        print(json.dumps(slow_add.delay(2, 2, delay=12).id))
    """, cwd, env)
    active = ""
    deadline = time.monotonic() + 40  # each inspect is a process start and a 1 s wait
    while task_id not in active:
        assert time.monotonic() < deadline, f"inspect active never listed {task_id}:\n{active}"
        active = celeriac(cwd, env, "-A", "proj", "inspect", "active")
    assert f"->  {node}: OK" in active

    assert f"{node}: OK" in celeriac(cwd, env, "-A", "proj", "status")

    assert "task events enabled" in celeriac(cwd, env, "-A", "proj", "control", "enable_events")
    dump = subprocess.Popen([*CELERIAC, "-A", "proj", "events", "--dump"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        time.sleep(2.0)  # the subscription is up before the task is sent (events are not stored)
        assert run_client("""
            import json
            from proj.tasks import add
            print(json.dumps(add.delay(5, 5).get(timeout=20)))
        """, cwd, env) == 10
        seen: list[str] = []
        deadline = time.monotonic() + 20
        assert dump.stdout is not None
        while not any("task succeeded" in line for line in seen):
            assert time.monotonic() < deadline, "".join(seen)
            seen.append(dump.stdout.readline())
        assert any(node in line for line in seen)
    finally:
        os.killpg(dump.pid, signal.SIGINT)
        try:
            dump.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(dump.pid, signal.SIGKILL)
            dump.wait(5)
    worker.stop()
    assert "Traceback" not in worker.log(), worker.log()[-3000:]
