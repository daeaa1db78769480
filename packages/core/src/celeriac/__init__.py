"""Celeriac: a distributed task queue that speaks Celery's protocol.

The names most programs need are importable from here: ``Celeriac`` (alias ``Celery``),
``shared_task``, the canvas (``signature``, ``chain``, ``group``, ``chord``, ``chunks``) and
``AsyncResult``. They are loaded on first access so ``import celeriac`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Celeriac": "celeriac.app",
    "Celery": "celeriac.app",
    "shared_task": "celeriac.app",
    "Task": "celeriac.task",
    "Signature": "celeriac.canvas",
    "signature": "celeriac.canvas",
    "chain": "celeriac.canvas",
    "group": "celeriac.canvas",
    "chord": "celeriac.canvas",
    "chunks": "celeriac.canvas",
    "xmap": "celeriac.canvas",
    "xstarmap": "celeriac.canvas",
    "AsyncResult": "celeriac.result",
    "GroupResult": "celeriac.result",
    "ResultSet": "celeriac.result",
    "states": "celeriac.states",
}

__all__ = [
    "AsyncResult", "Celeriac", "Celery", "GroupResult", "ResultSet", "Signature", "Task",
    "__version__", "chain", "chord", "chunks", "group", "shared_task", "signature", "states",
    "xmap", "xstarmap",
]

if TYPE_CHECKING:
    from celeriac import states
    from celeriac.app import Celeriac, Celery, shared_task
    from celeriac.canvas import Signature, chain, chord, chunks, group, signature, xmap, xstarmap
    from celeriac.result import AsyncResult, GroupResult, ResultSet
    from celeriac.task import Task


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'celeriac' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(module_name)
    value = module if name == "states" else getattr(module, name)
    globals()[name] = value
    return value
