"""What both prefork pools share: forking the children and waking the parent's I/O thread.

Each child is forked with one end of its own socket pair; the parent keeps the other end. A
child closes every descriptor it inherited for other children (the parent ends forked before
it, the wake pipe), so children are forked one at a time under a lock and each is handed that
list. The parent's I/O thread waits on the children's sockets and on a pipe that other threads
write a byte to (:meth:`ForkingPool._wake`) when there is something to send or to watch.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from celeriac.worker.pool import Pool

__all__ = ["ForkingPool"]


class ForkingPool(Pool):
    """Base of :class:`~celeriac_prefork.pool.PreforkPool` and
    :class:`~celeriac_prefork.direct.DirectPreforkPool`: the fork and the wake pipe.

    Subclasses call :meth:`_open_wake_pipe` first in ``start()`` and :meth:`_fork` to make each
    child; they call :meth:`_forget_parent_end` once a child's socket is closed.
    """

    def __init__(self, concurrency: int = 1, app: Any = None, max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None, **options: Any) -> None:
        super().__init__(concurrency, app, **options)
        self.max_tasks_per_child = max_tasks_per_child
        #: KiB of peak resident memory after which a child exits, once its task is answered.
        self.max_memory_per_child = max_memory_per_child
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Forks one at a time, so no child inherits a socket end made for another.
        self._spawn_lock = threading.Lock()
        self._parent_ends: set[socket.socket] = set()
        self._index = itertools.count(1)
        self._wake_r, self._wake_w = -1, -1
        self._io: threading.Thread | None = None
        self._stopping = False
        self._closing = False
        #: Task events on in the children (``set_task_events``), also for those forked later.
        self._events = False

    def _open_wake_pipe(self) -> None:
        """Make the wake pipe (its read end non-blocking). Raises ``RuntimeError`` where the
        platform cannot fork."""
        if not hasattr(os, "fork"):
            raise RuntimeError("The prefork pool needs os.fork(); use -P threads on this platform.")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    def _wake(self) -> None:
        """Wake the I/O thread (one byte on the wake pipe); never blocks or raises."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # the pipe is full (the thread is awake anyway) or closed
            pass

    def _fork(self, target: Callable[..., None],
              args: Callable[[socket.socket, list[Any]], tuple[Any, ...]]) -> tuple[Any, socket.socket]:
        """Fork one child running ``target(*args(child_end, inherited))``; return its process and
        the parent's end of its socket pair.

        ``inherited`` lists what the child must close: the parent ends of this and every other
        child, and the wake pipe. The child is named ``ForkPoolWorker-N``, as Celery's."""
        context = multiprocessing.get_context("fork")
        with self._spawn_lock:
            parent_end, child_end = socket.socketpair()
            inherited: list[Any] = [parent_end, *self._parent_ends, self._wake_r, self._wake_w]
            process = context.Process(target=target, args=args(child_end, inherited),
                                      name=f"ForkPoolWorker-{next(self._index)}", daemon=True)
            process.start()
            child_end.close()
            self._parent_ends.add(parent_end)
        return process, parent_end

    def _forget_parent_end(self, sock: socket.socket) -> None:
        """Stop handing ``sock`` (a closed child's parent end) to children forked later."""
        with self._spawn_lock:
            self._parent_ends.discard(sock)
