"""The gevent pool: every task runs in its own greenlet inside the worker process.

The CLI calls :meth:`GeventPool.early_init` as soon as it has read ``-P gevent``, before the app
module (and with it any network library) is imported: the whole process is monkey-patched then,
so ``time.sleep``, sockets, ``threading`` and ``queue`` cooperate. The worker's own threads (the
consumer loop, the timer, broker I/O threads) become greenlets of the same hub.

``apply_async`` never blocks: up to ``concurrency`` greenlets run at once and further jobs wait
in a FIFO until a slot frees. Soft time limits raise ``SoftTimeLimitExceeded`` inside the task's
greenlet; hard limits raise ``TimeLimitExceeded`` there, which ends the task (the worker stores
the failure) and frees the slot. Neither can interrupt code that never yields to the hub (a
CPU-bound loop, a C call that does not release to gevent).

All of that is :class:`celeriac.worker.green.GreenPool`, shared with the eventlet pool; this
module supplies gevent's primitives (patch, spawn, kill, join). It imports gevent only when a
pool is built or the process is patched, so listing plugins (``celeriac plugins``) stays cheap.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

from celeriac.worker.green import GreenJob, GreenPool, late_imports

__all__ = ["GeventPool", "late_imports"]


class GeventPool(GreenPool):
    """``-P gevent``: up to ``concurrency`` tasks at once, each in its own greenlet."""

    name = "gevent"
    thread_word = "greenlet"
    #: One line for the worker banner.
    description: ClassVar[str] = "gevent greenlets (process not patched yet)"

    @classmethod
    def monkey_patch(cls) -> str:
        """Patch the process with ``gevent.monkey.patch_all()``; return ``"gevent VERSION"``.

        gevent's ``MonkeyPatchWarning`` (several lines about ``ssl`` imported first) is silenced:
        :meth:`early_init` reports a late patch in one line. Raises ``ImportError`` without gevent.
        """
        import gevent  # type: ignore[import-untyped,unused-ignore]
        from gevent import monkey  # type: ignore[import-untyped,unused-ignore]

        with warnings.catch_warnings():
            # gevent warns about ``ssl`` itself, in several lines; we report it in one.
            warnings.simplefilter("ignore", monkey.MonkeyPatchWarning)
            monkey.patch_all()
        return f"gevent {gevent.__version__}"

    def spawn(self, run: Callable[[GreenJob], None], job: GreenJob) -> Any:
        """``gevent.spawn(run, job)``: the greenlet starts at the next switch to the hub."""
        import gevent  # type: ignore[import-untyped,unused-ignore]

        return gevent.spawn(run, job)

    def kill(self, thread: Any, exc: BaseException) -> None:
        """Raise ``exc`` in the greenlet ``thread`` at its next switch; does not wait for it
        (``Greenlet.kill(exc, block=False)``)."""
        thread.kill(exc, block=False)

    def wait_running(self, threads: list[Any]) -> None:
        """``gevent.joinall(threads, timeout=1.0)``: until they end, at most one second."""
        import gevent  # type: ignore[import-untyped,unused-ignore]

        gevent.joinall(threads, timeout=1.0)

    def kill_running(self, jobs: list[GreenJob], make_exc: Callable[[], BaseException]) -> None:
        """Raise one ``make_exc()`` in every job's greenlet with ``gevent.killall`` and wait up to
        5 s for them to end."""
        import gevent  # type: ignore[import-untyped,unused-ignore]

        gevent.killall([job.thread for job in jobs], exception=make_exc(), block=True, timeout=5.0)
