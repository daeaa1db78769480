"""Registers the ``eventlet`` pool with Celeriac."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celeriac.plugins import hookimpl


@hookimpl
def celeriac_pools() -> Mapping[str, Callable[..., Any]]:
    """``eventlet``: tasks run in green threads of a monkey-patched worker process."""
    from celeriac_eventlet.pool import EventletPool

    return {"eventlet": EventletPool}
