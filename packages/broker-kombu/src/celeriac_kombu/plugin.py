"""Registers the kombu bridge with Celeriac (entry point group ``celeriac``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celeriac.plugins import hookimpl
from celeriac_kombu.transports import PLAIN_SCHEMES, PREFIX


def _broker(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac_kombu.broker import KombuBroker

    return KombuBroker(url, conf)


@hookimpl
def celeriac_brokers() -> Mapping[str, Callable[..., Any]]:
    """``kombu+<transport>://`` for every kombu transport (a scheme ending in ``+`` claims every
    scheme that starts with it), and the plain schemes of transports no Celeriac plugin ships
    (``filesystem``, ``sqs``, ``zookeeper``, ``sqla+...`` ...)."""
    return dict.fromkeys((PREFIX, *PLAIN_SCHEMES), _broker)
