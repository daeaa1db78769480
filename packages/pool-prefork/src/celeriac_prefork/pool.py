"""The prefork pool: one forked child process per slot, fed by a thread in the parent.

Each slot thread takes the next job, sends it to its child over a pipe and waits for the answer
(the ack decision), watching for the child's death. Soft time limits send SIGUSR1 to the child,
which raises ``SoftTimeLimitExceeded`` inside the task; hard limits kill the child. A dead child
is replaced.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from celeriac.exceptions import SoftTimeLimitExceeded
from celeriac.worker.pool import Callback, Pool

__all__ = ["PreforkPool"]

logger = logging.getLogger("celeriac.worker")

_STOP = object()


class _Job:
    """One submitted call; also the handle the worker uses for time limits."""

    __slots__ = ("args", "callback", "done", "killed", "on_start", "pid", "target")

    def __init__(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                 on_start: Callable[[], None] | None) -> None:
        self.target = target
        self.args = args
        self.callback = callback
        self.on_start = on_start
        self.pid: int | None = None
        self.done = False
        self.killed: str | None = None


_busy = False


def _on_sigusr1(signum: int, frame: Any) -> None:
    if _busy:
        raise SoftTimeLimitExceeded("The task's soft time limit was exceeded.")


def _child_main(conn: Connection, initializer: tuple[Callable[..., Any], tuple[Any, ...]] | None,
                inherited: list[Connection]) -> None:
    """The loop of a pool process: receive ``(target, args)``, send back ``target(*args)``.

    The child closes the parent's ends of every pool pipe it inherited, and exits when its
    parent is gone, so a killed worker never leaves children behind.
    """
    global _busy
    for other in inherited:
        try:
            other.close()
        except OSError:
            pass
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGQUIT"):
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, _on_sigusr1)
    if initializer is not None:
        fn, args = initializer
        fn(*args)
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent:
                    return
            item = conn.recv()
        except (EOFError, OSError, SoftTimeLimitExceeded):
            return
        if item is None:
            return
        target, args = item
        _busy = True
        try:
            result = target(*args)
        except SoftTimeLimitExceeded:  # landed after the task body had returned
            result = "ack"
        except BaseException:
            logger.exception("Internal error in pool process")
            result = "reject"
        finally:
            _busy = False
        try:
            conn.send(result)
        except (OSError, ValueError):
            return


class _Slot:
    """A child process and the parent thread that feeds it."""

    def __init__(self, pool: PreforkPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: Any = None
        self.conn: Connection | None = None
        self.tasks_done = 0
        self.thread = threading.Thread(target=self._run, name=f"PoolSlot-{index}", daemon=True)

    def spawn(self) -> None:
        parent_end, child_end = multiprocessing.Pipe()
        context = multiprocessing.get_context("fork")
        inherited = [parent_end] + [s.conn for s in self.pool._slots if s.conn is not None and s is not self]
        process = context.Process(target=_child_main, args=(child_end, self.pool._initializer, inherited),
                                  name=f"ForkPoolWorker-{self.index}", daemon=True)
        process.start()
        child_end.close()
        self.process, self.conn, self.tasks_done = process, parent_end, 0

    def retire(self, wait: bool) -> None:
        process, conn = self.process, self.conn
        if process is None or conn is None:
            return
        if wait:
            try:
                conn.send(None)
            except OSError:
                pass
            process.join(10)
        if process.is_alive():
            process.kill()
            process.join(5)
        conn.close()
        self.process = self.conn = None

    def _run(self) -> None:
        pool = self.pool
        while True:
            job = pool._jobs.get()
            if job is _STOP:
                self.retire(wait=True)
                with pool._lock:
                    if self in pool._slots:
                        pool._slots.remove(self)
                return
            if pool._abandon:
                job.done = True
                job.callback("notstarted")
                continue
            if self.process is None or not self.process.is_alive():
                self.spawn()
            job.callback(self._execute(job))
            limit = pool.max_tasks_per_child
            if self.process is not None and limit and self.tasks_done >= limit:
                self.retire(wait=True)

    def _execute(self, job: _Job) -> Any:
        process, conn = self.process, self.conn
        assert process is not None and conn is not None
        job.pid = process.pid
        try:
            conn.send((job.target, job.args))
        except OSError:
            job.done = True
            self.retire(wait=False)
            return "lost"
        if job.on_start is not None:
            try:
                job.on_start()
            except Exception:
                logger.exception("on_start callback failed")
        while True:
            try:
                if conn.poll(0.2):
                    result = conn.recv()
                    job.done = True
                    self.tasks_done += 1
                    return result
            except (EOFError, OSError):
                pass
            if not process.is_alive() or conn.closed:
                job.done = True
                exitcode = process.exitcode
                self.retire(wait=False)
                if job.killed:
                    return job.killed
                return f"lost (exit code {exitcode})"


class PreforkPool(Pool):
    """``-P prefork``: ``concurrency`` forked child processes."""

    name = "prefork"
    soft_time_limits = True
    process_based = True

    def __init__(self, concurrency: int = 1, app: Any = None, max_tasks_per_child: int | None = None,
                 **options: Any) -> None:
        super().__init__(concurrency, app, **options)
        self.max_tasks_per_child = max_tasks_per_child
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._slots: list[_Slot] = []
        self._initializer: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self._abandon = False
        self._lock = threading.Lock()
        self._next_index = 1

    def init_processes(self, initializer: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._initializer = (initializer, args)

    def start(self) -> None:
        if not hasattr(os, "fork"):
            raise RuntimeError("The prefork pool needs os.fork(); use -P threads on this platform.")
        with self._lock:
            slots = [self._new_slot() for _ in range(self.concurrency)]
        for slot in slots:
            slot.thread.start()

    def _new_slot(self) -> _Slot:
        slot = _Slot(self, self._next_index)
        self._next_index += 1
        slot.spawn()
        self._slots.append(slot)
        return slot

    def grow(self, n: int = 1) -> None:
        """Fork ``n`` more children (thread-safe)."""
        with self._lock:
            slots = [self._new_slot() for _ in range(n)]
            self.concurrency += n
        for slot in slots:
            slot.thread.start()

    def shrink(self, n: int = 1) -> None:
        """Retire ``n`` children once they are idle, keeping at least one (thread-safe)."""
        with self._lock:
            n = min(n, self.concurrency - 1)
            self.concurrency -= n
        for _ in range(n):
            self._jobs.put(_STOP)

    def apply_async(self, target: Callable[..., Any], args: tuple[Any, ...], callback: Callback,
                    on_start: Callable[[], None] | None = None) -> Any:
        job = _Job(target, args, callback, on_start)
        self._jobs.put(job)
        return job

    def raise_soft_timeout(self, handle: Any, exc_type: type[BaseException]) -> bool:
        if not isinstance(handle, _Job) or handle.done or handle.pid is None:
            return False
        try:
            if issubclass(exc_type, SoftTimeLimitExceeded):
                os.kill(handle.pid, signal.SIGUSR1)
            else:
                handle.killed = "timeout"
                os.kill(handle.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def stop(self, wait: bool = True) -> None:
        # Jobs not started yet are handed back ("notstarted") so the worker requeues them.
        self._abandon = True
        with self._lock:
            slots = list(self._slots)
        for _ in slots:
            self._jobs.put(_STOP)
        if wait:
            for slot in slots:
                slot.thread.join()
        else:
            for slot in slots:
                slot.retire(wait=False)
        with self._lock:
            self._slots.clear()
