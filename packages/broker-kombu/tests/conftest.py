"""Fixtures: a kombu+filesystem:// URL in a temporary folder, and the live PostgreSQL for
kombu+sqla+postgresql:// (``CELERIAC_TEST_KOMBU_SQLA_URL``); the PostgreSQL tests skip when it is
down unless ``CELERIAC_REQUIRE_BROKERS=1``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from celeriac.testing.process import require_server

SQLA_URL = os.environ.get("CELERIAC_TEST_KOMBU_SQLA_URL",
                          "kombu+sqla+postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def filesystem_url(tmp_path: Path) -> str:
    """A kombu+filesystem:// URL whose folders live in this test's temporary directory."""
    return f"kombu+filesystem://{tmp_path / 'spool'}"


@pytest.fixture
def sqla_url() -> str:
    """The PostgreSQL URL (through kombu's SQLAlchemy transport); skips or fails when down."""
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")  # SQLAlchemy 2.1 drives postgresql:// with psycopg 3
    return require_server("PostgreSQL", SQLA_URL, 5432, "CELERIAC_TEST_KOMBU_SQLA_URL")

ZOOKEEPER_URL = os.environ.get("CELERIAC_TEST_KOMBU_ZOOKEEPER_URL", "")


@pytest.fixture
def zookeeper_url() -> str:
    """The Zookeeper URL from ``CELERIAC_TEST_KOMBU_ZOOKEEPER_URL`` (``.ci/run`` sets it once its
    Zookeeper answers); skips when unset, and when unreachable unless ``CELERIAC_REQUIRE_BROKERS=1``."""
    if not ZOOKEEPER_URL:
        pytest.skip("CELERIAC_TEST_KOMBU_ZOOKEEPER_URL is not set (e.g. kombu+zookeeper://127.0.0.1:2181/celeriac-test)")
    pytest.importorskip("kazoo")
    return require_server("Zookeeper", ZOOKEEPER_URL, 2181, "CELERIAC_TEST_KOMBU_ZOOKEEPER_URL")
