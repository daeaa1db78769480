"""TLS to Redis against a private ``redis-server --tls-port`` with certificates made by the test.

The server listens on TLS only (``--port 0``), with a certificate for ``localhost`` signed by a CA
the test creates. Workers are real ``celeriac worker`` processes; the broker and the result
backend both go over TLS, with the CA given the ways Celery accepts it (URL query or the
``broker_use_ssl`` / ``redis_backend_use_ssl`` settings). Verification is on by default: a CA the
client was not given, another CA and a host name the certificate does not list are refused with
one line naming the URL (password masked) and saying what to do.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_support import wait_for

from celeriac import Celeriac
from celeriac.exceptions import BrokerConnectionError
from celeriac.testing.tls import issue, make_certificates, new_key, save
from celeriac_redis.backend import RedisBackend
from celeriac_redis.connection import describe_error, is_fatal, make_client

x509 = pytest.importorskip("cryptography.x509", reason="the TLS tests make certificates with cryptography")

VENV_BIN = Path(sys.executable).parent
PASSWORD = "tls-s3cret-pw"



# -- the private TLS server --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TLSRedis:
    """A private redis-server serving TLS only, on its own port."""

    def __init__(self, root: Path, password: str = "") -> None:
        self.root = root
        self.password = password
        self.certs = make_certificates(root)
        self.port = _free_port()
        self.log = root / "redis-tls.log"
        argv = ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "-::1",
                "--tls-cert-file", self.certs["server"], "--tls-key-file", str(root / "server.key"),
                "--tls-ca-cert-file", self.certs["ca"], "--tls-auth-clients", "no",
                "--save", "", "--appendonly", "no", "--dir", str(root), "--logfile", str(self.log)]
        if password:
            argv += ["--requirepass", password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = self.url(password=password)
        try:
            wait_for(lambda: self._ping(url) or self.proc.poll() is not None, 15, "the TLS Redis")
        except AssertionError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"redis-server --tls-port did not start: {log[-1500:]}")

    def url(self, host: str = "localhost", password: str = "", query: str | None = None, db: int = 0) -> str:
        auth = f":{password}@" if password else ""
        q = f"ssl_cert_reqs=required&ssl_ca_certs={self.certs['ca']}" if query is None else query
        return f"rediss://{auth}{host}:{self.port}/{db}" + (f"?{q}" if q else "")

    @staticmethod
    def _ping(url: str) -> bool:
        try:
            return bool(make_client(url, {"socket_connect_timeout": 1}).ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _redis_has_tls() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    if "build=" not in out:
        return "cannot tell the redis-server version"
    return None


def _start(root: Path, password: str = "") -> TLSRedis:
    reason = _redis_has_tls()
    if reason is None:
        try:
            return TLSRedis(root, password)
        except RuntimeError as exc:  # a build without TLS says so in its log
            reason = f"this redis-server cannot serve TLS: {exc}"
    if os.environ.get("CELERIAC_REQUIRE_BROKERS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRedis]:
    server = _start(tmp_path_factory.mktemp("redis-tls"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_redis_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRedis]:
    """Another private TLS server, this one with ``--requirepass``."""
    server = _start(tmp_path_factory.mktemp("redis-tls-pw"), PASSWORD)
    yield server
    server.stop()


# -- worker processes --------------------------------------------------------------------------

APP = '''
from celeriac import Celeriac

app = Celeriac("tls", broker={broker!r}, backend={backend!r})
app.conf.update(task_default_queue={queue!r}, {settings})
{extra}


@app.task(name="tls.add")
def add(x, y):
    return x + y
'''


class Worker:
    """A ``celeriac worker`` process on a generated app module."""

    def __init__(self, root: Path, broker: str, backend: str, *, extra: str = "", args: tuple[str, ...] = (),
                 template: str = APP, command: str = "celeriac", queue: str | None = None,
                 **settings: Any) -> None:
        self.root = root
        self.name = f"tlsapp_{uuid.uuid4().hex[:8]}"
        self.queue = queue or f"tls{uuid.uuid4().hex[:8]}"
        text = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        (root / f"{self.name}.py").write_text(template.format(broker=broker, backend=backend, queue=self.queue,
                                                              settings=text, extra=extra))
        self.log = root / f"{self.name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        env.pop("CELERIAC_BROKER_URL", None)
        env.pop("CELERIAC_RESULT_BACKEND", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / command), "-A", self.name, "worker", "-l", "info", "-P", "threads",
                 "-c", "2", "-n", f"{self.name}@%h", *args], cwd=root, env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.env = env

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        wait_for(lambda: " ready." in self.text() or self.proc.poll() is not None, 30, "the worker")
        assert self.proc.poll() is None, self.text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def _client(broker: str, backend: str, queue: str, **settings: Any) -> Celeriac:
    app = Celeriac("tls-client", broker=broker, backend=backend, set_as_current=False,
                   task_default_queue=queue, **settings)
    return app


# -- tests -------------------------------------------------------------------------------------

def test_the_server_speaks_tls_only(tls_redis: TLSRedis) -> None:
    """No plain port is open, and TLS with the right CA gets an answer."""
    assert make_client(tls_redis.url()).ping()
    plain = f"redis://localhost:{tls_redis.port}/0"
    with pytest.raises((redis.ConnectionError, OSError)):
        make_client(plain, {"socket_connect_timeout": 2, "socket_timeout": 2}).ping()


def test_rediss_broker_and_backend_with_the_ca_in_the_url(tls_redis: TLSRedis, tmp_path: Path,
                                                          workers: list[Worker]) -> None:
    url = tls_redis.url()
    worker = Worker(tmp_path, url, url)
    workers.append(worker)
    worker.wait_ready()
    app = _client(url, url, worker.queue)
    try:
        assert app.send_task("tls.add", (2, 2)).get(timeout=20) == 4
        results = [app.send_task("tls.add", (i, i)) for i in range(20)]
        assert [r.get(timeout=20) for r in results] == [2 * i for i in range(20)]
    finally:
        app.close()
    assert "rediss://localhost" in worker.text()  # the banner names the TLS URL


def test_rediss_with_celerys_settings_broker_use_ssl_and_redis_backend_use_ssl(
        tls_redis: TLSRedis, tmp_path: Path, workers: list[Worker]) -> None:
    url = tls_redis.url(query="")
    options = {"ssl_cert_reqs": "required", "ssl_ca_certs": tls_redis.certs["ca"]}
    worker = Worker(tmp_path, url, url, broker_use_ssl=options, redis_backend_use_ssl=options)
    workers.append(worker)
    worker.wait_ready()
    app = _client(url, url, worker.queue, broker_use_ssl=options, redis_backend_use_ssl=options)
    try:
        assert app.send_task("tls.add", (20, 22)).get(timeout=20) == 42
    finally:
        app.close()


def test_a_celery_client_sends_over_tls_to_a_celeriac_worker(tls_redis: TLSRedis, tmp_path: Path,
                                                             workers: list[Worker]) -> None:
    """The same URL and settings work in Celery (its result backend insists on ssl_cert_reqs)."""
    celery = pytest.importorskip("celery")
    url = tls_redis.url()
    worker = Worker(tmp_path, url, url)
    workers.append(worker)
    worker.wait_ready()
    options = {"ssl_cert_reqs": "required", "ssl_ca_certs": tls_redis.certs["ca"]}
    app = celery.Celery("tls-celery", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_default_queue=worker.queue, broker_use_ssl=options, redis_backend_use_ssl=options)
    try:
        result = app.send_task("tls.add", (3, 4))
        assert result.get(timeout=20) == 7
        del result
        gc.collect()  # Celery's AsyncResult talks to the backend when collected: do it while it is up
    finally:
        app.close()


@pytest.mark.parametrize("case", ["no CA given", "another CA", "wrong host name"])
def test_an_unverifiable_certificate_is_refused_by_the_client(tls_redis: TLSRedis, case: str) -> None:
    url = {
        "no CA given": tls_redis.url(password=PASSWORD, query=""),
        "another CA": tls_redis.url(password=PASSWORD, query=f"ssl_ca_certs={tls_redis.certs['other']}"),
        "wrong host name": tls_redis.url(host="127.0.0.1", password=PASSWORD),
    }[case]
    client = make_client(url, {"socket_connect_timeout": 3})
    with pytest.raises(redis.ConnectionError) as info:
        client.ping()
    assert is_fatal(info.value)
    line = describe_error(info.value, url)
    assert line.startswith(f"Cannot use Redis at rediss://:**@{url.split('@', 1)[1].split('/', 1)[0]}/0")
    assert "TLS certificate was refused" in line and "ssl_ca_certs" in line
    if case == "wrong host name":
        assert "127.0.0.1" in line
    assert PASSWORD not in line and "\n" not in line


def test_ssl_cert_reqs_none_turns_verification_off(tls_redis: TLSRedis) -> None:
    assert make_client(tls_redis.url(host="127.0.0.1", query="ssl_cert_reqs=none")).ping()
    assert make_client(tls_redis.url(query=""), ssl_options={"ssl_cert_reqs": "none"}).ping()


def test_bad_tls_options_are_a_clear_error(tls_redis: TLSRedis) -> None:
    with pytest.raises(ValueError, match="ssl_cert_reqs must be required, optional or none"):
        make_client(tls_redis.url(query="ssl_cert_reqs=maybe"))
    with pytest.raises(ValueError, match="unknown TLS option 'ssl_ca_cert'"):
        make_client(tls_redis.url(query=""), ssl_options={"ssl_ca_cert": "/x"})


def test_a_worker_refuses_a_certificate_from_another_ca_with_one_clear_line(
        tls_redis: TLSRedis, tmp_path: Path, workers: list[Worker]) -> None:
    url = tls_redis.url(password=PASSWORD, query=f"ssl_cert_reqs=required&ssl_ca_certs={tls_redis.certs['other']}")
    worker = Worker(tmp_path, url, url)
    workers.append(worker)
    assert worker.proc.wait(30) != 0  # retrying cannot fix a certificate: the worker stops
    text = worker.text()
    assert "Traceback" not in text, text
    assert PASSWORD not in text
    refused = [line for line in text.splitlines() if "TLS certificate was refused" in line]
    assert len(refused) == 1, text
    assert f"rediss://:**@localhost:{tls_redis.port}/0" in refused[0]
    assert "ssl_ca_certs" in refused[0]  # says what to do
    assert " ready." not in text


def test_the_backend_fails_at_once_on_a_refused_certificate(tls_redis: TLSRedis) -> None:
    """A refused certificate is not retried for retry_timeout: the error says why, once."""
    url = tls_redis.url(password=PASSWORD, query="")
    backend = RedisBackend(url, {"redis_backend_use_ssl": {"ssl_ca_certs": tls_redis.certs["other"]}})
    started = time.monotonic()
    try:
        with pytest.raises(BrokerConnectionError, match="TLS certificate was refused") as info:
            backend.get("some-task-id")
    finally:
        backend.close()
    assert time.monotonic() - started < 5
    assert info.value.transient is False
    assert PASSWORD not in str(info.value)
    good = RedisBackend(tls_redis.url(query=""), {"redis_backend_use_ssl": {"ssl_ca_certs": tls_redis.certs["ca"]}})
    try:
        assert good.get("some-task-id") is None
    finally:
        good.close()


# -- passwords masked everywhere ---------------------------------------------------------------

MASKING_EXTRA = '''

@app.task(name="tls.boom")
def boom():
    raise ValueError("boom")
'''


def _cli(worker: Worker, *args: str, broker: str | None = None, timeout: float = 60) -> str:
    argv = [str(VENV_BIN / "celeriac")] + (["-b", broker] if broker else []) + ["-A", worker.name, *args]
    done = subprocess.run(argv, cwd=worker.root, env=worker.env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return f"$ {' '.join(args)} (exit {done.returncode})\n{done.stdout}\n{done.stderr}"


def test_passwords_appear_nowhere(tls_redis_password: TLSRedis, tmp_path: Path, workers: list[Worker]) -> None:
    """A worker with the password in its broker and backend URLs: the banner, its debug log,
    ``inspect conf``, ``inspect stats``, ``events --dump`` and the errors of a wrong password
    never show it (nor the wrong one)."""
    server = tls_redis_password
    broker, backend = server.url(password=PASSWORD), server.url(password=PASSWORD, db=1)
    worker = Worker(tmp_path, broker, backend, extra=MASKING_EXTRA, args=("-E", "-l", "debug"),
                    broker_transport_options={"visibility_timeout": 3600, "publish_retry_timeout": 2},
                    redis_backend_use_ssl={"ssl_ca_certs": server.certs["ca"]})
    workers.append(worker)
    worker.wait_ready()
    outputs: dict[str, str] = {}
    dump_log = tmp_path / "events-dump.log"
    with open(dump_log, "wb") as out:
        dump = subprocess.Popen([str(VENV_BIN / "celeriac"), "-A", worker.name, "events", "--dump", "--timeout",
                                 "10"], cwd=worker.root, env=worker.env, stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: "Ready to capture" in dump_log.read_text(errors="replace") or dump.poll() is not None,
             30, "events --dump to subscribe")
    app = _client(broker, backend, worker.queue, redis_backend_use_ssl={"ssl_ca_certs": server.certs["ca"]})
    try:
        assert app.send_task("tls.add", (1, 2)).get(timeout=20) == 3
        failed = app.send_task("tls.boom")
        with pytest.raises(Exception, match="boom"):
            failed.get(timeout=20)
    finally:
        app.close()
    dump.wait(30)
    outputs["events --dump"] = dump_log.read_text(errors="replace")
    outputs["inspect conf"] = _cli(worker, "inspect", "conf", "-j", "-t", "3")
    outputs["inspect stats"] = _cli(worker, "inspect", "stats", "-j", "-t", "3")
    wrong = "Wr0ng-pa55word"
    wrong_url = server.url(password=wrong)
    outputs["inspect with a wrong password"] = _cli(worker, "inspect", "ping", "-t", "2", broker=wrong_url)
    bad = Worker(tmp_path, wrong_url, server.url(password=wrong, db=1))
    workers.append(bad)
    wait_for(lambda: "authentication failed" in bad.text() or bad.proc.poll() is not None, 30,
             "the wrong password to be reported")
    bad.stop()
    worker.stop()
    outputs["worker banner and log"] = worker.text()
    outputs["worker with a wrong password"] = bad.text()
    everything = "\n".join(f"===== {k}\n{v}" for k, v in outputs.items())
    # the checks mean something: each output has what it should
    assert "task succeeded" in outputs["events --dump"] and "task failed" in outputs["events --dump"], everything
    assert f"rediss://:**@localhost:{server.port}/0" in outputs["inspect conf"], everything
    assert f"rediss://:**@localhost:{server.port}/1" in outputs["inspect conf"], everything
    assert f"rediss://:**@localhost:{server.port}/0" in outputs["inspect stats"], everything
    assert f". broker:      rediss://:**@localhost:{server.port}/0" in outputs["worker banner and log"], everything
    assert "authentication failed" in outputs["worker with a wrong password"], everything
    assert "authentication failed" in outputs["inspect with a wrong password"], everything
    assert PASSWORD not in everything, everything
    assert wrong not in everything, everything


# -- signed messages (Celery's auth serializer) with Celery 5.6 on both sides ------------------

@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A signing key and certificate (issued by a CA of its own) and a store that trusts it."""
    root = tmp_path_factory.mktemp("signer")
    ca_key, key = new_key(), new_key()
    ca = issue("Signing CA", None, ca_key, ca_key, ca=True)
    cert = issue("alice", ca.subject, ca_key, key, ca=False, names=("alice",))
    save(root / "alice", key, cert)
    (root / "store").mkdir()
    (root / "store" / "alice.pem").write_bytes((root / "alice.pem").read_bytes())
    return {"security_key": str(root / "alice.key"), "security_certificate": str(root / "alice.pem"),
            "security_cert_store": str(root / "store")}


SIGNED_CELERIAC = '''
from celeriac import Celeriac
from celeriac.security import setup_security

app = Celeriac("signed", broker={broker!r}, backend={backend!r})
app.conf.update(task_default_queue={queue!r}, task_serializer="auth", accept_content=["auth"], {settings})
setup_security(app)


@app.task(name="tls.add")
def add(x, y):
    return x + y
'''

SIGNED_CELERY = '''
from celery import Celery

app = Celery("signed", broker={broker!r}, backend={backend!r})
app.conf.update(task_default_queue={queue!r}, task_serializer="auth", accept_content=["auth"],
                result_accept_content=["json"], {settings})
app.setup_security(allowed_serializers=["json"])


@app.task(name="tls.add")
def add(x, y):
    return x + y
'''

CELERY_CLIENT = '''
import json
from {module} import app

first = app.send_task("tls.add", (2, 3)).get(timeout=30)
app.send_task("tls.add", (1, 1), task_id={unsigned!r}, serializer="json")  # unsigned
second = app.send_task("tls.add", (4, 4)).get(timeout=30)
print(json.dumps([first, second]))
'''


def _tls_settings(server: TLSRedis) -> dict[str, Any]:
    options = {"ssl_cert_reqs": "required", "ssl_ca_certs": server.certs["ca"]}
    return {"broker_use_ssl": options, "redis_backend_use_ssl": options}


def test_a_celery_client_signs_and_a_celeriac_worker_runs_only_signed_tasks(
        tls_redis: TLSRedis, signer: dict[str, str], tmp_path: Path, workers: list[Worker]) -> None:
    pytest.importorskip("celery")
    url = tls_redis.url()
    settings = {**signer, **_tls_settings(tls_redis)}
    worker = Worker(tmp_path, url, url, template=SIGNED_CELERIAC, **settings)
    workers.append(worker)
    worker.wait_ready()
    client = f"celeryclient_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{client}.py").write_text(SIGNED_CELERY.format(
        broker=url, backend=url, queue=worker.queue, extra="",
        settings=", ".join(f"{k}={v!r}" for k, v in settings.items())))
    unsigned = f"unsigned-{uuid.uuid4()}"
    script = tmp_path / "send.py"
    script.write_text(CELERY_CLIENT.format(module=client, unsigned=unsigned))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=worker.env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:] + worker.text()[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[5, 8]"
    wait_for(lambda: unsigned in worker.text(), 10, "the unsigned message to be logged")
    refused = [line for line in worker.text().splitlines() if unsigned in line]
    assert len(refused) == 1 and "Rejected" in refused[0] and "accept_content" in refused[0], refused


def test_a_celeriac_client_signs_and_a_celery_worker_runs_it(
        tls_redis: TLSRedis, signer: dict[str, str], tmp_path: Path, workers: list[Worker]) -> None:
    pytest.importorskip("celery")
    from celeriac.security import setup_security

    url = tls_redis.url()
    settings = {**signer, **_tls_settings(tls_redis)}
    worker = Worker(tmp_path, url, url, template=SIGNED_CELERY, command="celery",
                    args=("--without-gossip", "--without-mingle", "--without-heartbeat"), **settings)
    workers.append(worker)
    worker.wait_ready()
    app = _client(url, url, worker.queue, task_serializer="auth", accept_content=["auth"], **settings)
    setup_security(app)
    try:
        results = [app.send_task("tls.add", (i, 10)) for i in range(5)]
        assert [r.get(timeout=30) for r in results] == [i + 10 for i in range(5)]
    finally:
        app.close()
    assert "SecurityError" not in worker.text() and "tls.add" in worker.text()


def test_errors_about_url_lists_mask_every_password() -> None:
    """A Sentinel list's error names every URL with its password masked (and does not raise)."""
    url = f"sentinel://:{PASSWORD}@h1:26379;sentinel://:{PASSWORD}@h2:26379/0"
    with pytest.raises(ValueError, match="master_name") as info:
        make_client(url)
    assert PASSWORD not in str(info.value) and "sentinel://:**@h2:26379/0" in str(info.value)
    assert PASSWORD not in describe_error(OSError("down"), url)
    assert PASSWORD not in describe_error(OSError("down"), f"redis://:{PASSWORD}@h:notaport/0")
