"""pytest plugin: fixtures to test tasks against a real in-thread worker.

``celeriac_app`` is an app on the in-memory broker and backend (override the
``celeriac_config`` fixture to change settings); ``celeriac_worker`` runs a threads-pool worker
for it in a background thread and stops it after the test::

    def test_add(celeriac_app, celeriac_worker):
        @celeriac_app.task
        def add(x, y):
            return x + y
        assert add.delay(2, 2).get(timeout=5) == 4

Tasks may be defined after the worker started: the worker looks them up per message.
``--celeriac-broker URL`` / ``--celeriac-backend URL`` make the fixtures use real servers; each
test then works in its own queue (and, on Redis, its own key prefix) and cleans up after itself
(:func:`isolated_settings`, :func:`cleanup_app`).
``spawn_worker`` starts workers through the real command line (:mod:`celeriac.testing.process`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac.app import Celeriac
from celeriac.testing.process import spawn_worker
from celeriac.worker.worker import Worker

__all__ = [
    "celeriac_app", "celeriac_config", "celeriac_worker", "cleanup_app", "isolated_settings",
    "spawn_worker", "start_worker",
]


def _is_redis(url: str | None) -> bool:
    return bool(url) and str(url).split("://", 1)[0] in ("redis", "rediss")


def isolated_settings(broker: str, backend: str | None, unique: str) -> dict[str, Any]:
    """Settings that keep one test's messages and results apart on a shared server.

    Redis brokers and backends get their own ``global_keyprefix``; other shared brokers
    (RabbitMQ ...) their own default queue (``celeriac-test-<unique>``). In-memory and SQLite
    URLs are private already.
    """
    settings: dict[str, Any] = {"broker_url": broker, "result_backend": backend}
    scheme = broker.split("://", 1)[0]
    if scheme not in ("memory", "sqlite") and not _is_redis(broker):
        settings["task_default_queue"] = f"celeriac-test-{unique}"
    prefix = f"ct{unique}_"
    if _is_redis(broker):
        settings["broker_transport_options"] = {"global_keyprefix": prefix}
    if _is_redis(backend):
        settings["result_backend_transport_options"] = {"global_keyprefix": prefix}
    return settings


def cleanup_app(app: Celeriac) -> None:
    """Delete what a test left on a shared server (its queue, its Redis keys), then close the app.

    Only what :func:`isolated_settings` made private is deleted; errors are ignored."""
    queue = str(app.conf.get("task_default_queue") or "")
    prefixes = {str((app.conf.get(key) or {}).get("global_keyprefix") or "")
                for key in ("broker_transport_options", "result_backend_transport_options")}
    if queue.startswith("celeriac-test-"):
        with contextlib.suppress(Exception):
            broker = app.broker
            delete = getattr(broker, "delete_queue", None)
            if delete is not None:
                delete(queue)
            else:
                broker.purge(queue)
    for owner in (app._broker, app._backend):
        client = getattr(owner, "client", None)
        for prefix in prefixes:
            if prefix.startswith("ct") and client is not None and hasattr(client, "scan_iter"):
                with contextlib.suppress(Exception):
                    for key in client.scan_iter(match=prefix + "*", count=1000):
                        client.delete(key)
    app.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("celeriac")
    group.addoption("--celeriac-broker", default=None, help="Broker URL for celeriac fixtures.")
    group.addoption("--celeriac-backend", default=None, help="Result backend URL for celeriac fixtures.")


@pytest.fixture
def celeriac_config() -> dict[str, Any]:
    """Extra settings for ``celeriac_app``; override this fixture in your tests."""
    return {}


@pytest.fixture
def celeriac_app(request: pytest.FixtureRequest, celeriac_config: dict[str, Any]) -> Iterator[Celeriac]:
    """A fresh app on its own in-memory broker and backend (or the URLs given on the command line)."""
    unique = uuid.uuid4().hex[:8]
    broker = request.config.getoption("--celeriac-broker") or f"memory://{unique}"
    backend = request.config.getoption("--celeriac-backend") or f"memory://{unique}"
    settings = {**isolated_settings(broker, backend, unique), **celeriac_config}
    app = Celeriac("tests", **settings)
    yield app
    cleanup_app(app)


def start_worker(app: Celeriac, **options: Any) -> Worker:
    """Start a worker for ``app`` in a daemon thread; returns once it is ready."""
    options.setdefault("pool", "threads")
    options.setdefault("concurrency", 4)
    options.setdefault("fetch_timeout", 0.2)
    worker = Worker(app, **options)
    worker._thread = worker.start_in_thread()  # type: ignore[attr-defined]
    return worker


@pytest.fixture
def celeriac_worker(celeriac_app: Celeriac) -> Iterator[Worker]:
    """A threads-pool worker consuming ``celeriac_app``'s default queue, stopped after the test."""
    worker = start_worker(celeriac_app)
    yield worker
    worker.stop()
    worker._thread.join(10)  # type: ignore[attr-defined]
