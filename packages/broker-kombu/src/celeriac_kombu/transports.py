"""From a ``kombu+<transport>://`` URL to a kombu transport class, with clear errors.

This module knows three things about kombu's transports that kombu itself does not say in code:
which client library each one needs (so a missing one is one line naming what to install), which
ones were tested with Celeriac here, and the Celeriac URL forms (``kombu+sqs://``, plus plain
schemes for transports no Celeriac plugin ships). Everything else (the list of transports, what
exchange types each implements) is asked of kombu at run time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from celeriac.exceptions import ImproperlyConfigured

__all__ = [
    "CLIENT_LIBRARIES",
    "PLAIN_SCHEMES",
    "PREFIX",
    "TESTED",
    "Client",
    "MissingClientLibrary",
    "UnknownTransport",
    "kombu_url",
    "resolve",
    "transport_alias",
]

#: The Celeriac scheme prefix this plugin claims: ``kombu+sqs://`` is kombu's ``sqs://``.
PREFIX = "kombu+"


@dataclass(frozen=True)
class Client:
    """The client library a kombu transport imports, and how to install it.

    ``modules`` are the import names checked (all must be importable); ``extra`` is the
    ``celeriac-kombu[...]`` extra that pulls it in (kombu's extra of the same name);
    ``package`` is the PyPI name of the library itself.
    """

    modules: tuple[str, ...]
    extra: str | None
    package: str

    def install_hint(self) -> str:
        """The pip command that installs the library, e.g. ``pip install "celeriac-kombu[sqs]"``."""
        if self.extra:
            return f'pip install "celeriac-kombu[{self.extra}]" (or: pip install {self.package})'
        return f"pip install {self.package}"


#: kombu transport alias (lower case) -> the client library it needs. Transports missing here
#: (memory, filesystem, amqp/pyamqp) need nothing beyond kombu.
CLIENT_LIBRARIES: dict[str, Client] = {
    "sqs": Client(("boto3", "botocore"), "sqs", "boto3"),
    "sqla": Client(("sqlalchemy",), "sqlalchemy", "SQLAlchemy"),
    "sqlalchemy": Client(("sqlalchemy",), "sqlalchemy", "SQLAlchemy"),
    "zookeeper": Client(("kazoo",), "zookeeper", "kazoo"),
    "etcd": Client(("etcd",), "etcd", "python-etcd"),
    "mongodb": Client(("pymongo",), "mongodb", "pymongo"),
    "azureservicebus": Client(("azure.servicebus",), "azureservicebus", "azure-servicebus"),
    "azurestoragequeues": Client(("azure.storage.queue",), "azurestoragequeues", "azure-storage-queue"),
    "gcpubsub": Client(("google.cloud.pubsub_v1",), "gcpubsub", "google-cloud-pubsub"),
    "consul": Client(("consul",), "consul", "python-consul2"),
    "confluentkafka": Client(("confluent_kafka",), "confluentkafka", "confluent-kafka"),
    "kafka": Client(("confluent_kafka",), "confluentkafka", "confluent-kafka"),
    "pyro": Client(("Pyro4",), "pyro", "Pyro4"),
    "slmq": Client(("softlayer_messaging",), "slmq", "softlayer_messaging"),
    "pgmq": Client(("pgmq",), "pgmq", "pgmq"),
    "librabbitmq": Client(("librabbitmq",), "librabbitmq", "librabbitmq"),
    "qpid": Client(("qpid.messaging",), "qpid", "qpid-python"),
    "redis": Client(("redis",), "redis", "redis"),
    "rediss": Client(("redis",), "redis", "redis"),
    "sentinel": Client(("redis",), "redis", "redis"),
}

#: Transports whose conformance kit, tutorial and Celery interop run in this repository's CI.
TESTED = ("filesystem", "sqla+postgresql")

#: Plain schemes (without ``kombu+``) this plugin also registers: transports that no Celeriac
#: plugin ships. ``sqla+`` and ``sqlalchemy+`` claim every SQLAlchemy URL (``sqla+mysql://``...).
PLAIN_SCHEMES = ("filesystem", "sqs", "zookeeper", "etcd", "mongodb", "azureservicebus",
                 "azurestoragequeues", "gcpubsub", "consul", "confluentkafka", "pyro", "slmq",
                 "pgmq", "sqla+", "sqlalchemy+")


class UnknownTransport(ImproperlyConfigured):
    """The URL names a transport kombu does not have."""


class MissingClientLibrary(ImproperlyConfigured):
    """The transport exists but the client library it needs is not installed."""


def kombu_url(url: str) -> str:
    """The URL handed to kombu: ``kombu+sqs://...`` -> ``sqs://...``; plain URLs unchanged.

    Raises ``UnknownTransport`` when ``url`` is ``kombu+`` with no transport name.
    """
    if url[: len(PREFIX)].lower() == PREFIX:
        rest = url[len(PREFIX):]
        if rest.startswith("://") or "://" not in rest:
            raise UnknownTransport(
                f"{url!r} names no kombu transport: write kombu+<transport>://..., "
                "e.g. kombu+filesystem:///var/spool/celeriac or kombu+sqs://")
        return rest
    return url


def transport_alias(url: str) -> str:
    """kombu's transport name in a kombu URL: ``sqla+postgresql://`` -> ``sqla``."""
    scheme = urlsplit(url).scheme if "://" in url else url
    return scheme.split("+", 1)[0]


def _known_aliases() -> list[str]:
    from kombu.transport import TRANSPORT_ALIASES

    return sorted({alias.lower() for alias in TRANSPORT_ALIASES})


def resolve(url: str) -> type[Any]:
    """The kombu ``Transport`` class for kombu URL ``url`` (already without ``kombu+``).

    Raises ``UnknownTransport`` (listing kombu's transports) when kombu has no such transport,
    and ``MissingClientLibrary`` (naming the package to install) when its client library is
    not importable. Thread-safe (imports only).
    """
    from kombu.transport import TRANSPORT_ALIASES, resolve_transport

    alias = transport_alias(url)
    known = {name.lower(): name for name in TRANSPORT_ALIASES}
    if alias.lower() not in known:
        raise UnknownTransport(
            f"kombu has no transport named {alias!r} (from {url.split('://', 1)[0]}://). "
            f"kombu's transports: {', '.join(_known_aliases())}.")
    client = CLIENT_LIBRARIES.get(alias.lower())
    if client is not None:
        for module in client.modules:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise MissingClientLibrary(
                    f"The kombu transport {alias!r} needs the {client.package} library, which is not "
                    f"installed. Install it with: {client.install_hint()}")
    try:
        cls = resolve_transport(known[alias.lower()])
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise MissingClientLibrary(
            f"The kombu transport {alias!r} could not be imported: {missing} is missing. "
            f"Install it with: pip install {missing.split('.')[0]}") from exc
    if cls is None:  # pragma: no cover - kombu returns None only for transport=None
        raise UnknownTransport(f"kombu has no transport named {alias!r}.")
    return cls  # type: ignore[no-any-return]
