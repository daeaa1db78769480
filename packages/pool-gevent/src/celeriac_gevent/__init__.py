"""Green pool for Celeriac workers (``-P gevent``): thousands of I/O-bound tasks in one process."""

from celeriac_gevent.pool import GeventPool

__all__ = ["GeventPool"]
__version__ = "0.1.0"
