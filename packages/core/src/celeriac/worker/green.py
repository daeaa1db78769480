"""Green pools: what the gevent and eventlet pools share, as one base class of the pool SPI.

A green pool runs every task in its own green thread (a gevent greenlet, an eventlet green
thread) inside the worker process, which is monkey-patched first so that ``time.sleep``,
sockets, ``threading`` and ``queue`` cooperate. :class:`GreenPool` holds the whole mechanism:

- :meth:`GreenPool.early_init` patches the process once and records what was imported too early
  (:func:`late_imports`); the banner line (:attr:`GreenPool.description`) says so;
- ``apply_async`` never blocks: up to ``concurrency`` green threads run at once and further jobs
  wait in a FIFO until a slot frees; ``on_start`` runs first inside the task's green thread;
- soft and hard time limits are raised inside the task's green thread, and so is
  :class:`~celeriac.exceptions.Terminated` for ``revoke(terminate=True)``;
- ``grow`` / ``shrink`` change the concurrency; a warm ``stop`` waits for every job, a cold one
  drops the jobs not started and raises ``Reject(requeue=True)`` in the running ones.

A plugin subclasses it and supplies only the library's primitives: :meth:`GreenPool.monkey_patch`,
:meth:`GreenPool.spawn`, :meth:`GreenPool.kill`, :meth:`GreenPool.wait_running` and, where the
library kills many green threads at once, :meth:`GreenPool.kill_running`. This module imports
neither gevent nor eventlet: only the plugin does, when a pool is built or the process patched.
Everything here runs in the worker's one (patched) OS thread, so nothing needs a lock.
"""

from __future__ import annotations

import abc
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from celeriac.exceptions import Reject, Terminated
from celeriac.worker.pool import Callback, Pool

__all__ = ["WATCHED_MODULES", "GreenJob", "GreenPool", "cold_shutdown_error", "late_imports"]

logger = logging.getLogger("celeriac.worker")

#: Modules that should only ever be imported after patching: if one is already loaded when
#: the process is patched, code holding references to it keeps blocking the whole hub.
WATCHED_MODULES = ("ssl", "pika", "redis", "proton", "urllib3", "requests", "httpx", "grpc", "psycopg2")


def late_imports() -> list[str]:
    """What makes patching *now* late.

    Returns the names of the :data:`WATCHED_MODULES` already imported, then ``thread 'NAME'``
    for every thread already running other than the main thread; empty when patching now is
    early enough. Raises nothing.
    """
    found = [name for name in WATCHED_MODULES if name in sys.modules]
    found += [f"thread {t.name!r}" for t in threading.enumerate() if t is not threading.main_thread()]
    return found


def cold_shutdown_error() -> Reject:
    """A new ``Reject(requeue=True)``: what a cold shutdown raises in a running task, so that the
    worker neither stores a state nor acks and an ``acks_late`` message goes back to the queue."""
    return Reject("killed by a cold shutdown of the worker", requeue=True)


def _limit_name(exc_type: type[BaseException]) -> str:
    return "soft" if "Soft" in exc_type.__name__ else "hard"


class GreenJob:
    """One submitted call; also the handle the worker passes back for time limits.

    ``thread`` is the library's green thread object once the job has been spawned (None while it
    waits for a slot); ``started`` and ``done`` are set by the pool inside that green thread.
    """

    __slots__ = ("args", "callback", "done", "on_start", "started", "target", "thread")

    def __init__(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                 on_start: Callable[[], None] | None) -> None:
        """Keep ``target(*args)``, its ``callback(result)`` and the optional ``on_start()``."""
        self.target = target
        self.args = args
        self.callback = callback
        self.on_start = on_start
        self.thread: Any = None
        self.started = False
        self.done = False


class GreenPool(Pool):
    """Up to ``concurrency`` tasks at once, each in its own green thread of a patched process.

    Abstract: a plugin sets :attr:`name`, :attr:`thread_word` and :attr:`description` and
    implements the library primitives (:meth:`monkey_patch`, :meth:`spawn`, :meth:`kill`,
    :meth:`wait_running`). The pool's methods are called from green threads of the worker's
    one OS thread, so none of them takes a lock.
    """

    soft_time_limits = True
    terminates = True
    #: True once :meth:`early_init` has monkey-patched this process (set per subclass).
    patched: ClassVar[bool] = False
    #: What was already imported or running when the process was patched (see
    #: :func:`late_imports`); empty when patching came early enough.
    patched_late: ClassVar[tuple[str, ...]] = ()
    #: One line for the worker banner; :meth:`early_init` replaces it once the process is patched.
    description: ClassVar[str] = "green threads (process not patched yet)"
    #: What the library calls one green thread, in log messages ("greenlet", "green thread").
    thread_word: ClassVar[str] = "green thread"

    # -- the library primitives a plugin provides ------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def monkey_patch(cls) -> str:
        """Monkey-patch the whole process with the library (called once, by :meth:`early_init`).

        Returns the library's name and version for the banner, e.g. ``"gevent 24.2.1"`` (with any
        remark in parentheses). Raises ``ImportError`` when the library is not installed.
        """

    @abc.abstractmethod
    def spawn(self, run: Callable[[GreenJob], None], job: GreenJob) -> Any:
        """Start ``run(job)`` in a new green thread without switching to it; return the library's
        green thread object (kept as ``job.thread``). Raises nothing of its own."""

    @abc.abstractmethod
    def kill(self, thread: Any, exc: BaseException) -> None:
        """Raise ``exc`` (an exception instance) inside the green thread ``thread``.

        Whether the caller waits for (or switches to) that green thread is the library's choice;
        the subclass's docstring says which. Raises nothing when ``thread`` has already ended.
        """

    @abc.abstractmethod
    def wait_running(self, threads: list[Any]) -> None:
        """Block the calling green thread for a short while: until ``threads`` (the running jobs'
        green threads, possibly an empty list) have ended, or at most about a second.
        A warm :meth:`stop` calls it in a loop until the pool is empty. Raises nothing."""

    def kill_running(self, jobs: list[GreenJob], make_exc: Callable[[], BaseException]) -> None:
        """Cold shutdown: raise a new ``make_exc()`` in the green thread of every job of ``jobs``
        that has not ended, one after the other with :meth:`kill`. Override where the library
        kills many green threads at once. Raises nothing."""
        for job in jobs:
            if not job.done:
                self.kill(job.thread, make_exc())

    # -- the pool --------------------------------------------------------------------------------

    @classmethod
    def early_init(cls) -> None:
        """Monkey-patch the whole process (:meth:`monkey_patch`). Idempotent.

        Call it before the app module or any network library is imported (the CLI does, right
        after reading ``-P NAME``). Patching late still works for most code, but modules loaded
        before keep their blocking versions: that is recorded in :attr:`patched_late` and logged
        as a warning when the pool starts. Sets :attr:`patched` and :attr:`description`. Raises
        ``ImportError`` when the library is not installed.
        """
        if cls.patched:
            return
        late = late_imports()
        library = cls.monkey_patch()
        cls.patched = True
        cls.patched_late = tuple(late)
        note = f"; patched late, after {', '.join(late)} had been loaded" if late else ""
        cls.description = f"{library}: the process is monkey-patched{note}"

    def __init__(self, concurrency: int = 1, app: Any = None, **options: Any) -> None:
        """A pool of ``concurrency`` (at least 1) green threads for ``app``.

        Patches the process first when :meth:`early_init` has not run yet (an embedded worker,
        ``worker_pool`` in the configuration), with a warning; warns as well when patching came
        late. Raises ``ImportError`` when the library is not installed.
        """
        super().__init__(concurrency, app, **options)
        if not type(self).patched:
            # Built without the CLI's early hook (an embedded worker, worker_pool in the config).
            logger.warning("The %s pool was created in a process that was not monkey-patched "
                           "first; patching now. Start the worker with -P %s so the CLI patches "
                           "before the app is imported.", self.name, self.name)
            type(self).early_init()
        if self.patched_late:
            logger.warning("%s patched this process late: %s had already been loaded, so code "
                           "using them may block every %s. Import them after the worker "
                           "starts (the CLI patches first when given -P %s).",
                           self.name, ", ".join(self.patched_late), self.thread_word, self.name)
        logger.info("Pool: %s.", self.description)
        self._pending: deque[GreenJob] = deque()
        self._running: set[GreenJob] = set()
        self._closed = False

    @property
    def running(self) -> int:
        """How many tasks are running now (int)."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """How many submitted tasks wait for a free slot (int)."""
        return len(self._pending)

    def apply_async(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                    on_start: Callable[[], None] | None = None) -> Any:
        """Run ``target(*args)`` in a new green thread (now, or when a slot frees), then
        ``callback(result)`` in it. ``on_start()`` runs first in the green thread.

        Never blocks and raises nothing: an exception from ``target`` or ``on_start`` (a time
        limit, a cold shutdown) is passed to ``callback`` as the result. Returns the job handle
        (a :class:`GreenJob`) for :meth:`raise_soft_timeout`.
        """
        job = GreenJob(target, args, callback, on_start)
        self._pending.append(job)
        self._fill()
        return job

    def _fill(self) -> None:
        while self._pending and len(self._running) < self.concurrency and not self._closed:
            job = self._pending.popleft()
            self._running.add(job)
            job.thread = self.spawn(self._run, job)

    def _run(self, job: GreenJob) -> None:
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

        ``exc_type`` is ``SoftTimeLimitExceeded`` or ``TimeLimitExceeded``; the instance raised
        says which limit was exceeded. Returns False when ``handle`` is not a job of a green
        pool, has not started or has ended; True once the exception is on its way (see
        :meth:`kill` for whether the caller waits). Raises nothing.
        """
        if not isinstance(handle, GreenJob) or not handle.started or handle.done or handle.thread is None:
            return False
        self.kill(handle.thread, exc_type(f"The task's {_limit_name(exc_type)} time limit was exceeded."))
        return True

    def terminate(self, handle: Any, signum: int) -> bool:
        """Raise :class:`~celeriac.exceptions.Terminated` (``signum``) in the green thread of the
        running job ``handle`` (``revoke`` with ``terminate``); the worker then stores REVOKED.

        A green thread cannot receive a signal, so every ``signum`` ends it the same way (as in
        Celery, which kills the greenlet). Returns False when ``handle`` is not a job of a green
        pool, has not started or has ended. Raises nothing.
        """
        if not isinstance(handle, GreenJob) or not handle.started or handle.done or handle.thread is None:
            return False
        self.kill(handle.thread, Terminated(signum))
        return True

    def grow(self, n: int = 1) -> None:
        """Allow ``n`` (int, negative counts as 0) more tasks at once (``control pool_grow``,
        autoscale); waiting tasks start at once. Safe from any green thread; raises nothing."""
        self.concurrency += max(0, int(n))
        self._fill()

    def shrink(self, n: int = 1) -> None:
        """Allow ``n`` (int, negative counts as 0) fewer tasks at once, never fewer than one
        (``control pool_shrink``). Running tasks are not interrupted: fewer new ones start.
        Safe from any green thread; raises nothing."""
        self.concurrency = max(1, self.concurrency - max(0, int(n)))

    def stop(self, wait: bool = True) -> None:
        """Stop the pool; returns when it is empty.

        Warm (``wait``): run what was submitted (the worker hands unstarted work back to the
        broker) and wait for every green thread to end. Cold: drop the jobs not started yet (their
        messages were not acked, so the broker delivers them again) and kill the running green
        threads by raising ``Reject(requeue=True)`` in them (:func:`cold_shutdown_error`): the
        worker then neither stores a state nor acks, and an ``acks_late`` message goes back to
        the queue. Raises nothing.
        """
        if wait:
            while self._pending or self._running:
                self.wait_running([job.thread for job in list(self._running)])
            return
        self._closed = True
        self._pending.clear()
        jobs = list(self._running)
        if jobs:
            logger.warning("Cold shutdown: killing %d running task(s).", len(jobs))
            self.kill_running(jobs, cold_shutdown_error)
        self._running.clear()
