"""Mixed fleets on RabbitMQ (issue 10, item 13): a Celeriac client's delayed task runs on time on a
Celery worker.

A countdown/ETA message waits in RabbitMQ's delay levels (``celeriac_amqp.delay``) and reaches
its queue at its ETA, where a Celery worker takes it and runs it at once (its ``eta`` header is
due). A Celeriac worker never holds it in memory while it waits. Results travel through Redis
(Celery's Redis result backend on both sides).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celeriac.testing.process import require_server

from celeriac_amqp import AMQPBroker

VENV_BIN = Path(sys.executable).parent
REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS_URL", "redis://localhost:6379/9")

TASKS = '''
import time
from {kind} import {cls}

app = {cls}("mixed", broker={url!r}, backend={backend!r})
app.conf.update(
    result_backend_transport_options={{"global_keyprefix": {prefix!r}}},
    task_default_queue={queue!r},
)


@app.task(name="mixed.stamp")
def stamp(tag):
    return [tag, time.time()]
'''


@pytest.fixture
def modules(tmp_path: Path, amqp_url: str,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str, str]]:
    """A Celery and a Celeriac app module with the same task and a queue of this test's own."""
    backend = require_server("Redis", REDIS_URL, 6379, "CELERIAC_TEST_REDIS_URL")
    suffix = uuid.uuid4().hex[:8]
    queue = f"celeriac-test-mixed-{suffix}"
    names = (f"mixed_celery_{suffix}", f"mixed_celeriac_{suffix}")
    celery_url = amqp_url.replace("amqp://", "pyamqp://", 1)
    for name, kind, cls, url in zip(names, ("celery", "celeriac"), ("Celery", "Celeriac"),
                                    (celery_url, amqp_url), strict=True):
        (tmp_path / f"{name}.py").write_text(TASKS.format(
            kind=kind, cls=cls, url=url, backend=backend, prefix=f"ct{suffix}_", queue=queue))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, names[0], names[1]
    broker = AMQPBroker(amqp_url, {})
    try:
        broker.delete_queue(queue)
    finally:
        broker.close()


def test_our_countdown_runs_on_time_on_a_celery_worker(
        modules: tuple[Path, str, str], spawn_worker: Callable[..., Any]) -> None:
    root, celery_module, celeriac_module = modules
    worker = spawn_worker([str(VENV_BIN / "celery"), "-A", celery_module, "worker", "-l", "info",
                           "-P", "threads", "-c", "2", "-n", f"c{uuid.uuid4().hex[:6]}@%h",
                           "--without-gossip", "--without-mingle", "--without-heartbeat"], root)
    worker.wait_ready(60)
    ours = importlib.import_module(celeriac_module)
    try:
        sent = []
        for i, countdown in enumerate((2.0, 4.0)):
            before = time.time()  # the ETA is computed between these two instants
            result = ours.stamp.apply_async((i,), countdown=countdown)
            sent.append((result, before + countdown, time.time() + countdown))
        for result, earliest, latest in sent:
            tag, ran_at = result.get(timeout=30)
            assert earliest - 0.05 <= ran_at <= latest + 1.0, \
                f"task {tag} ran {ran_at - earliest:+.2f} s from its ETA"
    except BaseException:
        print(worker.log()[-3000:])
        raise
    finally:
        ours.app.close()
