"""The pool SPI and the built-in ``solo`` and ``threads`` pools.

A pool runs ``target(*args)`` for the worker and reports back through ``callback(result)``. The
worker does not wait for jobs to finish: it submits while free slots remain (``Pool.limit``) and
the pool calls back from its own thread. A process pool receives only picklable targets (module-level
functions and plain data).
"""

from __future__ import annotations

import abc
import ctypes
import queue
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from celeriac.exceptions import SoftTimeLimitExceeded

__all__ = ["Pool", "SoloPool", "ThreadPool"]

Callback = Callable[[Any], None]


class Pool(abc.ABC):
    """Runs task executions with bounded concurrency.

    ``callback`` is called with the target's return value (targets never raise: the worker's
    execution function catches everything). ``apply_async`` is called from one thread only.
    """

    name: ClassVar[str] = "?"
    #: One line the worker's banner prints after the pool's name (e.g. that a green pool has
    #: monkey-patched the process); empty for none.
    description: ClassVar[str] = ""
    #: True when :meth:`raise_soft_timeout` can interrupt a running task.
    soft_time_limits: ClassVar[bool] = False
    #: True when ``revoke(terminate=True)`` can end a running task (:meth:`terminate`, or the
    #: direct consumer's own way); remote control answers with an error for other pools.
    terminates: ClassVar[bool] = False
    #: True for pools that run tasks in other processes. The worker then submits
    #: ``celeriac.worker.trace.run_payload`` with plain-data arguments, calls
    #: :meth:`init_processes` before :meth:`start`, and the callback receives the ack decision
    #: (``ack``, ``reject``, ``requeue``) or ``lost`` / ``timeout`` when the process died or was
    #: killed at the hard time limit.
    process_based: ClassVar[bool] = False
    #: True for pools whose processes consume from the broker themselves: the worker then
    #: calls :meth:`direct_consumer` instead of running a task consumer of its own.
    consumes_directly: ClassVar[bool] = False
    #: The variant of this pool whose processes consume themselves (``worker_direct_consume``),
    #: or None when it has none.
    direct_variant: ClassVar[Callable[..., Pool] | None] = None

    def init_processes(self, initializer: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Process pools: run ``initializer(*args)`` in every new process (after fork)."""

    def __init__(self, concurrency: int = 1, app: Any = None, **options: Any) -> None:
        self.concurrency = max(1, int(concurrency))
        self.app = app
        self.options = options

    @classmethod
    def early_init(cls) -> None:
        """Prepare the process before the app is imported (green pools monkey-patch here)."""

    @property
    def limit(self) -> int:
        """How many tasks may run at once."""
        return self.concurrency

    def start(self) -> None:
        """Start worker threads or processes."""

    @abc.abstractmethod
    def apply_async(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                    on_start: Callable[[], None] | None = None) -> Any:
        """Run ``target(*args)`` and then ``callback(result)``; return a job handle.

        Process pools call ``on_start()`` in the parent when a process takes the job (the worker
        acks early there); in-process pools ignore it (the task acks itself when it starts).
        """

    def direct_consumer(self, hostname: str, queues: list[Any], prefetch_multiplier: int,
                        fetch_timeout: float, time_limit: float | None,
                        soft_time_limit: float | None) -> Any:
        """Pools that consume directly: the worker's task consumer (a
        :class:`~celeriac.worker.consumer.TaskConsumer` answering for the processes). Called
        before :meth:`start`. Raises ``NotImplementedError`` for other pools."""
        raise NotImplementedError(f"The {self.name} pool does not consume by itself.")

    def raise_soft_timeout(self, handle: Any, exc_type: type[BaseException]) -> bool:
        """Raise ``exc_type`` inside the running job ``handle``; False when not possible."""
        return False

    def set_task_events(self, enabled: bool) -> None:
        """Turn task events on or off in the pool's processes (``control enable_events``);
        in-process pools share the worker's setting and do nothing here. Thread-safe."""

    def discard(self, handle: Any) -> bool:
        """Drop job ``handle`` if it has not started (a revoked task): its callback then gets
        ``"revoked"``. False when it started, ended, or the pool cannot tell (in-process pools:
        the task checks the revoked ids itself when it starts). Thread-safe."""
        return False

    def terminate(self, handle: Any, signum: int) -> bool:
        """Send signal ``signum`` to the process running job ``handle`` (``revoke`` with
        ``terminate``); its callback then gets ``"terminated <signum>"`` if the process dies of
        it. False when the job is not running in a process of this pool. Thread-safe."""
        return False

    def grow(self, n: int = 1) -> None:
        """Add ``n`` slots (threads, processes, greenlets) and raise :attr:`concurrency` by ``n``.

        Thread-safe (remote control calls it from its own thread). Raises
        ``NotImplementedError`` when the pool cannot be resized."""
        raise NotImplementedError(f"The {self.name} pool cannot be resized.")

    def shrink(self, n: int = 1) -> None:
        """Remove ``n`` slots once they are idle (running tasks finish first); never below 1.

        Thread-safe. Raises ``NotImplementedError`` when the pool cannot be resized."""
        raise NotImplementedError(f"The {self.name} pool cannot be resized.")

    def stop(self, wait: bool = True) -> None:
        """Stop the pool; with ``wait`` finish the jobs already submitted first."""


class SoloPool(Pool):
    """Runs each task inline in the thread that submits it: concurrency 1, no threads."""

    name = "solo"

    def __init__(self, concurrency: int = 1, app: Any = None, **options: Any) -> None:
        super().__init__(1, app, **options)

    def apply_async(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                    on_start: Callable[[], None] | None = None) -> Any:
        callback(target(*args))
        return None


_STOP = object()

#: Seconds a job submitted to an idle ``threads`` pool waits, in the submitting thread, for a
#: pool thread to take it (see :meth:`ThreadPool.apply_async`).
HAND_OFF_WAIT = 0.001


class _JobHandle:
    __slots__ = ("done", "taken", "thread_id")

    def __init__(self) -> None:
        self.thread_id: int | None = None
        self.done = False
        #: Set once a pool thread took the job (only when the submitter waits for that).
        self.taken: threading.Event | None = None


class ThreadPool(Pool):
    """A fixed set of threads fed from one queue."""

    name = "threads"
    soft_time_limits = True

    def __init__(self, concurrency: int = 1, app: Any = None, **options: Any) -> None:
        super().__init__(concurrency, app, **options)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._running = 0  # jobs taken and not finished

    def start(self) -> None:
        for _ in range(self.concurrency):
            self._add_thread()

    def _add_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"ThreadPoolWorker-{len(self._threads) + 1}",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def grow(self, n: int = 1) -> None:
        with self._lock:
            for _ in range(n):
                self._add_thread()
            self.concurrency += n

    def add_leader_thread(self) -> None:
        """One thread more than :attr:`concurrency`, for the task consumer's loop, which runs
        in one pool thread at a time (``TaskConsumer.run``): ``concurrency`` threads stay for
        tasks."""
        if not self._threads:
            self.start()
        with self._lock:
            self._add_thread()

    def shrink(self, n: int = 1) -> None:
        with self._lock:
            n = min(n, self.concurrency - 1)
            self.concurrency -= n
        for _ in range(n):  # the next idle threads to take one exit
            self._jobs.put(_STOP)

    def _run(self) -> None:
        get = self._jobs.get
        while True:
            job = get()
            if job is _STOP:
                with self._lock:
                    self._threads.remove(threading.current_thread())
                return
            handle, target, args, callback = job
            handle.thread_id = threading.get_ident()
            if handle.taken is not None:
                handle.taken.set()
            callback(self.run_here(handle, target, args))

    def handle_here(self) -> Any:
        """A job handle for a job the calling thread runs itself (:meth:`run_here`)."""
        handle = _JobHandle()
        handle.thread_id = threading.get_ident()
        return handle

    def run_here(self, handle: Any, target: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Run ``target(*args)`` in the calling thread as the job ``handle``
        (:meth:`raise_soft_timeout` reaches it there); return what it returned, or the exception
        that ended it. Counts as one running job."""
        with self._lock:
            self._running += 1
        try:
            result = target(*args)
        except BaseException as exc:  # SoftTimeLimitExceeded landing after the task ended
            result = exc
        while True:
            try:
                self._finish(handle)
                break
            except SoftTimeLimitExceeded:
                # Raised for this job as it returned (raise_soft_timeout holds the lock
                # while it checks ``done``): it lands here at the latest. The thread must not
                # die of it; once ``done`` is set, none comes any more.
                continue
        return result

    def _finish(self, handle: _JobHandle) -> None:
        with self._lock:
            if not handle.done:
                handle.done = True
                self._running -= 1

    def apply_async(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                    on_start: Callable[[], None] | None = None, *, wait_taken: bool = False) -> Any:
        """Queue the job for the next free thread.

        With ``wait_taken`` and a pool where nothing runs and nothing waits, the calling thread
        then waits (up to :data:`HAND_OFF_WAIT`) until a pool thread has taken the job: the
        pool thread starts with the GIL free instead of waiting until the caller blocks on its
        own. The worker asks for it when the job is the only one it has in flight (on an idle
        worker this took about 0.1 ms off a RabbitMQ round trip); under load, waiting would
        only slow the caller's dispatching."""
        if not self._threads:
            self.start()
        handle = _JobHandle()
        taken = (threading.Event() if wait_taken and self._running == 0 and self._jobs.empty()
                 else None)
        handle.taken = taken
        self._jobs.put((handle, target, args, callback))
        if taken is not None:
            taken.wait(HAND_OFF_WAIT)
        return handle

    def raise_soft_timeout(self, handle: Any, exc_type: type[BaseException]) -> bool:
        with self._lock:
            if handle is None or handle.done or handle.thread_id is None:
                return False
            applied = ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(handle.thread_id), ctypes.py_object(exc_type)
            )
        return bool(applied == 1)

    def stop(self, wait: bool = True) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(_STOP)
        if wait:
            for thread in threads:
                thread.join()
