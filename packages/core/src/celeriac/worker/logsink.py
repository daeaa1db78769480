"""Log handlers whose callers never wait for each other or for a write.

The standard ``StreamHandler`` holds a lock across the ``write`` and ``flush`` of every line. With
the worker's eight pool threads logging "succeeded" while the consumer thread logs "received",
threads queued on that lock and the GIL changed hands at every line: in a drain of no-op tasks on
RabbitMQ this was a fifth of the worker's Python time (py-spy, ``bench/profile.py``).

Here each caller appends its line to a deque: formatted at once, or, for an info line whose
record cannot change meanwhile (a plain message with str, number or None arguments), formatted
later by the thread that writes it, off the caller's path. Lines below ``WARNING`` are
written by a flusher thread at most ``flush_interval`` seconds later (0.02 s for the worker), or at once
when ``batch`` lines are pending: one ``write`` for many lines instead of one system call each.
A ``WARNING`` or worse is written at once, with every line before it. Whoever writes takes all
pending lines, and only one thread writes at a time; a thread that finds another one writing
leaves its line to that writer, which checks for more before it lets go. Lines keep the order in
which they were appended. :meth:`flush` (called by ``logging.shutdown`` at exit) writes what is
pending. A process killed with ``SIGKILL`` loses at most ``flush_interval`` seconds of info
lines.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from typing import IO

__all__ = ["CombiningFileHandler", "CombiningStreamHandler"]

#: Every handler made here: a forked child gets fresh locks and its own flusher, and drops the
#: parent's pending lines (the parent writes those).
_handlers: weakref.WeakSet[_Combining] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_handlers):
        handler._reset()


#: Argument types a line may be formatted later with: their values cannot change meanwhile.
_FROZEN_TYPES = frozenset({str, int, float, bool, type(None)})


def _frozen(record: logging.LogRecord) -> bool:
    """True when formatting ``record`` later gives the same line as formatting it now."""
    if type(record.msg) is not str or record.exc_info or record.stack_info:
        return False
    args = record.args
    if not args:
        return True
    return isinstance(args, tuple) and all(type(value) in _FROZEN_TYPES for value in args)


class _Combining:
    """The lock-free ``handle``/``emit`` shared by both handlers (a mixin before the handler)."""

    terminator: str

    def _init_combining(self, flush_interval: float, batch: int) -> None:
        self.flush_interval = max(0.0, float(flush_interval))
        self.batch = max(1, int(batch))
        self._reset()
        _handlers.add(self)

    def _reset(self) -> None:
        """No pending line, fresh locks, no flusher thread (also in a forked child)."""
        self._pending: collections.deque[str | logging.LogRecord] = collections.deque()
        self._writing = threading.Lock()
        self._kick = threading.Event()
        self._armed = False
        self._flusher_pid: int | None = None
        self._starting = threading.Lock()

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        """Filter and emit ``record`` without taking the handler's lock; True when emitted."""
        if not self.filter(record):  # type: ignore[attr-defined]
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        """Queue ``record``'s line (see the module). A line that waits for the flusher is
        formatted by whoever writes it, when the record holds nothing that could change
        meanwhile (a plain message with str, number or None arguments, no exception); any
        other line is formatted now, in the calling thread."""
        urgent = record.levelno >= logging.WARNING or not self.flush_interval
        if urgent or not _frozen(record):
            try:
                self._pending.append(self.format(record) + self.terminator)  # type: ignore[attr-defined]
            except Exception:
                self.handleError(record)  # type: ignore[attr-defined]
                return
        else:
            self._pending.append(record)
        if urgent or len(self._pending) >= self.batch:
            self._write_pending(record)
        elif not self._armed:
            self._arm()

    def _line(self, item: str | logging.LogRecord) -> str:
        if isinstance(item, str):
            return item
        try:
            return self.format(item) + self.terminator  # type: ignore[attr-defined,no-any-return]
        except Exception:
            self.handleError(item)  # type: ignore[attr-defined]
            return ""

    def _arm(self) -> None:
        self._armed = True
        if self._flusher_pid != os.getpid():
            with self._starting:
                if self._flusher_pid != os.getpid():
                    self._flusher_pid = os.getpid()
                    threading.Thread(target=self._flush_loop, args=(weakref.ref(self),),
                                     name="LogFlusher", daemon=True).start()
        self._kick.set()

    @staticmethod
    def _flush_loop(ref: weakref.ReferenceType[_Combining]) -> None:
        pid = os.getpid()
        while True:
            handler = ref()
            if handler is None or handler._flusher_pid != pid:
                return
            kick, interval = handler._kick, handler.flush_interval
            del handler  # no strong reference while waiting: the handler may be collected
            if not kick.wait(60.0):
                continue
            kick.clear()
            # Let more lines gather (the emitting threads keep running), then write them all.
            threading.Event().wait(interval)
            handler = ref()
            if handler is None:
                return
            handler._armed = False
            handler._write_pending()
            del handler

    def _write_pending(self, record: logging.LogRecord | None = None) -> None:
        pending = self._pending
        # Whoever holds the lock checks ``pending`` again after letting go, so a line appended
        # while another thread was writing is never left behind.
        while pending and self._writing.acquire(blocking=False):
            try:
                lines = []
                while pending:
                    lines.append(self._line(pending.popleft()))
                stream = self.stream  # type: ignore[attr-defined]
                if stream is not None:
                    stream.write("".join(lines))
                    stream.flush()
            except Exception:
                if record is not None:
                    self.handleError(record)  # type: ignore[attr-defined]
            finally:
                self._writing.release()

    def flush(self) -> None:
        """Write every pending line and flush the stream."""
        self._write_pending()
        stream = self.stream  # type: ignore[attr-defined]
        with self._writing:
            if stream is not None and hasattr(stream, "flush"):
                stream.flush()


class CombiningStreamHandler(_Combining, logging.StreamHandler):  # type: ignore[type-arg]
    """``logging.StreamHandler(stream)`` whose threads do not queue on a lock (see the module).

    ``flush_interval`` (seconds) is how long an info line may wait to be written with others; 0
    writes every line at once. ``batch`` is the number of pending lines that are written without waiting.
    """

    def __init__(self, stream: IO[str] | None = None, flush_interval: float = 0.0,
                 batch: int = 256) -> None:
        super().__init__(stream)
        self._init_combining(flush_interval, batch)


class CombiningFileHandler(_Combining, logging.FileHandler):
    """``logging.FileHandler(filename)`` (appending) whose threads do not queue on a lock;
    ``flush_interval`` and ``batch`` as for :class:`CombiningStreamHandler`."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None,
                 flush_interval: float = 0.0, batch: int = 256) -> None:
        super().__init__(filename, mode, encoding)
        self._init_combining(flush_interval, batch)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
