"""``celeriac worker -P eventlet`` through the real command line, on the live Redis and RabbitMQ.

The tests are the green pool kit's (:mod:`celeriac.testing.green_kit`), shared with the gevent
pool: every patched process is a subprocess, so this pytest process is never monkey-patched.
"""

from __future__ import annotations

from celeriac.testing.green_kit import GreenPoolConformance


class TestEventletPool(GreenPoolConformance):
    """The kit on ``-P eventlet`` (a patched ``socket`` lives in ``eventlet.greenio``)."""

    pool = "eventlet"
