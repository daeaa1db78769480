"""Registers the ``gevent`` pool with Celeriac."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celeriac.plugins import hookimpl


@hookimpl
def celeriac_pools() -> Mapping[str, Callable[..., Any]]:
    """``gevent``: tasks run in greenlets of a monkey-patched worker process."""
    from celeriac_gevent.pool import GeventPool

    return {"gevent": GeventPool}
