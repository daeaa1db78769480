"""Worker heartbeats: ``worker-online``, ``worker-heartbeat`` every ``interval`` s, ``worker-offline``."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from celeriac import __version__
from celeriac.events import EventDispatcher

__all__ = ["Heart"]


class Heart:
    """Sends the worker's liveness events while task events are on."""

    def __init__(self, dispatcher: EventDispatcher, counters: Callable[[], tuple[int, int]],
                 interval: float = 2.0) -> None:
        self.dispatcher = dispatcher
        self.counters = counters
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="Heart", daemon=True)

    def beat(self, event_type: str) -> None:
        """Send one worker event now."""
        active, processed = self.counters()
        load = list(os.getloadavg()) if hasattr(os, "getloadavg") else [0.0, 0.0, 0.0]
        self.dispatcher.send(event_type, freq=self.interval, active=active, processed=processed,
                             loadavg=load, sw_ident="py-celeriac", sw_ver=__version__,
                             sw_sys=os.uname().sysname if hasattr(os, "uname") else "")

    def start(self) -> None:
        """Announce the worker and start beating."""
        self.beat("worker-online")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat("worker-heartbeat")

    def stop(self) -> None:
        """Stop beating and announce the worker is going away."""
        self._stop.set()
        self._thread.join(5)
        self.beat("worker-offline")
