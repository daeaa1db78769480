"""Process pool for Celeriac workers (``-P prefork``).

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celeriac.plugins import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "PreforkPool": "celeriac_prefork.pool",
}

__all__ = ["PreforkPool", "__version__"]

if TYPE_CHECKING:
    from celeriac_prefork.pool import PreforkPool


__getattr__ = lazy_exports(__name__, _LAZY)
