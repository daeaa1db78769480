"""Certificates for TLS tests, made on the fly: a CA, an unrelated CA and a server certificate.

Used by the plugins' TLS tests (a private ``redis-server --tls-port``, stunnel in front of
RabbitMQ). Needs the ``cryptography`` package (``pip install 'celeriac[auth]'``); without it
:func:`make_certificates` raises ``ImportError`` (tests skip with ``pytest.importorskip``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

__all__ = ["issue", "make_certificates", "new_key", "save"]


def _x509() -> Any:
    from cryptography import x509

    return x509


def new_key() -> Any:
    """A new 2048-bit RSA private key."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def save(path: Path, key: Any, cert: Any) -> None:
    """Write ``path`` with suffix ``.key`` (mode 0600) and ``.pem``."""
    from cryptography.hazmat.primitives import serialization

    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    path.with_suffix(".key").chmod(0o600)
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue(subject: str, issuer: Any, issuer_key: Any, key: Any, *, ca: bool,
          names: tuple[str, ...] = ()) -> Any:
    """A certificate for ``subject`` (self-signed when ``issuer`` is None), valid one day;
    a CA certificate with ``ca``, else one for the DNS ``names``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    builder = (_x509().CertificateBuilder()
               .subject_name(_x509().Name([_x509().NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer or _x509().Name([_x509().NameAttribute(NameOID.COMMON_NAME, subject)]))
               .public_key(key.public_key()).serial_number(_x509().random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(_x509().BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(_x509().KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(_x509().SubjectKeyIdentifier.from_public_key(key.public_key()),
                                        critical=False)
    else:
        builder = builder.add_extension(_x509().SubjectAlternativeName(
            [_x509().DNSName(n) for n in names]), critical=False)
        builder = builder.add_extension(
            _x509().AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(root: Path, names: tuple[str, ...] = ("localhost",)) -> dict[str, str]:
    """Write PEM files into ``root`` and return their paths by name: ``ca`` (a CA), ``other`` (an
    unrelated CA) and ``server`` (``server.pem`` with its key ``server.key``, valid for the host
    ``names`` only, signed by ``ca``, one day). Raises ``ImportError`` without cryptography."""
    ca_key, other_key, server_key = new_key(), new_key(), new_key()
    ca = issue("Celeriac Test CA", None, ca_key, ca_key, ca=True)
    other = issue("Some Other CA", None, other_key, other_key, ca=True)
    server = issue(names[0], ca.subject, ca_key, server_key, ca=False, names=names)
    save(root / "ca", ca_key, ca)
    save(root / "other", other_key, other)
    save(root / "server", server_key, server)
    return {name: str(root / f"{name}.pem") for name in ("ca", "other", "server")}
