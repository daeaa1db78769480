"""Remote control across fleets: Celery's own tools (``celery status``/``inspect``, Flower) see
Celeriac workers, and ``celeriac status``/``inspect`` see Celery workers, on Redis and RabbitMQ.

Everything runs through the real command lines in subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celeriac.testing.process import require_server

REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")
AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return require_server("Redis", REDIS_URL, 6379, "CELERIAC_TEST_REDIS_URL")
    return require_server("RabbitMQ", AMQP_URL, 5672, "CELERIAC_TEST_AMQP_URL")


def _project(root: Path, broker: str) -> None:
    """``cproj`` (a Celeriac app) and ``capp`` (a Celery app) on the same broker and queue."""
    queue = f"interop-{uuid.uuid4().hex[:8]}"
    for module, import_line, cls in (("cproj", "from celeriac import Celeriac", "Celeriac"),
                                     ("capp", "from celery import Celery", "Celery")):
        (root / f"{module}.py").write_text(textwrap.dedent(f"""
            import os, time
            {import_line}
            app = {cls}({module!r}, broker={broker!r})
            app.conf.task_default_queue = {queue!r}

            @app.task(name="interop.wait")
            def wait(path):
                deadline = time.monotonic() + 20
                while not os.path.exists(path) and time.monotonic() < deadline:
                    time.sleep(0.05)
                return "released"
        """))


def _run(root: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("CELERIAC_BROKER_URL", None)
    return subprocess.run([sys.executable, "-m", *argv], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _until(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_celery_tools_see_a_celeriac_worker(broker_url: str, spawn_worker: Any, tmp_path: Path) -> None:
    _project(tmp_path, broker_url)
    node = f"celeriac-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    worker = spawn_worker([sys.executable, "-m", "celeriac", "-A", "cproj", "worker", "-l", "info",
                           "-P", "threads", "-c", "2", "-n", node, "-E"], cwd=tmp_path)
    worker.wait_ready()
    marker = tmp_path / "release"
    try:
        status = _until(lambda: (r := _run(tmp_path, "celery", "-A", "capp", "status", "-t", "3",
                                           "-d", node)).returncode == 0 and r)
        assert status, "celery status: no reply from the Celeriac worker\n" + worker.log()[-3000:]
        assert f"{node}: OK" in status.stdout
        ping = _run(tmp_path, "celery", "-A", "capp", "inspect", "ping", "-t", "3", "-d", node)
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
        registered = _run(tmp_path, "celery", "-A", "capp", "inspect", "registered", "-t", "3", "-d", node)
        assert "interop.wait" in registered.stdout, registered.stdout + registered.stderr
        sent = _run(tmp_path, "celery", "-A", "capp", "call", "interop.wait", "--args", json.dumps([str(marker)]))
        task_id = sent.stdout.strip()
        assert sent.returncode == 0 and task_id, sent.stderr
        active = _until(lambda: task_id in (r := _run(tmp_path, "celery", "-A", "capp", "inspect", "active",
                                                      "-t", "3", "-d", node, "-j")).stdout and r)
        assert active, "celery inspect active did not list the running task"
        info = json.loads(active.stdout)[node][0]
        assert info["id"] == task_id and info["name"] == "interop.wait"
        assert "Traceback" not in worker.log() and "RESOURCE_LOCKED" not in worker.log()
    finally:
        marker.touch()


def test_celeriac_tools_see_a_celery_worker(broker_url: str, spawn_worker: Any, tmp_path: Path) -> None:
    _project(tmp_path, broker_url)
    node = f"celery-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    worker = spawn_worker([sys.executable, "-m", "celery", "-A", "capp", "worker", "-l", "info",
                           "-P", "threads", "-c", "2", "-n", node, "--without-mingle",
                           "--without-gossip"], cwd=tmp_path)
    worker.wait_ready()
    status = _until(lambda: (r := _run(tmp_path, "celeriac", "-A", "cproj", "status", "-t", "3")).returncode == 0
                    and node in r.stdout and r)
    assert status, "celeriac status did not see the Celery worker\n" + worker.log()[-3000:]
    ping = _run(tmp_path, "celeriac", "-A", "cproj", "inspect", "ping", "-t", "3", "-d", node, "-j")
    assert json.loads(ping.stdout) == {node: {"ok": "pong"}}
    registered = _run(tmp_path, "celeriac", "-A", "cproj", "inspect", "registered", "-t", "3", "-d", node, "-j")
    assert "interop.wait" in json.loads(registered.stdout)[node]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_flower_api_lists_a_celeriac_worker_and_its_tasks(broker_url: str, spawn_worker: Any,
                                                         tmp_path: Path) -> None:
    pytest.importorskip("flower")
    _project(tmp_path, broker_url)
    node = f"celeriac-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    worker = spawn_worker([sys.executable, "-m", "celeriac", "-A", "cproj", "worker", "-l", "info",
                           "-P", "threads", "-c", "2", "-n", node, "-E"], cwd=tmp_path)
    worker.wait_ready()
    port = _free_port()
    flower = spawn_worker([sys.executable, "-m", "celery", "-A", "capp", "flower", f"--port={port}",
                           "--address=127.0.0.1"], cwd=tmp_path, env={"FLOWER_UNAUTHENTICATED_API": "true"})

    def get(path: str) -> Any:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    workers = _until(lambda: (w := get("/api/workers?refresh=1")) and node in w and w, timeout=30)
    assert workers, "Flower did not list the worker\n" + flower.log()[-3000:]
    marker = tmp_path / "release"
    marker.touch()
    sent = _run(tmp_path, "celeriac", "-A", "cproj", "call", "interop.wait", "--args", json.dumps([str(marker)]))
    task_id = sent.stdout.strip().split()[-1]
    tasks = _until(lambda: (t := get("/api/tasks")) and task_id in t
                   and t[task_id].get("state") == "SUCCESS" and t, timeout=30)
    assert tasks, f"Flower did not see task {task_id} succeed: {get('/api/tasks')}"
    assert tasks[task_id]["name"] == "interop.wait" and tasks[task_id]["worker"] == node
