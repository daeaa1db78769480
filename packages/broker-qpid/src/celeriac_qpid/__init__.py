"""Celeriac broker plugin for AMQP 1.0 brokers (Qpid, RabbitMQ's AMQP 1.0 plugin, ActiveMQ
Artemis, Azure Service Bus ...) through python-qpid-proton.

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "QpidBroker": "celeriac_qpid.broker",
}

__all__ = ["QpidBroker", "__version__"]

if TYPE_CHECKING:
    from celeriac_qpid.broker import QpidBroker


def __getattr__(name: str) -> Any:
    """Load ``name`` from its module on first access. Raises ``AttributeError`` for others."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'celeriac_qpid' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
