"""Celeriac broker plugin for RabbitMQ (AMQP 0-9-1) through pika, wire-compatible with Celery."""

from __future__ import annotations

from celeriac_amqp.broker import AMQPBroker

__all__ = ["AMQPBroker", "__version__"]

__version__ = "0.1.0"
