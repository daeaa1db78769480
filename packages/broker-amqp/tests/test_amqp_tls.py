"""TLS to RabbitMQ: ``amqps://`` through stunnel in front of the live RabbitMQ, with certificates
made by the test.

stunnel (Debian's ``stunnel4``) listens on a private loopback port with a certificate for
``localhost`` signed by a CA the test creates and forwards to RabbitMQ's plain port. A real
``celeriac worker`` consumes over ``amqps://`` with results on ``rpc://`` (the same TLS
connection's reply queues). Verification is on by default: no CA, another CA or a host name the
certificate does not list is refused. The tests skip, saying why, when stunnel is not installed
(``.ci/run`` installs it when it can).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pytest
from celeriac import Celeriac
from celeriac.exceptions import ImproperlyConfigured
from celeriac.testing.tls import make_certificates

from celeriac_amqp import AMQPBroker
from celeriac_amqp.url import connection_parameters, parse_url, tls_failure

x509 = pytest.importorskip("cryptography.x509", reason="the TLS tests make certificates with cryptography")

CELERIAC = [sys.executable, "-m", "celeriac.cli.main"]



# -- stunnel in front of RabbitMQ --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1):
            return True
    except OSError:
        return False


class Stunnel:
    """stunnel terminating TLS on a private port and forwarding to RabbitMQ."""

    def __init__(self, root: Path, target: tuple[str, int]) -> None:
        binary = shutil.which("stunnel4") or shutil.which("stunnel")
        assert binary is not None
        self.certs = make_certificates(root)
        self.port = _free_port()
        conf = root / "stunnel.conf"
        conf.write_text(
            "foreground = yes\npid =\ndebug = 4\n[amqps]\n"
            f"accept = 127.0.0.1:{self.port}\nconnect = {target[0]}:{target[1]}\n"
            f"cert = {self.certs['server']}\nkey = {root / 'server.key'}\n")
        self.log = root / "stunnel.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([binary, str(conf)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not _port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stunnel did not start: {self.log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.05)

    def url(self, user: str = "guest", password: str = "guest", host: str = "localhost",
            query: str = "") -> str:
        return f"amqps://{user}:{password}@{host}:{self.port}//" + (f"?{query}" if query else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def stunnel(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stunnel]:
    if not (shutil.which("stunnel4") or shutil.which("stunnel")):
        pytest.skip("stunnel is not installed (apt-get install stunnel4): the amqps:// tests need it")
    parts = urlsplit(amqp_url.split(";", 1)[0])
    server = Stunnel(tmp_path_factory.mktemp("amqp-tls"), (parts.hostname or "127.0.0.1", parts.port or 5672))
    yield server
    server.stop()


# -- a worker process --------------------------------------------------------------------------

APP = '''
from celeriac import Celeriac

app = Celeriac("tls", broker={broker!r}, backend="rpc://")
app.conf.update(task_default_queue={queue!r}, broker_connection_max_retries=3, {settings})


@app.task(name="tls.add")
def add(x, y):
    return x + y
'''


class Worker:
    def __init__(self, root: Path, broker: str, **settings: Any) -> None:
        self.name = f"amqptls_{uuid.uuid4().hex[:8]}"
        self.queue = f"celeriac-tls-{uuid.uuid4().hex[:8]}"
        text = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        (root / f"{self.name}.py").write_text(APP.format(broker=broker, queue=self.queue, settings=text))
        self.log = root / f"{self.name}.log"
        env = {**os.environ, "PYTHONPATH": str(root)}
        env.pop("CELERIAC_BROKER_URL", None)
        env.pop("CELERIAC_RESULT_BACKEND", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*CELERIAC, "-A", self.name, "worker", "-l", "info", "-P", "threads", "-c", "2",
                 "-n", f"{self.name}@%h"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.text() and self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what!r} in the worker's log:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def workers(amqp_url: str) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()
    for worker in started:
        broker = AMQPBroker(amqp_url, {})
        try:
            broker.delete_queue(worker.queue)
        finally:
            broker.close()


def _connect(url: str, conf: dict[str, Any]) -> pika.BlockingConnection:
    (address,) = parse_url(url)
    return pika.BlockingConnection(connection_parameters(address, conf))


# -- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["broker_use_ssl", "url query"])
def test_amqps_end_to_end_through_a_worker(stunnel: Stunnel, tmp_path: Path, workers: list[Worker],
                                           how: str) -> None:
    if how == "broker_use_ssl":
        url, settings = stunnel.url(), {"broker_use_ssl": {"ca_certs": stunnel.certs["ca"],
                                                           "cert_reqs": "required"}}
    else:
        url, settings = stunnel.url(query=f"ssl_cert_reqs=required&ssl_ca_certs={stunnel.certs['ca']}"), {}
    worker = Worker(tmp_path, url, **settings)
    workers.append(worker)
    worker.wait_for(" ready.")
    assert worker.proc.poll() is None, worker.text()
    app = Celeriac("tls-client", broker=url, backend="rpc://", set_as_current=False,
                   task_default_queue=worker.queue, **settings)
    try:
        assert app.send_task("tls.add", (2, 2)).get(timeout=30) == 4
        results = [app.send_task("tls.add", (i, 1)) for i in range(20)]
        assert [r.get(timeout=30) for r in results] == [i + 1 for i in range(20)]
    finally:
        app.close()
    assert f"amqps://guest:**@localhost:{stunnel.port}//" in worker.text()


def test_broker_use_ssl_turns_tls_on_for_amqp_urls(stunnel: Stunnel) -> None:
    """As in Celery: ``amqp://`` plus ``broker_use_ssl`` is TLS (on 5671 unless a port is given)."""
    url = f"amqp://guest:guest@localhost:{stunnel.port}//"
    connection = _connect(url, {"broker_use_ssl": {"ca_certs": stunnel.certs["ca"]}})
    connection.close()
    (address,) = parse_url("amqp://guest@somewhere//")
    params = connection_parameters(address, {"broker_use_ssl": True})
    assert params.port == 5671 and params.ssl_options is not None


@pytest.mark.parametrize("case", ["no CA given", "another CA", "wrong host name"])
def test_an_unverifiable_certificate_is_refused(stunnel: Stunnel, case: str) -> None:
    url = stunnel.url(host="127.0.0.1" if case == "wrong host name" else "localhost")
    conf: dict[str, Any] = {
        "no CA given": {},
        "another CA": {"broker_use_ssl": {"ca_certs": stunnel.certs["other"]}},
        "wrong host name": {"broker_use_ssl": {"ca_certs": stunnel.certs["ca"]}},
    }[case]
    with pytest.raises(Exception) as info:
        _connect(url, conf).close()
    hint = tls_failure(info.value)
    assert hint is not None, repr(info.value)
    assert "TLS certificate was refused" in hint and "ca_certs" in hint
    if case == "wrong host name":
        assert "127.0.0.1" in hint


def test_cert_reqs_none_turns_verification_off(stunnel: Stunnel) -> None:
    _connect(stunnel.url(host="127.0.0.1"), {"broker_use_ssl": {"cert_reqs": ssl.CERT_NONE}}).close()
    _connect(stunnel.url(host="127.0.0.1", query="ssl_cert_reqs=none"), {}).close()


def test_bad_tls_options_are_a_clear_error(stunnel: Stunnel) -> None:
    (address,) = parse_url(stunnel.url())
    with pytest.raises(ImproperlyConfigured, match="Unknown TLS option 'ca_cert'"):
        connection_parameters(address, {"broker_use_ssl": {"ca_cert": "/x"}})
    with pytest.raises(ImproperlyConfigured, match="Cannot load the TLS files"):
        connection_parameters(address, {"broker_use_ssl": {"ca_certs": "/nonexistent/ca.pem"}})
    with pytest.raises(ImproperlyConfigured, match="cert_reqs must be required, optional or none"):
        connection_parameters(address, {"broker_use_ssl": {"cert_reqs": "sometimes"}})


def test_a_worker_refuses_a_certificate_from_another_ca_with_one_clear_line(
        stunnel: Stunnel, tmp_path: Path, workers: list[Worker]) -> None:
    password = "amqp-tls-s3cret"
    url = stunnel.url(user="guest", password=password)
    worker = Worker(tmp_path, url, broker_use_ssl={"ca_certs": stunnel.certs["other"]})
    workers.append(worker)
    worker.wait_for("TLS certificate was refused")
    assert worker.proc.wait(20) != 0  # retrying cannot fix a certificate: the worker stops
    text = worker.text()
    assert "Traceback" not in text, text
    assert password not in text
    refused = [line for line in text.splitlines() if "TLS certificate was refused" in line]
    assert len(refused) == 1, text
    assert f"amqps://guest:**@localhost:{stunnel.port}//" in refused[0]
    assert "ca_certs" in refused[0]  # says what to do
    assert " ready." not in text
