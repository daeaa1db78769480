"""Process pool for Celeriac workers (``-P prefork``)."""

from celeriac_prefork.pool import PreforkPool

__all__ = ["PreforkPool"]
__version__ = "0.1.0"
