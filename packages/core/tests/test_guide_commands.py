"""The operations command lines of Celery's "Next Steps" guide, typed with ``celeriac`` for
``celery``, through the real CLI on the embedded broker, Redis and RabbitMQ.

(``multi`` lines: test_multi.py; the live ``events`` screen: test_events_monitor.py.)
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from celeriac.testing.process import require_server

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "examples"
REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def guide(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> dict[str, Any]:
    """The guide's ``proj`` package in a directory of its own, and the broker/backend to use."""
    shutil.copytree(EXAMPLES / "proj", tmp_path / "proj")
    if request.param == "sqlite":
        broker, backend = f"sqlite:///{tmp_path}/broker.db", f"sqlite:///{tmp_path}/results.db"
    elif request.param == "redis":
        broker = backend = require_server("Redis", REDIS_URL, 6379, "CELERIAC_TEST_REDIS_URL")
    else:
        broker, backend = require_server("RabbitMQ", AMQP_URL, 5672, "CELERIAC_TEST_AMQP_URL"), "rpc://"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CELERIAC_RESULT_BACKEND": backend}
    env.pop("CELERIAC_BROKER_URL", None)
    env["CELERIAC_BROKER_URL"] = broker  # for the client code; the worker gets it with -b
    return {"cwd": tmp_path, "env": env, "broker": broker, "node": f"g{uuid.uuid4().hex[:6]}@{socket.gethostname()}"}


def celeriac(guide: dict[str, Any], line: str, stdin: str | None = None, timeout: float = 60) -> str:
    """Run one guide line (``celeriac ...``); return its stdout; fail with its output on error.

    A remote-control line that got no reply within its 1 s default (exit code 69, as Celery's)
    is tried again, twice at most: on a loaded CI machine a reply can miss that window."""
    args = line.split()[1:]
    for _ in range(3):
        out = subprocess.run([sys.executable, "-m", "celeriac", *args], cwd=guide["cwd"], env=guide["env"],
                             input=stdin, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 69:
            break
    assert out.returncode == 0, f"$ {line}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def client(guide: dict[str, Any], code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=guide["cwd"], env=guide["env"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_guides_operations_commands(guide: dict[str, Any], spawn_worker: Any) -> None:
    node = guide["node"]
    celeriac(guide, "celeriac -A proj purge", stdin="y\n")
    assert "--autoscale" in celeriac(guide, "celeriac worker --help")
    worker = spawn_worker([sys.executable, "-m", "celeriac", "-A", "proj", "worker", "-l", "INFO", "-Q",
                           "hipri,celery", "-b", guide["broker"], "-n", node, "-c", "2", "-P", "threads"],
                          cwd=guide["cwd"], env=guide["env"])
    worker.wait_ready()
    banner = worker.log()
    assert "[Configuration]" in banner and ". broker:" in banner
    assert ". celery:      exchange:celery(direct) binding:celery" in banner
    assert ". hipri:       exchange:hipri(direct) binding:hipri" in banner

    task_id = client(guide, "from proj.tasks import slow_add; print(slow_add.delay(2, 2, delay=15).id)")
    active = ""
    deadline = time.monotonic() + 20
    while task_id not in active:
        assert time.monotonic() < deadline, f"inspect active never listed {task_id}:\n{active}"
        active = celeriac(guide, "celeriac -A proj inspect active")
    assert f"->  {node}: OK" in active and "time_start" in active
    targeted = celeriac(guide, f"celeriac -A proj inspect active --destination={node}")
    assert node in targeted and "1 node online." in targeted

    assert "task events enabled" in celeriac(guide, "celeriac -A proj control enable_events")
    dump = subprocess.Popen([sys.executable, "-m", "celeriac", "-A", "proj", "events", "--dump"],
                            cwd=guide["cwd"], env=guide["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(1.5)  # the subscription is up before the task is sent (events are not stored)
        assert client(guide, "from proj.tasks import add; print(add.delay(4, 4).get(timeout=20))") == "8"
        seen: list[str] = []
        deadline = time.monotonic() + 20
        assert dump.stdout is not None
        # Other workers on the same database (with events just enabled by the broadcast) may
        # report their own tasks: wait for this worker's line.
        while not any("task succeeded" in line and line.startswith(node) for line in seen):
            assert time.monotonic() < deadline, "".join(seen)
            seen.append(dump.stdout.readline())
    finally:
        os.killpg(dump.pid, signal.SIGINT)
        assert dump.wait(10) == 0
    assert "task events disabled" in celeriac(guide, "celeriac -A proj control disable_events")

    status = celeriac(guide, "celeriac -A proj status")
    assert f"{node}: OK" in status
    later = client(guide, "from proj.tasks import add; print(add.apply_async((1, 2), countdown=60).id)")
    scheduled = ""
    deadline = time.monotonic() + 20
    # Held by the worker, or parked in the broker (RabbitMQ: in the delay levels).
    while later not in scheduled:
        assert time.monotonic() < deadline, f"inspect scheduled never listed {later}:\n{scheduled}"
        scheduled = celeriac(guide, "celeriac -A proj inspect scheduled")
    worker.stop()
    assert "Traceback" not in worker.log(), worker.log()
    celeriac(guide, "celeriac -A proj purge -f")
