"""URL forms (redis+socket, sentinel, rediss parsing) and clear errors for bad connections.

The socket and Sentinel tests start their own throw-away ``redis-server`` processes in a temp
directory (never touching the shared server); they skip when ``redis-server`` is not installed.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_support import wait_for

from celeriac.exceptions import BrokerConnectionError
from celeriac.plugins import create_backend, create_broker
from celeriac.protocol import encode_task
from celeriac.routing import Queue
from celeriac_redis import RedisBackend, RedisBroker
from celeriac_redis.connection import make_client, parse_url

needs_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                  reason="redis-server is not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _round_trip(broker: RedisBroker) -> None:
    queue = Queue(f"q{uuid.uuid4().hex[:8]}")
    message = encode_task("proj.add", str(uuid.uuid4()), [1, 2], {})
    broker.publish(message, "", queue.name, queue=queue)
    consumer = broker.consumer([queue], prefetch=1)
    got = wait_for(lambda: consumer.fetch(1, 0.5), 10, "the message")
    assert got[0].message.headers["id"] == message.headers["id"]
    consumer.ack(got[0])
    consumer.close()


def test_url_forms() -> None:
    plain = parse_url("redis://u:p%40ss@h:6380/3")
    assert (plain.host, plain.port, plain.db, plain.username, plain.password) == \
        ("h", 6380, 3, "u", "p@ss")
    assert parse_url("redis://localhost").db == 0
    tls = parse_url("rediss://h/1?ssl_cert_reqs=none")
    assert tls.ssl and tls.query["ssl_cert_reqs"] == "none"
    client = make_client("rediss://h/1?ssl_cert_reqs=none")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_NONE and kwargs["host"] == "h"
    sock = parse_url("redis+socket:///run/redis.sock?virtual_host=4")
    assert (sock.socket_path, sock.db) == ("/run/redis.sock", 4)
    sentinel = parse_url("sentinel://:pw@s1:26379/2;sentinel://s2:26380")
    assert sentinel.sentinels == [("s1", 26379), ("s2", 26380)]
    assert (sentinel.db, sentinel.password) == (2, "pw")
    with pytest.raises(ValueError, match="master_name"):
        make_client("sentinel://s1:26379")
    with pytest.raises(ValueError, match="number"):
        parse_url("redis://h/notadb")


def test_plugin_registers_every_scheme() -> None:
    for scheme in ("redis", "rediss", "redis+socket", "sentinel"):
        conf = {"broker_transport_options": {"master_name": "m"}}
        url = f"{scheme}://localhost/0" if scheme != "redis+socket" else "redis+socket:///tmp/x.sock"
        assert isinstance(create_broker(url, conf), RedisBroker)
        assert isinstance(create_backend(url, conf), RedisBackend)


def test_connection_refused_is_one_clear_line() -> None:
    broker = RedisBroker(f"redis://:hunter2@127.0.0.1:{_free_port()}/0",
                         {"broker_transport_options": {"publish_retry_timeout": 0.3}})
    with pytest.raises(BrokerConnectionError) as info:
        broker.connect()
    text = str(info.value)
    assert "\n" not in text and "hunter2" not in text and ":**@" in text
    assert "refused" in text.lower()
    with pytest.raises(BrokerConnectionError):
        broker.publish(encode_task("t", "i", [], {}), "", "q")
    consumer = broker.consumer([], prefetch=1)
    assert consumer.fetch(1, 0.2) == []  # retried quietly inside fetch, no exception
    broker.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A throw-away redis-server with a password, on a TCP port and a unix socket."""
    port = _free_port()
    sock = tmp_path / "redis.sock"
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--unixsocket", str(sock), "--requirepass", "s3cret", "--save", "",
                    "--appendonly", "no", "--dir", str(tmp_path), "--daemonize", "yes",
                    "--logfile", str(tmp_path / "redis.log")], check=True, capture_output=True)
    client = redis.Redis(port=port, password="s3cret", retry=Retry(NoBackoff(), 0))
    wait_for(lambda: _ping(client), 10, "the private redis-server")
    yield {"port": port, "sock": sock, "client": client}
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@needs_server
def test_wrong_password_is_one_clear_line(private_redis: dict[str, object]) -> None:
    broker = RedisBroker(f"redis://:wrong@127.0.0.1:{private_redis['port']}/0", {})
    with pytest.raises(BrokerConnectionError) as info:
        broker.connect()
    text = str(info.value)
    assert "\n" not in text and "wrong" not in text.replace("wrong port", "")
    assert "authentication" in text.lower() or "password" in text.lower()
    missing = RedisBroker(f"redis://127.0.0.1:{private_redis['port']}/0", {})
    with pytest.raises(BrokerConnectionError, match="(?i)password|auth"):
        missing.connect()


@needs_server
def test_unix_socket_url(private_redis: dict[str, object]) -> None:
    url = f"redis+socket://:s3cret@{private_redis['sock']}?virtual_host=2"
    broker = RedisBroker(url, {})
    broker.connect()
    _round_trip(broker)
    broker.close()
    backend = RedisBackend(url, {})
    backend.store("x", {"status": "SUCCESS", "result": 1, "task_id": "x"})
    assert backend.get("x")["result"] == 1
    backend.close()


@needs_server
def test_sentinel_url(tmp_path: Path) -> None:
    master_port, sentinel_port = _free_port(), _free_port()
    subprocess.run(["redis-server", "--port", str(master_port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--daemonize",
                    "yes", "--logfile", str(tmp_path / "master.log")], check=True)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndaemonize yes\n"
                    f"logfile {tmp_path / 'sentinel.log'}\ndir {tmp_path}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n")
    subprocess.run(["redis-server", str(conf), "--sentinel"], check=True)
    master = redis.Redis(port=master_port, retry=Retry(NoBackoff(), 0))
    sentinel = redis.Redis(port=sentinel_port, retry=Retry(NoBackoff(), 0))
    try:
        wait_for(lambda: _ping(master) and _ping(sentinel), 10, "master and sentinel")
        url = f"sentinel://127.0.0.1:{sentinel_port}/0"
        broker = RedisBroker(url, {"broker_transport_options": {"master_name": "mymaster"}})
        deadline = time.monotonic() + 10
        while True:
            try:
                broker.connect()
                break
            except BrokerConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        _round_trip(broker)
        broker.close()
    finally:
        for client in (sentinel, master):
            try:
                client.shutdown(nosave=True)
            except redis.RedisError:
                pass
