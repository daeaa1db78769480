"""Worker tests run on both built-in brokers: in-memory and the embedded SQLite one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac.app import Celeriac


@pytest.fixture(params=["memory", "sqlite"])
def celeriac_app(request: pytest.FixtureRequest, tmp_path: Any,
                 celeriac_config: dict[str, Any]) -> Iterator[Celeriac]:
    """An app on a fresh in-memory or SQLite broker + backend."""
    if request.param == "memory":
        unique = uuid.uuid4().hex[:8]
        broker, backend = f"memory://{unique}", f"memory://{unique}"
    else:
        broker, backend = f"sqlite:///{tmp_path}/broker.db", f"sqlite:///{tmp_path}/results.db"
    app = Celeriac("tests", broker_url=broker, result_backend=backend,
                   broker_transport_options={"visibility_timeout": 5}, **celeriac_config)
    yield app
    app.close()
