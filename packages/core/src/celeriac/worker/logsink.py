"""Log handlers whose callers never wait for each other.

The standard ``StreamHandler`` holds a lock across the ``write`` and ``flush`` of every line. With
the worker's eight pool threads logging "succeeded" while the consumer thread logs "received",
threads queue on that lock and the GIL changes hands at every line: in a drain of no-op tasks on
RabbitMQ this was a fifth of the worker's Python time (py-spy, ``bench/profile.py``).

Here each caller formats its own line, appends it to a deque and writes everything pending if no
other thread is writing at that moment; otherwise the thread that is writing takes the line along
before it lets go. Lines keep the order in which they were appended; each ``write`` carries all
lines pending at that moment (one system call instead of one per line), and no line waits for a
later log call.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from typing import IO

__all__ = ["CombiningFileHandler", "CombiningStreamHandler"]


#: Every handler made here; a forked child gets fresh locks and drops the parent's pending lines
#: (the parent writes those).
_handlers: weakref.WeakSet[_Combining] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_handlers):
        handler._writing = threading.Lock()
        handler._pending.clear()


class _Combining:
    """The lock-free ``handle``/``emit`` shared by both handlers (a mixin before the handler)."""

    terminator: str

    def _init_combining(self) -> None:
        self._pending: collections.deque[str] = collections.deque()
        self._writing = threading.Lock()
        _handlers.add(self)

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        """Filter and emit ``record`` without taking the handler's lock; True when emitted."""
        if not self.filter(record):  # type: ignore[attr-defined]
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        """Format ``record`` in the calling thread, queue the line and write what is pending."""
        try:
            line = self.format(record) + self.terminator  # type: ignore[attr-defined]
        except Exception:
            self.handleError(record)  # type: ignore[attr-defined]
            return
        self._pending.append(line)
        self._write_pending(record)

    def _write_pending(self, record: logging.LogRecord | None = None) -> None:
        pending = self._pending
        # Whoever holds the lock checks ``pending`` again after letting go, so a line appended
        # while another thread was writing is never left behind.
        while pending and self._writing.acquire(blocking=False):
            try:
                lines = []
                while pending:
                    lines.append(pending.popleft())
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
    """``logging.StreamHandler(stream)`` whose threads do not queue on a lock (see the module)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self._init_combining()


class CombiningFileHandler(_Combining, logging.FileHandler):
    """``logging.FileHandler(filename)`` (appending) whose threads do not queue on a lock."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode, encoding)
        self._init_combining()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
