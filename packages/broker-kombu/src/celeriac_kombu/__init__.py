"""celeriac-kombu: every kombu transport (SQS, Azure, Pub/Sub, MongoDB, SQLAlchemy, Zookeeper,
etcd, the filesystem ...) as a Celeriac broker, with URLs ``kombu+<transport>://...``."""

from __future__ import annotations

from celeriac_kombu.broker import KombuBroker, KombuConsumer, KombuSubscription, capabilities_of
from celeriac_kombu.transports import MissingClientLibrary, UnknownTransport

__version__ = "0.1.0"

__all__ = ["KombuBroker", "KombuConsumer", "KombuSubscription", "MissingClientLibrary",
           "UnknownTransport", "__version__", "capabilities_of"]
