"""Celeriac broker plugin for AMQP 1.0 brokers (Qpid, RabbitMQ's AMQP 1.0 plugin, ActiveMQ
Artemis, Azure Service Bus ...) through python-qpid-proton."""

from __future__ import annotations

from celeriac_qpid.broker import QpidBroker

__all__ = ["QpidBroker", "__version__"]

__version__ = "0.1.0"
