"""Worker tests run on both built-in brokers (in-memory, embedded SQLite) and, for the worker
suites, on Redis and RabbitMQ too.

``celeriac_app`` is parametrised per test module:

- every module: ``memory`` and ``sqlite``;
- the worker suites (:data:`REAL_BROKER_MODULES`, or a module that sets ``REAL_BROKERS = True``):
  also ``redis`` (``CELERIAC_TEST_REDIS_URL``, default ``redis://localhost:6379/9``, Redis
  results) and ``amqp`` (``CELERIAC_TEST_AMQP_URL``, Redis results when Redis is up, else
  ``rpc://``). They skip with the reason when the server is down, or fail with
  ``CELERIAC_REQUIRE_BROKERS=1`` (as CI runs);
- ``pytest --celeriac-broker URL [--celeriac-backend URL]``: that broker only, for every module.

On a real server each test has its own queue and Redis key prefix, deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac.app import Celeriac
from celeriac.testing.plugin import cleanup_app, isolated_settings
from celeriac.testing.process import require_server, server_reachable

REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS_URL", "redis://localhost:6379/9")
AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672//")
#: Test modules whose ``celeriac_app`` tests also run on Redis and RabbitMQ.
REAL_BROKER_MODULES = frozenset({"test_worker", "test_retry_time_app"})


#: (test name, broker kind) pairs that test a behaviour one broker does not have, with why.
BROKER_SPECIFIC = {
    ("test_expired_task_is_revoked_not_run", "amqp"):
        "RabbitMQ drops a message at its expiration (Celery sets it too), so no worker ever "
        "sees it to store REVOKED",
    ("test_hostile_flood_leaves_the_worker_consuming", "amqp"):
        "it floods the literal queue 'celery', which other users of the RabbitMQ server share",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("celeriac_app") if callspec is not None else None
        reason = BROKER_SPECIFIC.get((getattr(item, "originalname", item.name), kind))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "celeriac_app" not in metafunc.fixturenames:
        return
    if metafunc.config.getoption("--celeriac-broker"):
        params = ["cli"]
    else:
        params = ["memory", "sqlite"]
        module = metafunc.module
        name = module.__name__.rpartition(".")[2]
        if name in REAL_BROKER_MODULES or getattr(module, "REAL_BROKERS", False):
            params += ["redis", "amqp"]
    metafunc.parametrize("celeriac_app", params, indirect=True)


def _urls(request: pytest.FixtureRequest, kind: str, tmp_path: Any, unique: str) -> tuple[str, str]:
    if kind == "cli":
        broker = str(request.config.getoption("--celeriac-broker"))
        backend = request.config.getoption("--celeriac-backend") or f"memory://{unique}"
        return broker, str(backend)
    if kind == "memory":
        return f"memory://{unique}", f"memory://{unique}"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/broker.db", f"sqlite:///{tmp_path}/results.db"
    if kind == "redis":
        url = require_server("Redis", REDIS_URL, 6379, "CELERIAC_TEST_REDIS_URL")
        return url, url
    url = require_server("RabbitMQ", AMQP_URL, 5672, "CELERIAC_TEST_AMQP_URL")
    return url, REDIS_URL if server_reachable(REDIS_URL, 6379) else "rpc://"


@pytest.fixture
def celeriac_app(request: pytest.FixtureRequest, tmp_path: Any,
                 celeriac_config: dict[str, Any]) -> Iterator[Celeriac]:
    """An app on a fresh broker + backend of the kind given by the parameter."""
    unique = uuid.uuid4().hex[:10]
    broker, backend = _urls(request, getattr(request, "param", "memory"), tmp_path, unique)
    settings = isolated_settings(broker, backend, unique)
    options = dict(settings.get("broker_transport_options") or {})
    options["visibility_timeout"] = 5
    settings["broker_transport_options"] = options
    app = Celeriac("tests", **{**settings, **celeriac_config})
    yield app
    cleanup_app(app)
