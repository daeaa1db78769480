"""``celeriac worker -P gevent`` through the real command line, on the live Redis and RabbitMQ.

The tests are the green pool kit's (:mod:`celeriac.testing.green_kit`), shared with the eventlet
pool: every patched process is a subprocess, so this pytest process is never monkey-patched.
"""

from __future__ import annotations

from celeriac.testing.green_kit import GreenPoolConformance


class TestGeventPool(GreenPoolConformance):
    """The kit on ``-P gevent`` (a patched ``socket`` lives in ``gevent._socket3``)."""

    pool = "gevent"
