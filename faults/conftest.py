"""Fixtures of the fault suite: the brokers under test (a private RabbitMQ node and private
redis-servers, so the suite neither disturbs nor is disturbed by the shared servers other tests
restart; embedded SQLite), the fault proxy."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib: make the helper modules importable by the tests.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from faultkit import PrivateRabbit, PrivateRedis, Target, target_conf, unique
from faultproxy import FaultProxy


@pytest.fixture(scope="session")
def rabbit() -> Iterator[PrivateRabbit]:
    """A private RabbitMQ node (AMQP 0-9-1 and 1.0 on one port), started once per session."""
    node = PrivateRabbit()
    node.start()
    yield node
    node.stop()


def make_target(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Target:
    tag = unique()
    conf = target_conf(name, tag)
    if name == "sqlite":
        return Target("sqlite", f"sqlite:///{tmp_path}/broker.db", None, conf)
    if name == "redis":
        server: PrivateRedis = request.getfixturevalue("session_redis")
        return Target("redis", server.url, server.port, conf)
    node: PrivateRabbit = request.getfixturevalue("rabbit")
    scheme = "amqp" if name == "amqp" else "qpid"
    return Target(name, f"{scheme}://guest:guest@127.0.0.1:{node.port}//", node.port, conf)


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """The broker named by the test's ``broker`` parameter."""
    return make_target(request.param, tmp_path, request)


@pytest.fixture
def proxy(target: Target) -> Iterator[FaultProxy]:
    """A fault proxy in front of ``target``'s server."""
    assert target.port is not None
    p = FaultProxy(target.port)
    yield p
    p.close()


@pytest.fixture(scope="session")
def session_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """A redis-server of our own for the session: other suites restart the shared one (6379)
    and flush it; the fault suite must not lose tasks to them, nor disturb them."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of our own on a free port, stopped after the test."""
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()
