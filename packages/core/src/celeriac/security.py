"""Security helpers: passwords masked wherever a URL or a setting is shown, and signed messages.

Masking (no dependencies): :func:`mask_url` hides the password of every URL in a string (failover
lists separated by ``;`` included) and secret-looking query values; :func:`mask_settings` returns
a copy of the settings safe to show (``inspect conf``): secret-looking keys are replaced, URLs
masked, at any depth.

Signed messages: Celery's ``auth`` serializer, wire-compatible (``pip install celeriac[auth]`` for
the ``cryptography`` package). :func:`setup_security` registers it; the client then signs each task
body with its private key, and a worker whose ``accept_content`` is ``['auth']`` runs only messages
signed by a certificate in its trusted store. The wire format is::

    base64( b64(signer id) SEP b64(signature) SEP content_type SEP content_encoding SEP body )

with ``SEP = b"\\x00\\x01"``, ``body`` the task body serialized by the inner serializer (JSON by
default), the signature RSA-PSS (MGF1, maximum salt length) over ``body`` with ``digest``, and the
signer id the certificate's issuer attribute values joined by spaces, a space, then its serial
number in decimal. A message that is unsigned, signed by an unknown or expired certificate, or
altered raises :class:`SecurityError` (a ``DecodeError``): the worker logs it with the task id and
rejects it, and goes on.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import glob
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from celeriac.exceptions import DecodeError, ImproperlyConfigured
from celeriac.serialization import Serializer, get_serializer, loads, register

__all__ = [
    "AUTH_CONTENT_TYPE",
    "MASK",
    "CertStore",
    "SecureSerializer",
    "SecurityError",
    "mask_settings",
    "mask_url",
    "setup_security",
]

#: What a secret is replaced with.
MASK = "**"
#: Setting names (and query keys) whose values are secrets.
_SECRET_NAME = re.compile(r"pass(word|wd|phrase)?$|password|secret|token|api_?key|credential|private",
                          re.IGNORECASE)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


def _is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def _mask_one(url: str) -> str:
    found = _SCHEME.search(url)
    if found is None:
        return url
    start = found.end()
    # The user information ends at the last '@' before the query or fragment (a password with a
    # raw '/' or '@' is still hidden whole).
    stop = len(url)
    for mark in ("?", "#"):
        index = url.find(mark, start)
        if index != -1:
            stop = min(stop, index)
    at = url.rfind("@", start, stop)
    head = url
    if at != -1:
        userinfo = url[start:at]
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            head = f"{url[:start]}{user}:{MASK}{url[at:]}"
    question = head.find("?", start)
    if question == -1:
        return head
    query, hash_, fragment = head[question + 1:].partition("#")
    fields = []
    for field in query.split("&"):
        key, eq, value = field.partition("=")
        fields.append(f"{key}={MASK}" if eq and value and _is_secret_name(key) else field)
    return head[:question + 1] + "&".join(fields) + hash_ + fragment


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``**``: ``redis://:**@host:6379/0``.

    Handles failover lists (``amqp://u:p@a;amqp://u:p@b``), passwords that are not URL-quoted,
    IPv6 hosts, and secret query values (``?password=``, ``?ssl_password=``). Never raises.
    """
    if not isinstance(url, str):
        return url
    return ";".join(_mask_one(part) for part in url.split(";"))


def mask_settings(values: Any, _key: str = "") -> Any:
    """A copy of ``values`` (a mapping, list or scalar) safe to show: the values of secret-looking
    keys (``password``, ``secret``, ``token``, ``api_key``, ...) become ``**`` and every URL is
    masked, at any depth."""
    if _key and _is_secret_name(_key) and values not in (None, "", b""):
        return MASK
    if isinstance(values, Mapping):
        return {k: mask_settings(v, str(k)) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(mask_settings(v) for v in values)
    if isinstance(values, str) and ("://" in values or "@" in values):
        return mask_url(values)
    return values


# -- signed messages ---------------------------------------------------------------------------

AUTH_CONTENT_TYPE = "application/data"
_SEPARATOR = b"\x00\x01"
_NEEDS_CRYPTOGRAPHY = ("Signed messages need the cryptography package: pip install 'celeriac[auth]' "
                       "(or pip install cryptography).")


class SecurityError(DecodeError):
    """A signed message could not be verified (unsigned, unknown signer, altered), or signing failed."""


def _crypto() -> Any:
    try:
        from cryptography import x509  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ImproperlyConfigured(_NEEDS_CRYPTOGRAPHY) from None
    return x509


def _digest(name: str) -> Any:
    from cryptography.hazmat.primitives import hashes  # type: ignore[import-not-found, unused-ignore]

    algorithm = getattr(hashes, str(name).upper().replace("-", ""), None)
    if not (isinstance(algorithm, type) and issubclass(algorithm, hashes.HashAlgorithm)):
        raise ImproperlyConfigured(f"Unknown digest {name!r} for signed messages; use e.g. 'sha256'.")
    return algorithm()


def certificate_id(cert: Any) -> str:
    """The signer id Celery writes: the issuer's attribute values joined by spaces, then the serial."""
    issuer = " ".join(str(attribute.value) for attribute in cert.issuer)
    return f"{issuer} {cert.serial_number}"


def _load_certificate(data: bytes, where: str) -> Any:
    x509 = _crypto()
    from cryptography.hazmat.primitives.asymmetric import rsa  # type: ignore[import-not-found, unused-ignore]

    try:
        cert: Any = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{where} is not a PEM certificate: {exc}") from None
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        raise ImproperlyConfigured(f"{where}: only RSA certificates can sign messages (as in Celery).")
    return cert


def _expired(cert: Any) -> bool:
    return bool(dt.datetime.now(dt.timezone.utc) >= cert.not_valid_after_utc)


class CertStore:
    """Trusted certificates by signer id, loaded from a directory (every file in it), a glob
    pattern or one file. An expired certificate or two with the same id is an error, as in Celery."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.certs: dict[str, Any] = {}
        if path is None:
            return
        pattern = os.fspath(path)
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "*")
        files = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not files:
            raise ImproperlyConfigured(f"No certificate found at {os.fspath(path)!r} (security_cert_store).")
        for name in files:
            with open(name, "rb") as handle:
                self.add(_load_certificate(handle.read(), name))

    def add(self, cert: Any) -> None:
        """Trust ``cert``."""
        cert_id = certificate_id(cert)
        if _expired(cert):
            raise ImproperlyConfigured(f"The trusted certificate {cert_id!r} has expired.")
        if cert_id in self.certs:
            raise ImproperlyConfigured(f"Two trusted certificates have the id {cert_id!r}.")
        self.certs[cert_id] = cert

    def __getitem__(self, cert_id: str) -> Any:
        try:
            return self.certs[cert_id]
        except KeyError:
            raise SecurityError(f"the message is signed by an unknown certificate {cert_id!r}") from None


class SecureSerializer:
    """Signs with ``key``/``cert`` and verifies against ``store``; the body inside is serialized
    with ``serializer``, and only the content types of ``allowed`` are decoded inside."""

    def __init__(self, key: Any = None, cert: Any = None, store: CertStore | None = None,
                 digest: str = "sha256", serializer: str = "json",
                 allowed: Iterable[str] | None = None) -> None:
        self.key = key
        self.cert = cert
        self.signer = certificate_id(cert) if cert is not None else None
        self.store = store
        self.digest = _digest(digest)
        self.serializer = serializer
        types = set()
        for entry in allowed if allowed is not None else [serializer]:
            types.add(entry if "/" in entry else get_serializer(entry).content_type)
        self.allowed = frozenset(types)

    def _padding(self, salt: Any) -> Any:
        from cryptography.hazmat.primitives.asymmetric import padding  # type: ignore[import-not-found, unused-ignore]

        return padding.PSS(mgf=padding.MGF1(self.digest), salt_length=salt)

    def dumps(self, obj: Any) -> bytes:
        """Serialize ``obj`` with the inner serializer, sign it, and pack it (ASCII bytes)."""
        if self.key is None or self.signer is None:
            raise SecurityError("Cannot sign: setup_security() was given no private key and certificate.")
        from cryptography.hazmat.primitives.asymmetric import padding  # type: ignore[import-not-found, unused-ignore]

        codec = get_serializer(self.serializer)
        body = codec.dumps(obj)
        signature = self.key.sign(body, self._padding(padding.PSS.MAX_LENGTH), self.digest)
        fields = [base64.b64encode(self.signer.encode()), base64.b64encode(signature),
                  codec.content_type.encode(), codec.content_encoding.encode(), body]
        return base64.b64encode(_SEPARATOR.join(fields))

    def loads(self, data: bytes) -> Any:
        """Unpack, verify the signature against the trusted store, then decode the body inside.

        Raises :class:`SecurityError` for anything that is not a valid signature by a trusted,
        unexpired certificate over exactly this body."""
        if self.store is None:
            raise SecurityError("Cannot verify: setup_security() was given no certificate store.")
        from cryptography.exceptions import InvalidSignature  # type: ignore[import-not-found, unused-ignore]
        from cryptography.hazmat.primitives.asymmetric import padding  # type: ignore[import-not-found, unused-ignore]

        try:
            raw = base64.b64decode(bytes(data).strip(), validate=True)
            parts = raw.split(_SEPARATOR, 4)
            if len(parts) != 5:
                raise ValueError("not five fields")
            signer = base64.b64decode(parts[0], validate=True).decode("utf-8")
            signature = base64.b64decode(parts[1], validate=True)
            content_type = parts[2].decode("ascii")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise SecurityError("the message is not signed (not in the auth serializer's format)") from None
        body = parts[4]
        cert = self.store[signer]
        if _expired(cert):
            raise SecurityError(f"the message is signed by an expired certificate {signer!r}")
        try:
            cert.public_key().verify(signature, body, self._padding(padding.PSS.AUTO), self.digest)
        except InvalidSignature:
            raise SecurityError(f"bad signature by {signer!r}: the message was altered or forged") from None
        if content_type not in self.allowed:
            raise SecurityError(f"the signed body is {content_type!r}, which is not allowed "
                                f"({', '.join(sorted(self.allowed))}); see allowed_serializers")
        return loads(body, content_type)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ImproperlyConfigured(f"Cannot read the {what} {os.fspath(path)!r}: {exc.strerror}") from None


def _load_key(path: str | os.PathLike[str], password: str | bytes | None) -> Any:
    _crypto()
    from cryptography.hazmat.primitives import serialization  # type: ignore[import-not-found, unused-ignore]
    from cryptography.hazmat.primitives.asymmetric import rsa  # type: ignore[import-not-found, unused-ignore]

    secret = password.encode() if isinstance(password, str) else password
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=secret)
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured(f"Cannot load the private key {os.fspath(path)!r}: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ImproperlyConfigured("Only RSA private keys can sign messages (as in Celery).")
    return key


_SETTINGS_NEEDED = (
    "Signed messages need task_serializer='auth' and accept_content=['auth'] (a worker that also "
    "accepted unsigned content would make signing pointless). Set both, then call setup_security()."
)


def setup_security(app: Any, allowed_serializers: Iterable[str] | None = None, key: str | None = None,
                   key_password: str | bytes | None = None, cert: str | None = None,
                   store: str | None = None, digest: str | None = None,
                   serializer: str = "json") -> SecureSerializer:
    """Register the ``auth`` serializer: sign with ``key``/``cert``, verify with the certificates
    in ``store``. Arguments left out come from the settings ``security_key``,
    ``security_key_password``, ``security_certificate``, ``security_cert_store`` and
    ``security_digest`` (``sha256``). ``allowed_serializers`` are the serializers a signed body may
    use inside (default: ``serializer``).

    The app must already have ``task_serializer='auth'`` and ``accept_content=['auth']``.
    Like Celery's, the registration is process-wide (every app in the process signs with it).
    Raises ``ImproperlyConfigured`` for missing settings, unreadable files or a missing
    ``cryptography`` package.
    """
    _crypto()
    conf = app.conf
    if conf.get("task_serializer") != "auth" or list(conf.get("accept_content") or ()) != ["auth"]:
        raise ImproperlyConfigured(_SETTINGS_NEEDED)
    key = key or conf.get("security_key")
    key_password = key_password or conf.get("security_key_password")
    cert = cert or conf.get("security_certificate")
    store = store or conf.get("security_cert_store")
    digest = digest or conf.get("security_digest") or "sha256"
    if not (key and cert and store):
        raise ImproperlyConfigured(
            "setup_security() needs a private key, its certificate and a store of trusted "
            "certificates: key=, cert=, store= (or the security_key, security_certificate and "
            "security_cert_store settings).")
    secure = SecureSerializer(_load_key(key, key_password),
                              _load_certificate(_read(cert, "certificate"), str(cert)),
                              CertStore(store), digest, serializer, allowed_serializers)
    register(Serializer("auth", AUTH_CONTENT_TYPE, "utf-8", secure.dumps, secure.loads))
    return secure
