"""The eventlet pool: every task runs in its own green thread inside the worker process.

eventlet is in maintenance mode upstream (its maintainers advise new projects against it); this
pool is for projects that already depend on it. New projects should prefer ``-P gevent``.

The CLI calls :meth:`EventletPool.early_init` as soon as it has read ``-P eventlet``, before the app
module (and with it any network library) is imported: the whole process is monkey-patched then,
so ``time.sleep``, sockets, ``threading`` and ``queue`` cooperate. The worker's own threads (the
consumer loop, the timer, broker I/O threads) become green threads of the same hub.

``apply_async`` never blocks: up to ``concurrency`` green threads run at once and further jobs wait
in a FIFO until a slot frees. Soft time limits raise ``SoftTimeLimitExceeded`` inside the task's
green thread; hard limits raise ``TimeLimitExceeded`` there, which ends the task (the worker stores
the failure) and frees the slot. Neither can interrupt code that never yields to the hub (a
CPU-bound loop, a C call that does not release to eventlet).

All of that is :class:`celeriac.worker.green.GreenPool`, shared with the gevent pool; this
module supplies eventlet's primitives (patch, spawn, kill, sleep). It imports eventlet only when
a pool is built or the process is patched, so listing plugins (``celeriac plugins``) stays cheap.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

from celeriac.worker.green import GreenJob, GreenPool, late_imports

__all__ = ["EventletPool", "late_imports"]


class EventletPool(GreenPool):
    """``-P eventlet``: up to ``concurrency`` tasks at once, each in its own green thread."""

    name = "eventlet"
    thread_word = "green thread"
    #: One line for the worker banner.
    description: ClassVar[str] = "eventlet green threads (process not patched yet)"

    @classmethod
    def monkey_patch(cls) -> str:
        """Patch the process with ``eventlet.monkey_patch()``; return ``"eventlet VERSION
        (maintenance mode upstream)"``.

        The multi-line deprecation notice eventlet prints on import is silenced (the README says
        it). Raises ``ImportError`` without eventlet.
        """
        with warnings.catch_warnings():
            # Importing eventlet prints a multi-line deprecation notice; the README says it.
            warnings.simplefilter("ignore")
            import eventlet  # type: ignore[import-untyped,unused-ignore]

            eventlet.monkey_patch()
        return f"eventlet {eventlet.__version__} (maintenance mode upstream)"

    def spawn(self, run: Callable[[GreenJob], None], job: GreenJob) -> Any:
        """``eventlet.spawn(run, job)``: the green thread starts at the next switch to the hub."""
        import eventlet  # type: ignore[import-untyped,unused-ignore]

        return eventlet.spawn(run, job)

    def kill(self, thread: Any, exc: BaseException) -> None:
        """Raise ``exc`` in the green thread ``thread``: switches to it at once
        (``GreenThread.kill``); the caller resumes when that green thread yields."""
        thread.kill(type(exc), exc, None)

    def wait_running(self, threads: list[Any]) -> None:
        """``eventlet.sleep(0.05)``: the running green threads get 50 ms to go on."""
        import eventlet  # type: ignore[import-untyped,unused-ignore]

        eventlet.sleep(0.05)
