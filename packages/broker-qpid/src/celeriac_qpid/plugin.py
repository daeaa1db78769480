"""Registers the ``qpid``, ``amqp10``, ``qpids`` and ``amqps10`` broker schemes with Celeriac."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celeriac.plugins import hookimpl


def _qpid_broker(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac_qpid.broker import QpidBroker

    return QpidBroker(url, conf)


@hookimpl
def celeriac_brokers() -> Mapping[str, Callable[..., Any]]:
    """``qpid://``, ``amqp10://`` and, with TLS, ``qpids://``, ``amqps10://``: AMQP 1.0 brokers
    through python-qpid-proton."""
    return {"qpid": _qpid_broker, "amqp10": _qpid_broker, "qpids": _qpid_broker, "amqps10": _qpid_broker}
