"""Shared fixtures: the live RabbitMQ URL, skipping cleanly when it is not running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from celeriac_amqp import AMQPBroker

AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672//")


def _reachable(url: str) -> bool:
    parts = urlsplit(url.split(";")[0])
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), 2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The RabbitMQ URL under test (skips, or fails with CELERIAC_REQUIRE_BROKERS=1)."""
    if not _reachable(AMQP_URL):
        message = f"RabbitMQ is not reachable at {AMQP_URL} (set CELERIAC_TEST_AMQP_URL)"
        if os.environ.get("CELERIAC_REQUIRE_BROKERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return AMQP_URL


@pytest.fixture
def broker(amqp_url: str) -> Iterator[AMQPBroker]:
    """A connected broker, closed after the test."""
    b = AMQPBroker(amqp_url, {})
    b.connect()
    yield b
    b.close()


@pytest.fixture
def restart_rabbitmq(amqp_url: str) -> Iterator[Callable[[], None]]:
    """A function that restarts the local RabbitMQ application (``rabbitmqctl stop_app`` then
    ``start_app``); RabbitMQ is running again after the test whatever happened."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")

    def restart() -> None:
        try:
            subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        finally:
            ensure_rabbitmq_running()

    try:
        yield restart
    finally:
        ensure_rabbitmq_running()


def rabbitmq_running() -> bool:
    """True when the local RabbitMQ application accepts AMQP connections."""
    return _reachable(AMQP_URL)


def ensure_rabbitmq_running(timeout: float = 60.0) -> None:
    """Start the RabbitMQ application if a test stopped it, and wait until it accepts clients."""
    deadline = time.monotonic() + timeout
    subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=timeout, check=False)
    while time.monotonic() < deadline:
        if rabbitmq_running():
            return
        time.sleep(0.2)
    raise RuntimeError("RabbitMQ did not come back")


class WorkerProcess:
    """A worker started through its real command line, logging to a file."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], log_path: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
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
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers (``argv``, ``cwd``, extra ``env``); all are stopped after the test."""
    started: list[WorkerProcess] = []

    def spawn(argv: list[str], cwd: str | Path, env: dict[str, str] | None = None) -> WorkerProcess:
        full_env = {**os.environ, **(env or {})}
        full_env.pop("PYTHONPATH", None)
        full_env["PYTHONPATH"] = str(cwd)
        worker = WorkerProcess(argv, str(cwd), full_env, str(tmp_path / f"worker{len(started)}.log"))
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.stop()
