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
``--celeriac-broker URL`` / ``--celeriac-backend URL`` make the fixtures use real servers.
``spawn_worker`` starts workers through the real command line (:mod:`celeriac.testing.process`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac.app import Celeriac
from celeriac.testing.process import spawn_worker
from celeriac.worker.worker import Worker

__all__ = ["celeriac_app", "celeriac_config", "celeriac_worker", "spawn_worker", "start_worker"]


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
    settings = {"broker_url": broker, "result_backend": backend, **celeriac_config}
    app = Celeriac("tests", **settings)
    yield app
    app.close()


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
