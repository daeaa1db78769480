"""Celeriac broker plugin for AMQP 1.0 brokers (Qpid, RabbitMQ's AMQP 1.0 plugin, ActiveMQ
Artemis, Azure Service Bus ...) through python-qpid-proton.

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celeriac.plugins import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "QpidBroker": "celeriac_qpid.broker",
}

__all__ = ["QpidBroker", "__version__"]

if TYPE_CHECKING:
    from celeriac_qpid.broker import QpidBroker


__getattr__ = lazy_exports(__name__, _LAZY)
