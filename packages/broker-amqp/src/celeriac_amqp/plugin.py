"""Registers the ``amqp``, ``amqps`` and ``pyamqp`` broker schemes with Celeriac."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celeriac.plugins import hookimpl


def _amqp_broker(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac_amqp.broker import AMQPBroker

    return AMQPBroker(url, conf)


@hookimpl
def celeriac_brokers() -> Mapping[str, Callable[..., Any]]:
    """``amqp://``, ``amqps://`` (TLS) and ``pyamqp://``: RabbitMQ through pika."""
    return {"amqp": _amqp_broker, "amqps": _amqp_broker, "pyamqp": _amqp_broker}
