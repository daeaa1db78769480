"""Helpers of this package's tests: URLs, queue names, queue removal, RabbitMQ restarts.

AMQP 1.0 cannot delete a queue, so tests delete theirs afterwards over AMQP 0-9-1 with pika
(a test-only dependency) when it is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from celeriac.testing.process import server_reachable

#: The seed's tutorial project, copied by the end-to-end tests.
SEED = Path(__file__).resolve().parents[3] / "examples" / "proj"
#: The real ``celeriac`` command line.
CELERIAC = [sys.executable, "-m", "celeriac"]
QPID_URL = os.environ.get("CELERIAC_TEST_QPID_URL", "qpid://guest:guest@localhost:5672//")
#: The same server over AMQP 0-9-1, for deleting test queues (and the bench's comparison).
AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672//")
PREFIX = "celeriac-qpidtest-"


def unique(kind: str) -> str:
    """A queue name of this package's tests."""
    return f"{PREFIX}{kind}-{uuid.uuid4().hex[:10]}"


def delete_queues(names: Iterable[str]) -> None:
    """Delete ``names`` over AMQP 0-9-1 (best effort; nothing happens without pika)."""
    names = list(names)
    if not names:
        return
    try:
        import pika
    except ImportError:
        return
    parts = urlsplit(AMQP_URL)
    vhost = unquote(parts.path[1:]) if parts.path not in ("", "/", "//") else "/"
    params = pika.ConnectionParameters(parts.hostname or "localhost", parts.port or 5672, vhost,
                                       pika.PlainCredentials(parts.username or "guest", parts.password or "guest"))
    with contextlib.suppress(Exception):
        connection = pika.BlockingConnection(params)
        try:
            for name in names:
                channel = connection.channel()
                with contextlib.suppress(Exception):
                    channel.queue_delete(name)
                with contextlib.suppress(Exception):
                    channel.close()
        finally:
            connection.close()


@contextlib.contextmanager
def connected_broker(url: str, conf: Mapping[str, Any]) -> Iterator[Any]:
    """A connected ``QpidBroker(url, conf)``; closed on exit, and the queues it declared deleted."""
    from celeriac_qpid import QpidBroker

    broker = QpidBroker(url, dict(conf))
    broker.connect()
    try:
        yield broker
    finally:
        declared = list(broker._declared)
        broker.close()
        delete_queues(declared)


def _pika_params() -> object:
    import pika

    parts = urlsplit(AMQP_URL)
    vhost = unquote(parts.path[1:]) if parts.path not in ("", "/", "//") else "/"
    return pika.ConnectionParameters(parts.hostname or "localhost", parts.port or 5672, vhost,
                                     pika.PlainCredentials(parts.username or "guest", parts.password or "guest"))


def declare_priority_queue(name: str, max_priority: int) -> None:
    """Create ``name`` with ``x-max-priority`` over AMQP 0-9-1, as a user has to (AMQP 1.0
    cannot). Skips the test without pika."""
    import pytest

    pika = pytest.importorskip("pika")
    connection = pika.BlockingConnection(_pika_params())
    try:
        connection.channel().queue_declare(name, durable=True, arguments={"x-max-priority": max_priority})
    finally:
        connection.close()


def ready_count(name: str) -> int | None:
    """Messages ready (not delivered to a consumer) in queue ``name``, asked over AMQP 0-9-1;
    None when it cannot be asked (no pika, server down)."""
    try:
        import pika
    except ImportError:
        return None
    parts = urlsplit(AMQP_URL)
    vhost = unquote(parts.path[1:]) if parts.path not in ("", "/", "//") else "/"
    params = pika.ConnectionParameters(parts.hostname or "localhost", parts.port or 5672, vhost,
                                       pika.PlainCredentials(parts.username or "guest", parts.password or "guest"))
    try:
        connection = pika.BlockingConnection(params)
    except Exception:  # noqa: BLE001 - best effort, like delete_queues
        return None
    try:
        return int(connection.channel().queue_declare(name, passive=True).method.message_count)
    except Exception:  # noqa: BLE001
        return None
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def rabbitmq_running() -> bool:
    """True when RabbitMQ accepts connections on 5672."""
    return server_reachable(QPID_URL, 5672)


def ensure_rabbitmq_running(timeout: float = 60.0) -> None:
    """Start the RabbitMQ application if a test stopped it, and wait until it accepts clients."""
    deadline = time.monotonic() + timeout
    subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, timeout=timeout, check=False)
    while time.monotonic() < deadline:
        if rabbitmq_running():
            return
        time.sleep(0.2)
    raise RuntimeError("RabbitMQ did not come back")


#: Routing keys on amq.topic of the subscriptions this package's tests make (AMQP 1.0 dialect).
SUBSCRIPTION_KEYS = ("celeriac-kit-bx-", "celery_pidbox", "celeryev.", "reply_celery_pidbox.", PREFIX)


def delete_leaked_subscriptions() -> None:
    """Delete the queues RabbitMQ 3.x keeps after an AMQP 1.0 ``/topic/`` subscription ended
    (bound to amq.topic with one of :data:`SUBSCRIPTION_KEYS`, no consumer). Best effort,
    needs ``rabbitmqctl``."""
    def run(*args: str) -> list[list[str]]:
        try:
            out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60,
                                 check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [line.split("\t") for line in out.splitlines() if "\t" in line]

    bound = {row[1] for row in run("list_bindings", "source_name", "destination_name", "routing_key")
             if len(row) == 3 and row[0] == "amq.topic" and row[1].startswith("amq.gen-")
             and row[2].startswith(SUBSCRIPTION_KEYS)}
    idle = {row[0] for row in run("list_queues", "name", "consumers") if len(row) == 2 and row[1] == "0"}
    delete_queues(sorted(bound & idle))


def copy_seed(where: Path, *conf_lines: str) -> Path:
    """Copy the seed's project to ``where/proj`` with ``conf_lines`` appended to its
    ``celery.py``; return the project's directory."""
    project = where / "proj"
    shutil.copytree(SEED, project, ignore=shutil.ignore_patterns("__pycache__"))
    with open(project / "celery.py", "a") as handle:
        handle.write("\n" + "".join(f"{line}\n" for line in conf_lines))
    return project


def run_client(code: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> Any:
    """Run ``code`` in a client process; return the JSON it printed last."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"client failed:\n{out.stdout}\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def celeriac(cwd: Path, env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """Run one ``celeriac`` command line; return its stdout (fails with its output on error)."""
    out = subprocess.run([*CELERIAC, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, f"$ celeriac {' '.join(args)}\n{out.stdout}\n{out.stderr[-3000:]}"
    return out.stdout
