"""Green pool for Celeriac workers (``-P eventlet``): thousands of I/O-bound tasks in one process.

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celeriac.plugins import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "EventletPool": "celeriac_eventlet.pool",
}

__all__ = ["EventletPool", "__version__"]

if TYPE_CHECKING:
    from celeriac_eventlet.pool import EventletPool


__getattr__ = lazy_exports(__name__, _LAZY)
