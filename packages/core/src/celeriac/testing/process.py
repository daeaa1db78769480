"""Workers started through their real command line, and live-server checks, for tests.

The pytest plugin exposes :func:`spawn_worker` as a fixture::

    def test_tutorial(spawn_worker, tmp_path):
        worker = spawn_worker([sys.executable, "-m", "celeriac", "-A", "proj", "worker", "-l", "info"],
                              cwd=project_dir, env={"CELERIAC_BROKER_URL": url})
        worker.wait_ready()
        ...

and :func:`require_server` skips a test when a broker is down, or fails it when
``CELERIAC_REQUIRE_BROKERS=1`` (as CI sets).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

__all__ = ["WorkerProcess", "require_server", "server_reachable", "spawn_worker"]


def server_reachable(url: str, default_port: int, timeout: float = 2.0) -> bool:
    """True when a TCP connection to ``url``'s host and port succeeds."""
    parts = urlsplit(url.split(";")[0])
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or default_port), timeout):
            return True
    except OSError:
        return False


def require_server(name: str, url: str, default_port: int, env_var: str) -> str:
    """Return ``url`` when its server answers; otherwise skip the test with the reason, or fail
    it when ``CELERIAC_REQUIRE_BROKERS=1``."""
    if server_reachable(url, default_port):
        return url
    message = f"{name} is not reachable at {url} (set {env_var} to point the tests elsewhere)"
    if os.environ.get("CELERIAC_REQUIRE_BROKERS") == "1":
        pytest.fail(f"{message}; CELERIAC_REQUIRE_BROKERS=1 requires it")
    pytest.skip(message)


class WorkerProcess:
    """A worker started through its real command line, logging to a file."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], log_path: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        """Everything the worker printed so far."""
        with open(self.log_path) as handle:
            return handle.read()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the worker's "ready." line; fail with its log if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"worker did not become ready:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash would (the whole process group: pool children too)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in 20 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers (``argv``, ``cwd``, extra ``env``); all are stopped after the test.

    ``cwd`` is put on ``PYTHONPATH`` so the worker imports the project found there.
    """
    started: list[WorkerProcess] = []

    def spawn(argv: list[str], cwd: str | Path, env: dict[str, str] | None = None) -> WorkerProcess:
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = str(cwd)
        worker = WorkerProcess(argv, str(cwd), full_env, str(tmp_path / f"worker{len(started)}.log"))
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.stop()
