"""Registers the ``rpc`` result backend scheme with Celeriac."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celeriac.plugins import hookimpl


def _rpc_backend(url: str, conf: Mapping[str, Any]) -> Any:
    from celeriac_rpc.backend import RPCBackend

    return RPCBackend(url, conf)


@hookimpl
def celeriac_result_backends() -> Mapping[str, Callable[..., Any]]:
    """``rpc://``: results as messages to the caller's reply queue (needs a broker with reply
    queues: amqp, redis, sqlite, memory)."""
    return {"rpc": _rpc_backend}
