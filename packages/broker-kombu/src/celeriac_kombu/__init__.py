"""celeriac-kombu: every kombu transport (SQS, Azure, Pub/Sub, MongoDB, SQLAlchemy, Zookeeper,
etcd, the filesystem ...) as a Celeriac broker, with URLs ``kombu+<transport>://...``.

The names below load on first access, so discovering the plugin does not import kombu.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celeriac.plugins import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "KombuBroker": "celeriac_kombu.broker",
    "KombuConsumer": "celeriac_kombu.broker",
    "KombuSubscription": "celeriac_kombu.broker",
    "capabilities_of": "celeriac_kombu.broker",
    "MissingClientLibrary": "celeriac_kombu.transports",
    "UnknownTransport": "celeriac_kombu.transports",
}

__all__ = ["KombuBroker", "KombuConsumer", "KombuSubscription", "MissingClientLibrary",
           "UnknownTransport", "__version__", "capabilities_of"]

if TYPE_CHECKING:
    from celeriac_kombu.broker import KombuBroker, KombuConsumer, KombuSubscription, capabilities_of
    from celeriac_kombu.transports import MissingClientLibrary, UnknownTransport


__getattr__ = lazy_exports(__name__, _LAZY)
