"""Celeriac broker plugin for RabbitMQ (AMQP 0-9-1) through pika, wire-compatible with Celery.

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AMQPBroker": "celeriac_amqp.broker",
}

__all__ = ["AMQPBroker", "__version__"]

if TYPE_CHECKING:
    from celeriac_amqp.broker import AMQPBroker


def __getattr__(name: str) -> Any:
    """Load ``name`` from its module on first access. Raises ``AttributeError`` for others."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'celeriac_amqp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
