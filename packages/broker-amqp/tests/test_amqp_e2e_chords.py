"""Chord interop over RabbitMQ, both directions, with a result backend both sides share.

Celery's rpc:// refuses chords, so chords between Celery and Celeriac need a shared store: the
Redis result backend (``celeriac-redis``, Celery's key layout). Skipped when that plugin or the
Redis server is missing.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celeriac.plugins import create_broker

CELERIAC = [sys.executable, "-m", "celeriac.cli.main"]
REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS_URL", "redis://localhost:6379/0")

TASKS = '''
import os
{header}
app.conf.task_default_queue = os.environ["E2E_QUEUE"]


@app.task(name="e2e.add")
def add(x, y):
    return x + y


@app.task(name="e2e.xsum")
def xsum(numbers):
    return sum(numbers)
'''

CELERIAC_HEADER = '''from celeriac import Celeriac
app = Celeriac("e2e", broker=os.environ["E2E_BROKER"], backend=os.environ["E2E_BACKEND"])'''
CELERY_HEADER = '''from celery import Celery
app = Celery("e2e", broker=os.environ["E2E_BROKER"].replace("amqp://", "pyamqp://", 1),
             backend=os.environ["E2E_BACKEND"])'''


def _redis_ready() -> bool:
    try:
        import celeriac_redis  # noqa: F401
    except ImportError:
        return False
    try:
        with socket.create_connection(("localhost", 6379), 2):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _redis_ready(),
                                reason="celeriac-redis or the Redis server is not available")


@pytest.fixture
def project(tmp_path: Path, amqp_url: str) -> Iterator[tuple[Path, dict[str, str]]]:
    (tmp_path / "celeriac_chords.py").write_text(TASKS.format(header=CELERIAC_HEADER))
    (tmp_path / "celery_chords.py").write_text(TASKS.format(header=CELERY_HEADER))
    queue = f"celeriac-e2e-chord-{uuid.uuid4().hex[:10]}"
    env = {"E2E_BROKER": amqp_url, "E2E_QUEUE": queue, "E2E_BACKEND": REDIS_URL}
    sys.path.insert(0, str(tmp_path))
    yield tmp_path, env
    sys.path.remove(str(tmp_path))
    for name in ("celeriac_chords", "celery_chords"):
        sys.modules.pop(name, None)
    broker = create_broker(amqp_url, {})
    broker.delete_queue(queue)
    broker.close()


def _import(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    __import__(name)
    return sys.modules[name]


def test_celery_client_chord_on_celeriac_worker(project: tuple[Path, dict[str, str]],
                                                spawn_worker: Callable[..., Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, env = project
    worker = spawn_worker([*CELERIAC, "-A", "celeriac_chords", "worker", "-l", "info", "-c",
                           "4", "-P", "threads"], cwd, env)
    worker.wait_ready()
    from celery import chord

    client = _import("celery_chords", env, monkeypatch)
    try:
        result = chord(client.add.s(i, i) for i in range(20))(client.xsum.s())
        assert result.get(timeout=30) == sum(i + i for i in range(20))
    finally:
        client.app.close()


def test_celeriac_client_chord_on_celery_worker(project: tuple[Path, dict[str, str]],
                                                spawn_worker: Callable[..., Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, env = project
    worker = spawn_worker([sys.executable, "-m", "celery", "-A", "celery_chords", "worker", "-l",
                           "info", "-c", "4", "-P", "threads", "--without-gossip",
                           "--without-mingle", "--without-heartbeat"], cwd, env)
    worker.wait_ready()
    from celeriac import chord

    client = _import("celeriac_chords", env, monkeypatch)
    try:
        result = chord(client.add.s(i, i) for i in range(20))(client.xsum.s())
        assert result.get(timeout=30) == sum(i + i for i in range(20))
    finally:
        client.app.close()
