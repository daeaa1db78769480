"""Green pool for Celeriac workers (``-P eventlet``): thousands of I/O-bound tasks in one process."""

from celeriac_eventlet.pool import EventletPool

__all__ = ["EventletPool"]
__version__ = "0.1.0"
