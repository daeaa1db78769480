"""Celeriac's ``rpc://`` result backend: results as messages to the caller, like Celery's."""

from __future__ import annotations

from celeriac_rpc.backend import RPCBackend

__all__ = ["RPCBackend", "__version__"]

__version__ = "0.1.0"
