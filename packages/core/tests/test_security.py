"""Security in the core: masked passwords, the ``auth`` serializer (Celery's, wire-compatible), and
pickle refused unless ``accept_content`` lists it.

The auth serializer is checked against Celery 5.6.2's own ``SecureSerializer`` in both directions,
and through a real in-thread worker: signed tasks run, unsigned, altered, forged and untrusted
ones are logged with their task id and rejected, and the worker goes on.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celeriac
from celeriac.exceptions import ContentDisallowed, DecodeError, ImproperlyConfigured
from celeriac.protocol import Message, encode_task
from celeriac.security import (
    CertStore,
    SecureSerializer,
    SecurityError,
    certificate_id,
    mask_settings,
    mask_url,
    setup_security,
)
from celeriac.serialization import AcceptPolicy, dumps, get_serializer, loads
from celeriac.testing.plugin import start_worker

# -- masking -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:s3cret@localhost:6379/0", "redis://:**@localhost:6379/0"),
    ("redis://user:s3cret@h", "redis://user:**@h"),
    ("rediss://:s3cret@h:6380/1?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
     "rediss://:**@h:6380/1?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem"),
    ("amqp://u:s3cret@h1;amqp://u:s3cret@h2//", "amqp://u:**@h1;amqp://u:**@h2//"),
    ("sentinel://:s3cret@h:26379;sentinel://:s3cret@h2:26379", "sentinel://:**@h:26379;sentinel://:**@h2:26379"),
    ("redis://:s3cret@[::1]:6379/0", "redis://:**@[::1]:6379/0"),
    ("redis://:s3/cr@et@h/0", "redis://:**@h/0"),  # not URL-quoted: still hidden whole
    ("redis://:s3cret@h:notaport/0", "redis://:**@h:notaport/0"),
    ("sqla+postgresql://u:s3cret@db/app", "sqla+postgresql://u:**@db/app"),
    ("mongodb://u:s3cret@h1,h2/db?replicaSet=x", "mongodb://u:**@h1,h2/db?replicaSet=x"),
    ("redis://h/0?password=s3cret&db=1", "redis://h/0?password=**&db=1"),
    ("amqp://guest@localhost//", "amqp://guest@localhost//"),
    ("sqlite:///celeriac-broker.db", "sqlite:///celeriac-broker.db"),
    ("redis://h/0?ssl_ca_certs=/p@th/ca.pem", "redis://h/0?ssl_ca_certs=/p@th/ca.pem"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "s3cret" not in mask_url(url) and "cr@et" not in mask_url(url)


def test_mask_settings_hides_secret_keys_and_urls_at_any_depth() -> None:
    conf = {
        "broker_url": "redis://:s3cret@h/0",
        "result_backend": "amqp://u:s3cret@h1;amqp://u:s3cret@h2//",
        "broker_transport_options": {"sentinel_kwargs": {"password": "s3cret"}, "visibility_timeout": 5},
        "redis_backend_use_ssl": {"ssl_ca_certs": "/ca.pem", "ssl_password": "s3cret"},
        "security_key_password": "s3cret",
        "my_api_key": "s3cret",
        "aws_secret_access_key": "s3cret",
        "task_routes": [{"a.*": {"queue": "a"}}],
        "worker_concurrency": 4,
        "empty_password": None,
    }
    shown = mask_settings(conf)
    assert "s3cret" not in repr(shown)
    assert shown["broker_url"] == "redis://:**@h/0"
    assert shown["broker_transport_options"] == {"sentinel_kwargs": {"password": "**"}, "visibility_timeout": 5}
    assert shown["redis_backend_use_ssl"]["ssl_ca_certs"] == "/ca.pem"
    assert shown["task_routes"] == [{"a.*": {"queue": "a"}}] and shown["worker_concurrency"] == 4
    assert shown["empty_password"] is None
    assert conf["broker_url"] == "redis://:s3cret@h/0"  # a copy: the settings are untouched


# -- certificates ------------------------------------------------------------------------------

NEEDS_CRYPTOGRAPHY = "signed messages need cryptography (celeriac[auth])"


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: Any, password: bytes | None = None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _issue(subject: str, issuer: str, issuer_key: Any, key: Any, days: float = 1) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Celeriac Tests"),
                                    x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=2)).not_valid_after(now + dt.timedelta(days=days))
            .sign(issuer_key, hashes.SHA256()))


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``alice`` (trusted, in ``store/``), ``mallory`` (same CA, not trusted), and an expired cert."""
    pytest.importorskip("cryptography", reason=NEEDS_CRYPTOGRAPHY)
    root = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    out: dict[str, Any] = {"root": root}
    for name in ("alice", "mallory"):
        key = _key()
        cert = _issue(name, "Test CA", ca_key, key)
        (root / f"{name}.key").write_bytes(_pem_key(key))
        (root / f"{name}.pem").write_bytes(_pem_cert(cert))
        out[name] = (str(root / f"{name}.key"), str(root / f"{name}.pem"), key, cert)
    (root / "store").mkdir()
    (root / "store" / "alice.pem").write_bytes(_pem_cert(out["alice"][3]))
    out["store"] = str(root / "store")
    expired_key = _key()
    expired = _issue("old", "Test CA", ca_key, expired_key, days=-1)
    (root / "expired").mkdir()
    (root / "expired" / "old.pem").write_bytes(_pem_cert(expired))
    out["expired_store"] = str(root / "expired")
    (root / "secret.key").write_bytes(_pem_key(out["alice"][2], b"key-s3cret"))
    return out


def _ours(pki: dict[str, Any], signer: str = "alice", **kwargs: Any) -> SecureSerializer:
    _, _, key, cert = pki[signer]
    return SecureSerializer(key, cert, CertStore(pki["store"]), **kwargs)


def _celerys(pki: dict[str, Any], signer: str = "alice") -> Any:
    security = pytest.importorskip("celery.security.serialization")
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey

    key_path, cert_path, _, _ = pki[signer]
    return security.SecureSerializer(PrivateKey(Path(key_path).read_text()),
                                     Certificate(Path(cert_path).read_text()),
                                     FSCertStore(pki["store"]), "sha256", serializer="json")


BODY = [[2, 2], {"x": "ü", "when": None}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def test_signer_id_is_celerys(pki: dict[str, Any]) -> None:
    from celery.security.certificate import Certificate

    cert_path = pki["alice"][1]
    assert certificate_id(pki["alice"][3]) == Certificate(Path(cert_path).read_text()).get_id()
    assert certificate_id(pki["alice"][3]).startswith("Celeriac Tests Test CA ")


def test_celery_verifies_what_we_sign_and_we_verify_what_celery_signs(pki: dict[str, Any]) -> None:
    ours, celerys = _ours(pki), _celerys(pki)
    signed = ours.dumps(BODY)
    assert signed.isascii()
    assert celerys.deserialize(signed.decode()) == BODY  # kombu hands it a str (content_encoding utf-8)
    theirs = celerys.serialize(BODY)
    assert ours.loads(theirs.encode()) == BODY


def test_unsigned_altered_and_untrusted_messages_are_refused(pki: dict[str, Any]) -> None:
    ours = _ours(pki)
    signed = base64.b64decode(ours.dumps(BODY))
    with pytest.raises(SecurityError, match="not signed"):
        ours.loads(b'[[2, 2], {}, {}]')
    altered = base64.b64encode(signed.replace(b"[2, 2]", b"[2, 3]"))
    with pytest.raises(SecurityError, match="bad signature"):
        ours.loads(altered)
    with pytest.raises(SecurityError, match="unknown certificate"):
        ours.loads(_ours(pki, "mallory").dumps(BODY))
    # a trusted signer's id with another key's signature
    forged = _ours(pki, "mallory")
    forged.signer = ours.signer
    with pytest.raises(SecurityError, match="bad signature"):
        ours.loads(forged.dumps(BODY))


def test_only_allowed_serializers_are_decoded_inside(pki: dict[str, Any]) -> None:
    pickler = _ours(pki, serializer="pickle", allowed=["pickle"])
    signed = pickler.dumps({"a": 1})
    assert pickler.loads(signed) == {"a": 1}
    with pytest.raises(SecurityError, match="not allowed"):
        _ours(pki).loads(signed)  # signed, but pickle inside is not allowed by default


def test_the_store_refuses_expired_certificates(pki: dict[str, Any]) -> None:
    with pytest.raises(ImproperlyConfigured, match="expired"):
        CertStore(pki["expired_store"])
    with pytest.raises(ImproperlyConfigured, match="No certificate"):
        CertStore(str(pki["root"] / "nothing-here"))


def test_setup_security_needs_the_settings(pki: dict[str, Any]) -> None:
    key, cert, _, _ = pki["alice"]
    app = Celeriac("sec", broker="memory://sec-setup", set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="task_serializer='auth'"):
        setup_security(app, key=key, cert=cert, store=pki["store"])
    app.conf.update(task_serializer="auth", accept_content=["auth"])
    with pytest.raises(ImproperlyConfigured, match="key=, cert=, store="):
        setup_security(app, key=key)
    with pytest.raises(ImproperlyConfigured, match="Cannot load the private key"):
        setup_security(app, key=str(pki["root"] / "secret.key"), cert=cert, store=pki["store"])
    app.conf.update(security_key=str(pki["root"] / "secret.key"), security_key_password="key-s3cret",
                    security_certificate=cert, security_cert_store=pki["store"])
    secure = setup_security(app)  # everything from the settings, the key password included
    assert secure.loads(get_serializer("auth").dumps([1])) == [1]
    ctype, encoding, body = dumps([1], "auth")
    assert (ctype, encoding) == ("application/data", "utf-8")
    assert loads(body, ctype, AcceptPolicy(["auth"])) == [1]
    with pytest.raises(ContentDisallowed):
        loads(b"[1]", "application/json", AcceptPolicy(["auth"]))
    app.close()


# -- through a worker --------------------------------------------------------------------------

@pytest.fixture
def signed_app(pki: dict[str, Any]) -> Any:
    key, cert, _, _ = pki["alice"]
    app = Celeriac("signed", broker="memory://signed", backend="memory://signed", set_as_current=False,
                   task_serializer="auth", accept_content=["auth"])
    setup_security(app, key=key, cert=cert, store=pki["store"])

    @app.task(name="sec.add")
    def add(x: int, y: int) -> int:
        return x + y

    yield app
    app.close()


def _publish(app: Celeriac, message: Message) -> None:
    app.broker.publish(message, "", "celery", queue=app.router.queue("celery"))


def test_a_worker_runs_only_signed_tasks(signed_app: Celeriac, pki: dict[str, Any],
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="celeriac.worker")
    worker = start_worker(signed_app)
    try:
        assert signed_app.send_task("sec.add", (2, 2)).get(timeout=10) == 4
        good = encode_task("sec.add", "signed-ok", [1, 1], {}, serializer="auth")
        unsigned = encode_task("sec.add", "unsigned-id", [5, 5], {})
        raw = base64.b64decode(good.body).replace(b"[1, 1]", b"[9, 9]")
        untrusted_ser = _ours(pki, "mallory")
        for message in (
            unsigned,
            Message(dict(good.headers, id="altered-id"), dict(good.properties, correlation_id="altered-id"),
                    base64.b64encode(raw), good.content_type, good.content_encoding),
            Message(dict(good.headers, id="untrusted-id"), dict(good.properties, correlation_id="untrusted-id"),
                    untrusted_ser.dumps([[3, 3], {}, {}]), good.content_type, good.content_encoding),
            Message(dict(good.headers, id="garbage-id"), {}, b"\x00not base64", good.content_type,
                    good.content_encoding),
        ):
            _publish(signed_app, message)
        assert signed_app.send_task("sec.add", (20, 22)).get(timeout=10) == 42  # it goes on
        deadline = time.monotonic() + 10
        ids = ("unsigned-id", "altered-id", "untrusted-id", "garbage-id")
        while time.monotonic() < deadline and not all(any(i in r.getMessage() for r in caplog.records) for i in ids):
            time.sleep(0.05)
    finally:
        worker.stop()
        worker._thread.join(10)  # type: ignore[attr-defined]
    lines = {i: [r.getMessage() for r in caplog.records if i in r.getMessage()] for i in ids}
    assert all(len(found) == 1 for found in lines.values()), lines
    assert "accept_content" in lines["unsigned-id"][0]
    assert "bad signature" in lines["altered-id"][0]
    assert "unknown certificate" in lines["untrusted-id"][0]
    assert "not signed" in lines["garbage-id"][0]
    assert not [r for r in caplog.records if r.exc_info]  # no tracebacks


# -- pickle ------------------------------------------------------------------------------------

def _send_pickle(name: str, accept: list[str] | None) -> tuple[str, bool]:
    """Publish a pickled task to a worker; its final state and whether its body ran."""
    settings = {} if accept is None else {"accept_content": accept}
    app = Celeriac(name, broker=f"memory://{name}", backend=f"memory://{name}", set_as_current=False,
                   **settings)
    ran: list[int] = []

    @app.task(name="sec.mark")
    def mark(x: int) -> int:
        ran.append(x)
        return x

    worker = start_worker(app)
    try:
        _publish(app, encode_task("sec.mark", f"pickled-{name}", [7], {}, serializer="pickle"))
        assert app.send_task("sec.mark", (1,)).get(timeout=10) == 1
        state = app.AsyncResult(f"pickled-{name}")
        deadline = time.monotonic() + 10
        while state.state == "PENDING" and time.monotonic() < deadline:
            time.sleep(0.05)
        return state.state, 7 in ran
    finally:
        worker.stop()
        worker._thread.join(10)  # type: ignore[attr-defined]
        app.close()


def test_pickle_is_refused_unless_accept_content_lists_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="celeriac.worker")
    assert _send_pickle("pickle-default", None) == ("FAILURE", False)
    assert _send_pickle("pickle-named", ["json", "pickle"]) == ("SUCCESS", True)
    assert _send_pickle("pickle-ctype", ["json", "application/x-python-serialize"]) == ("SUCCESS", True)
    refused = [r.getMessage() for r in caplog.records if "pickled-pickle-default" in r.getMessage()]
    assert refused and "accept_content" in refused[0]
    with pytest.raises(ContentDisallowed):
        loads(dumps(1, "pickle")[2], "application/x-python-serialize", AcceptPolicy(["json"]))
    with pytest.raises(DecodeError):
        loads(b"\x80garbage", "application/x-python-serialize", AcceptPolicy(["pickle"]))
