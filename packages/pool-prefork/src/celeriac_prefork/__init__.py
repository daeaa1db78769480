"""Process pool for Celeriac workers (``-P prefork``).

The names below load on first access, so discovering the plugin imports no client library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "PreforkPool": "celeriac_prefork.pool",
}

__all__ = ["PreforkPool", "__version__"]

if TYPE_CHECKING:
    from celeriac_prefork.pool import PreforkPool


def __getattr__(name: str) -> Any:
    """Load ``name`` from its module on first access. Raises ``AttributeError`` for others."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'celeriac_prefork' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
