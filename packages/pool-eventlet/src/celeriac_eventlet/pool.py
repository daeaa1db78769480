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

This module imports eventlet only when a pool is built or the process is patched, so listing
plugins (``celeriac plugins``) stays cheap.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from celeriac.exceptions import Reject
from celeriac.worker.pool import Callback, Pool

__all__ = ["EventletPool", "late_imports"]

logger = logging.getLogger("celeriac.worker")

#: Modules that should only ever be imported after patching: if one is already loaded when
#: the process is patched, code holding references to it keeps blocking the whole hub.
WATCHED_MODULES = ("ssl", "pika", "redis", "proton", "urllib3", "requests", "httpx", "grpc", "psycopg2")


def late_imports() -> list[str]:
    """What makes patching *now* late: watched modules already imported and threads already
    running (other than the main thread)."""
    found = [name for name in WATCHED_MODULES if name in sys.modules]
    found += [f"thread {t.name!r}" for t in threading.enumerate() if t is not threading.main_thread()]
    return found


class _Job:
    """One submitted call; also the handle the worker passes back for time limits."""

    __slots__ = ("args", "callback", "done", "greenlet", "on_start", "started", "target")

    def __init__(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                 on_start: Callable[[], None] | None) -> None:
        self.target = target
        self.args = args
        self.callback = callback
        self.on_start = on_start
        self.greenlet: Any = None
        self.started = False
        self.done = False


class EventletPool(Pool):
    """``-P eventlet``: up to ``concurrency`` tasks at once, each in its own green thread."""

    name = "eventlet"
    soft_time_limits = True
    #: True once :meth:`early_init` has monkey-patched this process.
    patched: ClassVar[bool] = False
    #: What was already imported or running when the process was patched (see
    #: :func:`late_imports`); empty when patching came early enough.
    patched_late: ClassVar[tuple[str, ...]] = ()
    #: One line for the worker banner.
    description: ClassVar[str] = "eventlet green threads (process not patched yet)"

    @classmethod
    def early_init(cls) -> None:
        """Monkey-patch the whole process with ``eventlet.monkey_patch()``. Idempotent.

        Call it before the app module or any network library is imported (the CLI does, right
        after reading ``-P eventlet``). Patching late still works for most code, but modules
        loaded before keep their blocking versions: that is recorded in :attr:`patched_late`
        and logged as a warning when the pool starts.
        """
        if cls.patched:
            return
        late = late_imports()
        with warnings.catch_warnings():
            # Importing eventlet prints a multi-line deprecation notice; the README says it.
            warnings.simplefilter("ignore")
            import eventlet  # type: ignore[import-untyped,unused-ignore]

            eventlet.monkey_patch()
        cls.patched = True
        cls.patched_late = tuple(late)
        note = f"; patched late, after {', '.join(late)} had been loaded" if late else ""
        cls.description = (f"eventlet {eventlet.__version__} (maintenance mode upstream): the process "
                           f"is monkey-patched{note}")

    def __init__(self, concurrency: int = 1, app: Any = None, **options: Any) -> None:
        super().__init__(concurrency, app, **options)
        if not type(self).patched:
            # Built without the CLI's early hook (an embedded worker, worker_pool in the config).
            logger.warning("The eventlet pool was created in a process that was not monkey-patched "
                           "first; patching now. Start the worker with -P eventlet so the CLI patches "
                           "before the app is imported.")
            type(self).early_init()
        if self.patched_late:
            logger.warning("eventlet patched this process late: %s had already been loaded, so code "
                           "using them may block every green thread. Import them after the worker "
                           "starts (the CLI patches first when given -P eventlet).",
                           ", ".join(self.patched_late))
        logger.info("Pool: %s.", self.description)
        self._pending: deque[_Job] = deque()
        self._running: set[_Job] = set()
        self._closed = False

    @property
    def running(self) -> int:
        """How many tasks are running now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """How many submitted tasks wait for a free slot."""
        return len(self._pending)

    def apply_async(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                    on_start: Callable[[], None] | None = None) -> Any:
        """Run ``target(*args)`` in a new green thread (now, or when a slot frees), then
        ``callback(result)`` in it. ``on_start()`` runs first in the green thread.
        Never blocks; returns the job handle for :meth:`raise_soft_timeout`."""
        job = _Job(target, args, callback, on_start)
        self._pending.append(job)
        self._fill()
        return job

    def _fill(self) -> None:
        import eventlet  # type: ignore[import-untyped,unused-ignore]

        while self._pending and len(self._running) < self.concurrency and not self._closed:
            job = self._pending.popleft()
            self._running.add(job)
            job.greenlet = eventlet.spawn(self._run, job)

    def _run(self, job: _Job) -> None:
        job.started = True
        result: Any
        try:
            if job.on_start is not None:
                job.on_start()
            result = job.target(*job.args)
        except BaseException as exc:  # a limit that landed after the task body, a cold shutdown
            result = exc
        job.done = True
        self._running.discard(job)
        self._fill()
        try:
            job.callback(result)
        except Exception:
            logger.exception("The pool's completion callback failed")

    def raise_soft_timeout(self, handle: Any, exc_type: type[BaseException]) -> bool:
        """Raise ``exc_type`` in the green thread of ``handle`` (soft and hard time limits).

        False when the job has not started or has ended. Switches to that green thread at once."""
        if not isinstance(handle, _Job) or not handle.started or handle.done or handle.greenlet is None:
            return False
        exc = exc_type(f"The task's {_limit_name(exc_type)} time limit was exceeded.")
        # Switches to the task's green thread at once; the caller resumes when it yields.
        handle.greenlet.kill(exc_type, exc, None)
        return True

    def grow(self, n: int = 1) -> None:
        """Allow ``n`` more tasks at once (``control pool_grow``, autoscale); waiting tasks
        start at once. Safe from any green thread."""
        self.concurrency += max(0, int(n))
        self._fill()

    def shrink(self, n: int = 1) -> None:
        """Allow ``n`` fewer tasks at once, never fewer than one (``control pool_shrink``).
        Running tasks are not interrupted: fewer new ones start. Safe from any green thread."""
        self.concurrency = max(1, self.concurrency - max(0, int(n)))

    def stop(self, wait: bool = True) -> None:
        """Warm (``wait``): run what was submitted (the worker hands unstarted work back to the
        broker) and wait for every green thread to end. Cold: drop the jobs not started yet (their
        messages were not acked, so the broker delivers them again) and kill the running
        green threads by raising ``Reject(requeue=True)`` in them: the worker then neither
        stores a state nor acks, and an ``acks_late`` message goes back to the queue."""
        import eventlet  # type: ignore[import-untyped,unused-ignore]

        if wait:
            while self._pending or self._running:
                eventlet.sleep(0.05)
            return
        self._closed = True
        self._pending.clear()
        jobs = list(self._running)
        if jobs:
            logger.warning("Cold shutdown: killing %d running task(s).", len(jobs))
        for job in jobs:
            if not job.done:
                job.greenlet.kill(Reject, _cold_kill(), None)  # raised at once
        self._running.clear()


def _limit_name(exc_type: type[BaseException]) -> str:
    return "soft" if "Soft" in exc_type.__name__ else "hard"


def _cold_kill() -> Reject:
    return Reject("killed by a cold shutdown of the worker", requeue=True)
