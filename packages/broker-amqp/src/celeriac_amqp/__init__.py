"""Celeriac broker plugin for RabbitMQ (AMQP 0-9-1) through pika, wire-compatible with Celery.

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celeriac.plugins import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "AMQPBroker": "celeriac_amqp.broker",
}

__all__ = ["AMQPBroker", "__version__"]

if TYPE_CHECKING:
    from celeriac_amqp.broker import AMQPBroker


__getattr__ = lazy_exports(__name__, _LAZY)
