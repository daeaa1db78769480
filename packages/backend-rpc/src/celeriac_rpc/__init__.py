"""Celeriac's ``rpc://`` result backend: results as messages to the caller, like Celery's.

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celeriac.plugins import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "RPCBackend": "celeriac_rpc.backend",
}

__all__ = ["RPCBackend", "__version__"]

if TYPE_CHECKING:
    from celeriac_rpc.backend import RPCBackend


__getattr__ = lazy_exports(__name__, _LAZY)
