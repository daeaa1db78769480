"""Interop through real workers over one RabbitMQ with rpc:// results.

Celery client -> Celeriac worker (``celeriac`` command line) and Celeriac client -> Celery
worker (``celery`` command line), with single tasks, groups and chains. Chords cannot be tested
here: Celery's own rpc:// backend refuses them (a Celery client raises before sending, and a
Celery worker never counts the members), so chord interop needs a backend with a shared store.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celeriac.plugins import create_broker

CELERIAC = [sys.executable, "-m", "celeriac.cli.main"]

TASKS = '''
import os
{header}
app.conf.task_default_queue = os.environ["E2E_QUEUE"]


@app.task(name="e2e.add")
def add(x, y):
    return x + y


@app.task(name="e2e.mul")
def mul(x, y):
    return x * y


@app.task(name="e2e.fail")
def fail(text):
    raise KeyError(text)
'''

CELERIAC_HEADER = '''from celeriac import Celeriac
app = Celeriac("e2e", broker=os.environ["E2E_BROKER"], backend="rpc://")'''
CELERY_HEADER = '''from celery import Celery
app = Celery("e2e", broker=os.environ["E2E_BROKER"].replace("amqp://", "pyamqp://", 1),
             backend="rpc://")'''


@pytest.fixture
def project(tmp_path: Path, amqp_url: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """Two app modules with the same task names: ``celeriac_app`` and ``celery_app``."""
    (tmp_path / "celeriac_app.py").write_text(TASKS.format(header=CELERIAC_HEADER))
    (tmp_path / "celery_app.py").write_text(TASKS.format(header=CELERY_HEADER))
    queue = f"celeriac-e2e-rpc-{uuid.uuid4().hex[:10]}"
    env = {"E2E_BROKER": amqp_url, "E2E_QUEUE": queue}
    sys.path.insert(0, str(tmp_path))
    yield tmp_path, env
    sys.path.remove(str(tmp_path))
    for name in ("celeriac_app", "celery_app"):
        sys.modules.pop(name, None)
    broker = create_broker(amqp_url, {})
    broker.delete_queue(queue)
    broker.close()


def _import(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    __import__(name)
    return sys.modules[name]


def test_celery_client_to_celeriac_worker(project: tuple[Path, dict[str, str]],
                                          spawn_worker: Callable[..., Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, env = project
    worker = spawn_worker([*CELERIAC, "-A", "celeriac_app", "worker", "-l", "info", "-c", "4",
                           "-P", "threads"], cwd, env)
    worker.wait_ready()
    from celery import chain, group

    client = _import("celery_app", env, monkeypatch)
    try:
        assert client.add.delay(2, 3).get(timeout=20) == 5
        with pytest.raises(KeyError):
            client.fail.delay("nope").get(timeout=20)
        assert group(client.add.s(i, i) for i in range(10))().get(timeout=20) == [
            i + i for i in range(10)]
        # Celery's client puts its reply_to in every step, so the last step answers it.
        assert chain(client.add.s(2, 2), client.mul.s(10), client.add.s(1))().get(timeout=20) == 41
        # A Celery ETA message (no broker-side delay) still runs at its ETA, not before.
        started = time.monotonic()
        assert client.add.apply_async((1, 1), countdown=1.5).get(timeout=20) == 2
        assert time.monotonic() - started >= 1.4
    finally:
        client.app.close()


def test_celeriac_client_to_celery_worker(project: tuple[Path, dict[str, str]],
                                          spawn_worker: Callable[..., Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, env = project
    celery = [sys.executable, "-m", "celery"]
    worker = spawn_worker([*celery, "-A", "celery_app", "worker", "-l", "info", "-c", "4",
                           "-P", "threads", "--without-gossip", "--without-mingle",
                           "--without-heartbeat"], cwd, env)
    worker.wait_ready()
    from celeriac import chain, group

    client = _import("celeriac_app", env, monkeypatch)
    try:
        assert client.add.delay(2, 3).get(timeout=20) == 5
        with pytest.raises(KeyError):
            client.fail.delay("nope").get(timeout=20)
        assert group(client.add.s(i, i) for i in range(10))().get(timeout=20) == [
            i + i for i in range(10)]
        assert chain(client.add.s(2, 2), client.mul.s(10), client.add.s(1))().get(timeout=20) == 41
    finally:
        client.app.close()
