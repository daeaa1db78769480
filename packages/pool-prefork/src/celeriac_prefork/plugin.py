"""Registers the ``prefork`` pool with Celeriac."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celeriac.plugins import hookimpl


@hookimpl
def celeriac_pools() -> Mapping[str, Callable[..., Any]]:
    """``prefork``: tasks run in forked child processes."""
    from celeriac_prefork.pool import PreforkPool

    return {"prefork": PreforkPool}
